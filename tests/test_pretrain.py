"""End to end on a tiny slice of real data: pack -> pretrain -> checkpoint -> resume -> kNN eval."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.distributed import free_port
from engine.evaluation.evaluate import FeatureCache, evaluate, split_features
from engine.models.weights import load_backbone_weights
from engine.training.pretrain import pretrain
from tiny_run import REPO, final_weights, tiny_config

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
                            weights_only=False)["module"]["head.prototypes.0"]
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(20))
    init = load_backbone_weights(tmp_path / "run" / "backbone_init.pt")
    final = load_backbone_weights(tmp_path / "run" / "backbone_final.pt")
    assert not torch.equal(init.stem.conv.weight, final.stem.conv.weight)
    for backbone in (final, None):
        results = evaluate(backbone, cfg, ("knn", "linear"))
        assert 0.1 <= results["knn_top1"] <= 1.0 and 0.1 <= results["linear_top1"] <= 1.0  # 10 classes, 40 images
        assert 0.0 < results["knn_top1_k200"] <= 1.0  # k capped at the 100 train images


def test_feature_cache_is_keyed_by_the_weights_file(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", "train.steps=1")
    pretrain(cfg)
    weights, cache_dir = tmp_path / "run" / "backbone_final.pt", tmp_path / "run" / "feature_cache"

    def test_features(backbone, config=cfg, **kwargs):
        return split_features(backbone, config, cache=FeatureCache.beside(weights), **kwargs)["test"][0]

    first = test_features(load_backbone_weights(weights))
    assert len(list(cache_dir.glob("*.pt"))) == 2  # train and test splits
    # Served from the cache: a backbone that would give other features is never run.
    scrambled = load_backbone_weights(weights)
    torch.nn.init.normal_(scrambled.stem.conv.weight)
    assert torch.equal(test_features(scrambled), first)
    # Other weights in the same file, or other preprocessing: extracted anew; caching off: nothing written.
    torch.save({**torch.load(weights, weights_only=True), "state_dict": scrambled.state_dict()}, weights)
    assert not torch.allclose(test_features(scrambled), first)
    assert test_features(scrambled, image_size=12).shape == first.shape
    assert len(list(cache_dir.glob("*.pt"))) == 6
    test_features(scrambled, tiny_config(shards, tmp_path / "run", "eval.feature_cache=false", "eval.image_size=8"))
    assert len(list(cache_dir.glob("*.pt"))) == 6


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
    cfg = tiny_config(shards, tmp_path / "run", "train.steps=3", "train.resume=never")
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
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "engine.training.pretrain",
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

    from engine.training.pretrain import Pretrainer

    common = ("optim.name=sgd", "train.steps=4", "model.channels_last=false")
    pretrain(tiny_config(shards, tmp_path / "stage0", *common))
    trainer = Pretrainer(tiny_config(shards, tmp_path / f"stage{stage}", *common, f"train.zero_stage={stage}"))
    head = trainer.model.head
    norms, normalize = [], head.normalize_prototypes

    def normalize_and_record(zero_stage):  # after every step: ZeRO's fp32 copy, gathered
        normalize(zero_stage)
        norms.append(safe_get_full_fp32_param(head.prototypes[0]).norm(dim=1))

    head.normalize_prototypes = normalize_and_record
    try:
        trainer.train()
    finally:
        trainer.close()
    assert len(norms) == 4
    for step_norms in norms:
        torch.testing.assert_close(step_norms, torch.ones(20))
    reference, sharded = final_weights(tmp_path / "stage0"), final_weights(tmp_path / f"stage{stage}")
    for name in reference:
        torch.testing.assert_close(sharded[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_deepspeed_does_not_clip_unless_asked(shards, tmp_path):
    from engine.training.pretrain import Pretrainer

    trainer = Pretrainer(tiny_config(shards, tmp_path / "noclip", "train.steps=1"))
    assert trainer.engine.gradient_clipping() == 0.0  # DeepSpeed's own default would be 1.0
    trainer.close()
    clipped = Pretrainer(tiny_config(shards, tmp_path / "clip", "train.steps=1", "optim.gradient_clipping=0.5"))
    assert clipped.engine.gradient_clipping() == 0.5
    clipped.close()


@pytest.mark.parametrize("stage", [0, 3])
def test_activation_checkpointing_trains_like_plain(shards, tmp_path, stage):
    """Recomputation in the backward pass (ZeRO-3: with parameters gathered again) changes nothing learned."""
    common = ("optim.name=sgd", "train.steps=3", "model.channels_last=false", f"train.zero_stage={stage}")
    pretrain(tiny_config(shards, tmp_path / "plain", *common))
    pretrain(tiny_config(shards, tmp_path / "checkpointed", *common, "model.activation_checkpointing=block"))
    reference, checkpointed = final_weights(tmp_path / "plain"), final_weights(tmp_path / "checkpointed")
    for name in reference:  # BN running statistics included: the recomputation does not update them again
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage,checkpointing", [(0, "none"), (2, "block")])
def test_bf16_autocast_through_deepspeed(shards, tmp_path, stage, checkpointing):
    from engine.training.pretrain import Pretrainer

    trainer = Pretrainer(tiny_config(shards, tmp_path / "bf16", "train.steps=2", f"train.zero_stage={stage}",
                                     "train.precision=bf16", f"model.activation_checkpointing={checkpointing}"))
    conv_dtypes = []
    trainer.model.backbone.stem.conv.register_forward_hook(lambda m, i, out: conv_dtypes.append(out.dtype))
    try:
        trainer.train()
    finally:
        trainer.close()
    assert conv_dtypes == [torch.bfloat16] * 4  # 2 steps x 2 crop sizes
    assert trainer.model.head.prototypes[0].dtype == torch.float32  # weights (and prototypes) stay fp32
    fp32 = pretrain(tiny_config(shards, tmp_path / "fp32", "train.steps=2", f"train.zero_stage={stage}"))
    losses = {run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("bf16", "fp32")}
    assert fp32["steps"] == 2 and losses["bf16"][0] != losses["fp32"][0]
    assert abs(losses["bf16"][0] - losses["fp32"][0]) < 0.05 * losses["fp32"][0]
