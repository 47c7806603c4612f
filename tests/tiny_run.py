"""Shared by the training tests: real Fashion-MNIST images packed like a user's folder, the demo config and a tiny
variant of it, the `seer` and `deepspeed` commands, the environment for child processes, and spawned ranks."""
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image

from dataloading.pack import pack
from dataloading.sources import load_idx
from engine.config import load_config
from engine.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
SEER = str(Path(sys.executable).parent / "seer")  # the console command, as a user runs it
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")  # DeepSpeed's launcher
# What every spawned rank imports: done once by the fork server that starts the ranks instead of by each rank (a
# fresh interpreter spends ~3 s importing them; 4 ranks on 2 cores, ~6 s before their first step).
RANK_IMPORTS = ["torch", "timm", "deepspeed", "engine.training.pretrain", "kernels"]


def child_env() -> dict:
    """This environment minus the rank variables an in-process run set (a child would join its process group)."""
    rank_variables = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in rank_variables}, "OMP_NUM_THREADS": "1"}


def demo_config(*overrides):
    """The demo's config (engine/configs/demo.yaml) with `section.key=value` overrides."""
    return load_config("demo", list(overrides))


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


def run_overrides(shards, output_dir) -> list[str]:
    """Pretrain (and run kNN against the test shards) on the packed train images; write the run to output_dir."""
    return [f"data.train_shards={shards['train']}", f"eval.train_shards={shards['train']}",
            f"eval.test_shards={shards['test']}", f"train.output_dir={output_dir}"]


def tiny_config(shards, output_dir, *extra):
    return demo_config(*TINY, *run_overrides(shards, output_dir), *extra)


def final_weights(output_dir):
    return torch.load(Path(output_dir) / "backbone_final.pt", weights_only=True)["state_dict"]


def metrics_records(run_dir) -> list[dict]:
    """The lines of a run's metrics.jsonl as written (no de-duplication of resumed steps)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def launch_two_ranks(cfg, config_file: Path) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 --module engine.training.pretrain --config config_file` with cfg written there."""
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    return subprocess.run(
        [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "engine.training.pretrain",
         "--config", str(config_file)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
    )


def spawn_ranks(worker, args: tuple, world_size: int) -> None:
    """torch.multiprocessing.spawn(worker, args, world_size), with the ranks forked from a server that imported
    RANK_IMPORTS once per test session (it holds one thread, so forking it is safe). The ranks inherit the
    environment the server started with (at the first call), not the caller's at each call.

    On a CUDA machine the ranks are spawned as usual: importing DeepSpeed queries CUDA, which a fork cannot inherit.
    """
    if torch.cuda.is_available():
        mp.spawn(worker, args=args, nprocs=world_size, join=True)
        return
    multiprocessing.set_forkserver_preload(RANK_IMPORTS)
    mp.start_processes(worker, args=args, nprocs=world_size, join=True, start_method="forkserver")
