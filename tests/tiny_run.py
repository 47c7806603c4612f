"""Shared by the training tests: real Fashion-MNIST images packed like a user's folder, a tiny config, the `seer`
command and the environment for child processes."""
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from dataloading.pack import pack
from dataloading.sources import load_idx
from engine.config import load_config

REPO = Path(__file__).resolve().parent.parent
SEER = str(Path(sys.executable).parent / "seer")  # the console command, as a user runs it


def child_env() -> dict:
    """This environment minus the rank variables an in-process run set (a child would join its process group)."""
    rank_variables = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in rank_variables}, "OMP_NUM_THREADS": "1"}

TINY = [
    "model.backbone=regnety_micro", "model.head_hidden_dims=[32]", "model.embedding_dim=16",
    "model.num_prototypes=20", "data.crops=[{size: 16, count: 2, scale: [0.4, 1]}, {size: 8, count: 2, scale: [0.1, 0.4]}]",
    "train.batch_size=16", "train.steps=6", "train.log_every=1", "train.checkpoint_every=3", "train.progress=false",
    "swav.freeze_prototypes_steps=2", "optim.warmup_steps=2", "eval.image_size=16", "eval.batch_size=64",
]


def write_class_folders(root: Path, split: str, per_class: int) -> Path:
    images, labels, classes = load_idx("fashion-mnist", split)
    counts = {c: 0 for c in range(len(classes))}
    for image, label in zip(images, labels):
        label = int(label)
        if counts[label] < per_class:
            folder = root / split / classes[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{counts[label]}.png")
            counts[label] += 1
    return root / split


def pack_class_folders(root: Path) -> dict[str, str]:
    """100 train / 40 test real Fashion-MNIST images, packed from class folders like a user's own data."""
    out = {}
    for split, per_class in (("train", 10), ("test", 4)):
        manifest = pack(str(write_class_folders(root, split, per_class)), root / f"{split}-shards",
                        shard_size=40, workers=1, progress=False)
        assert manifest["kept"] == 10 * per_class
        out[split] = str(root / f"{split}-shards")
    return out


def tiny_config(shards, output_dir, *extra):
    return load_config("demo", [*TINY, f"data.train_shards={shards['train']}", f"eval.train_shards={shards['train']}",
                              f"eval.test_shards={shards['test']}", f"train.output_dir={output_dir}", *extra])


def final_weights(output_dir):
    return torch.load(Path(output_dir) / "backbone_final.pt", weights_only=True)["state_dict"]
