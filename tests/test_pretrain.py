"""End to end on a tiny slice of real data: pack -> pretrain -> checkpoint -> resume -> kNN eval."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from dataloading.pack import pack
from dataloading.sources import load_idx
from engine.config import load_config
from engine.distributed import free_port
from engine.evaluate import evaluate, load_backbone
from engine.pretrain import pretrain

REPO = Path(__file__).resolve().parent.parent

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


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """96 train / 40 test real Fashion-MNIST images, packed from class folders like a user's own data."""
    root = tmp_path_factory.mktemp("fashion")
    out = {}
    for split, per_class in (("train", 10), ("test", 4)):
        manifest = pack(str(write_class_folders(root, split, per_class)), root / f"{split}-shards",
                        shard_size=40, workers=1, progress=False)
        assert manifest["kept"] == 10 * per_class
        out[split] = str(root / f"{split}-shards")
    return out


def tiny_config(shards, output_dir, *extra):
    return load_config(None, [*TINY, f"data.train_shards={shards['train']}", f"eval.train_shards={shards['train']}",
                              f"eval.test_shards={shards['test']}", f"train.output_dir={output_dir}", *extra])


def final_weights(output_dir):
    return torch.load(Path(output_dir) / "backbone_final.pt", weights_only=True)["state_dict"]


def test_pretrain_checkpoint_and_knn(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run")
    result = pretrain(cfg)
    assert result["steps"] == 6 and result["rank_divergence"] == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(0 < r["loss"] < 10 and r["img_per_s"] > 0 for r in records)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    prototypes = torch.load(next((tmp_path / "run" / "checkpoints" / "step_00000006").glob("mp_rank_00_model_states.pt")),
                            weights_only=False)["module"]["head.prototypes"]
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(20))
    init, final = load_backbone(tmp_path / "run" / "backbone_init.pt"), load_backbone(tmp_path / "run" / "backbone_final.pt")
    assert not torch.equal(init.stem.conv.weight, final.stem.conv.weight)
    for backbone in (final, None):
        results = evaluate(backbone, cfg, ("knn", "linear"))
        assert 0.1 <= results["knn_top1"] <= 1.0 and 0.1 <= results["linear_top1"] <= 1.0  # 10 classes, 40 images


def test_resume_equals_uninterrupted(shards, tmp_path):
    pretrain(tiny_config(shards, tmp_path / "straight"))
    interrupted = tmp_path / "interrupted"
    pretrain(tiny_config(shards, interrupted))
    # Simulate a crash right after the step-3 checkpoint: the later checkpoint and outputs never happened.
    ckpt = interrupted / "checkpoints"
    import shutil

    shutil.rmtree(ckpt / "step_00000006")
    (ckpt / "latest").write_text("step_00000003")
    (interrupted / "backbone_final.pt").unlink()
    result = pretrain(tiny_config(shards, interrupted), resume=True)
    assert result["steps"] == 6
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(interrupted)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    losses = [json.loads(line)["loss"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    straight_losses = [json.loads(line)["loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-3:] == pytest.approx(straight_losses[-3:], abs=1e-6)


def test_existing_run_needs_resume(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", "train.steps=3")
    pretrain(cfg)
    with pytest.raises(FileExistsError, match="pass --resume"):
        pretrain(cfg)


def test_two_ranks_through_deepspeed_launcher_stay_in_sync(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "ddp", "train.steps=4", "train.checkpoint_every=2")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "engine.pretrain",
         "--config", str(config_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads([line for line in run.stdout.splitlines() if line.startswith('{"steps"')][-1])
    assert result["steps"] == 4 and result["rank_divergence"] == 0.0
    checkpoint = tmp_path / "ddp" / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in checkpoint.glob("trainer_rank*.pt")) == ["trainer_rank00000.pt", "trainer_rank00001.pt"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_keep_prototypes_unit_norm_and_match_stage_0(shards, tmp_path, stage):
    from deepspeed.utils import safe_get_full_fp32_param

    from engine.pretrain import Pretrainer

    common = ("optim.name=sgd", "train.steps=4", "model.channels_last=false")
    pretrain(tiny_config(shards, tmp_path / "stage0", *common))
    trainer = Pretrainer(tiny_config(shards, tmp_path / f"stage{stage}", *common, f"train.zero_stage={stage}"))
    try:
        trainer.train()
        master = safe_get_full_fp32_param(trainer.model.head.prototypes)  # ZeRO's fp32 copy, gathered
    finally:
        trainer.close()
    torch.testing.assert_close(master.norm(dim=1), torch.ones(20))
    reference, sharded = final_weights(tmp_path / "stage0"), final_weights(tmp_path / f"stage{stage}")
    for name in reference:
        torch.testing.assert_close(sharded[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_deepspeed_does_not_clip_unless_asked(shards, tmp_path):
    from engine.pretrain import Pretrainer

    trainer = Pretrainer(tiny_config(shards, tmp_path / "noclip", "train.steps=1"))
    assert trainer.engine.gradient_clipping() == 0.0  # DeepSpeed's own default would be 1.0
    trainer.close()
    clipped = Pretrainer(tiny_config(shards, tmp_path / "clip", "train.steps=1", "optim.gradient_clipping=0.5"))
    assert clipped.engine.gradient_clipping() == 0.5
    clipped.close()
