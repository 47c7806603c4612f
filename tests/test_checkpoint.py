"""Checkpoints: torn saves are never used, kill -9 mid-save then auto-resume, resume at another world size.

Also a script for the DeepSpeed launcher: `deepspeed --num_gpus 2 tests/test_checkpoint.py OUT CONFIG...` trains each
config on 2 ranks, checkpoints, and continues on a fixed batch (the reference the 1-rank resume is compared with).
"""
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_optimizer_state
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from dataloading.sources import load_idx
from engine.training.checkpoint import CheckpointWarning, Checkpointer, _writer, read_manifest
from engine.training.zero_state import consolidate, consolidated_weights
from engine.config import load_config
from engine.distributed import all_reduce_mean, free_port
from engine.training.pretrain import Pretrainer, pretrain
from tiny_run import REPO, child_env, final_weights, tiny_config

STEP_DIR = "step_" + "[0-9]" * 8


def test_incomplete_checkpoints_are_never_used(shards, tmp_path):
    extra = ("train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    run = tmp_path / "run"
    pretrain(tiny_config(shards, run, *extra))
    ckpt, checkpointer = run / "checkpoints", Checkpointer(run / "checkpoints", rank=0, world_size=1)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002", "step_00000003", "step_00000004"]
    assert checkpointer.complete_steps() == [2, 3, 4] and checkpointer.resume_tag("auto") == "step_00000004"
    finished = final_weights(run)

    # What a crash can leave: a file cut short (step 4, named by `latest`), a folder without its manifest (step 3),
    # a save in progress (step 5).
    states = ckpt / "step_00000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    (ckpt / "step_00000003" / "complete.json").unlink()
    shutil.copytree(ckpt / "step_00000002", ckpt / "step_00000005.partial")
    assert checkpointer.complete_steps() == [2]
    with pytest.warns(CheckpointWarning, match="'step_00000004', which is not a complete checkpoint"):
        assert checkpointer.resume_tag("must") == "step_00000002"
    with pytest.raises(FileExistsError, match="pass --resume"):
        checkpointer.resume_tag("never")

    with pytest.warns(CheckpointWarning, match="resuming from the newest complete one, step_00000002"):
        assert pretrain(tiny_config(shards, run, *extra))["steps"] == 4  # train.resume=auto, the default
    for name, value in finished.items():  # the resumed run redid steps 3 and 4 exactly
        torch.testing.assert_close(final_weights(run)[name], value, rtol=0, atol=1e-6, msg=name)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002", "step_00000003", "step_00000004"]
    assert checkpointer.complete_steps() == [2, 3, 4]

    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        Checkpointer(tmp_path / "empty", rank=0, world_size=1).resume_tag("must")


def _kill_during_save(command, ckpt: Path, min_step: int, wait_for: str | None, log: Path) -> str | None:
    """Start a training process and kill -9 it while it writes a checkpoint of step >= min_step (once `wait_for`
    exists in the folder being written, if given). Returns the folder it was writing; None if that save committed
    before the kill landed."""
    launched = time.time_ns()
    with open(log, "ab") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    while process.poll() is None:
        for partial in ckpt.glob(STEP_DIR + ".partial"):
            try:
                fresh = partial.stat().st_mtime_ns >= launched  # not one a previous kill left behind
                ready = wait_for is None or (partial / wait_for).exists()
            except FileNotFoundError:  # committed or removed meanwhile
                continue
            if fresh and ready and int(partial.name[5:13]) >= min_step:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return partial.name if partial.exists() else None
        time.sleep(0.0005)
    raise AssertionError(f"the run ended (rc {process.returncode}) before a save of step >= {min_step} could be "
                         f"interrupted: {log.read_text()[-3000:]}")


def test_kill_9_mid_save_then_auto_resume_equals_uninterrupted(shards, tmp_path):
    extra = ("train.steps=12", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    pretrain(tiny_config(shards, tmp_path / "straight", *extra))
    run = tmp_path / "killed"
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(shards, run, *extra).to_dict()))
    command = [sys.executable, "-m", "engine.training.pretrain", "--config", str(config_file)]
    ckpt, checkpointer = run / "checkpoints", Checkpointer(run / "checkpoints", rank=0, world_size=1)

    # First as soon as a save has begun, then once DeepSpeed has started writing its model-states file.
    for min_step, wait_for in ((4, None), (7, "mp_rank_00_model_states.pt")):
        for _ in range(3):  # a kill can land just after the save committed: then the next launch tries again
            torn = _kill_during_save(command, ckpt, min_step, wait_for, tmp_path / "killed.log")
            if torn is not None:
                break
        assert torn is not None, "three kills in a row landed after the save had committed"
        torn_step = int(torn[5:13])
        # Every folder that looks like a checkpoint is complete; the interrupted one is not among them.
        assert all(read_manifest(path) is not None for path in ckpt.glob(STEP_DIR))
        assert checkpointer.complete_steps() and max(checkpointer.complete_steps()) < torn_step
        assert checkpointer.resume_tag("auto") == f"step_{torn_step - 1:08d}"

    assert pretrain(tiny_config(shards, run, *extra))["steps"] == 12  # the same auto-resume, in this process
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == ["step_00000011", "step_00000012"]
    assert (ckpt / "latest").read_text() == "step_00000012"
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(run)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------- another world size
CHANGED_WORLD = ("optim.name=sgd", "train.steps=8", "train.batch_size=8", "train.keep_checkpoints=1")
WARM_STEPS = 3  # steps before the checkpoint; the prototypes (frozen for 2) have momentum by then


def fixed_batch(rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's share of 16 Fashion-MNIST test images as the tiny config's 2x16 px + 2x8 px crops."""
    images = torch.tensor(load_idx("fashion-mnist", "test")[0][:16]).float().div(255).unsqueeze(1)
    images = (images - 0.286) / 0.353
    images = images.chunk(world_size)[rank]
    return [F.interpolate(images, size=16, mode="bilinear"), F.interpolate(images.flip(3), size=16, mode="bilinear"),
            F.interpolate(images, size=8, mode="bilinear"),
            F.interpolate(images[..., 4:24, 4:24], size=8, mode="bilinear")]


def snapshot(trainer: Pretrainer) -> dict:
    """Parameters and buffers (full at ZeRO 0-2) and each parameter's full momentum buffer (collective)."""
    momentum, zero = {}, trainer.engine.optimizer
    if trainer.cfg.train.zero_stage > 0:
        # DeepSpeed links its per-parameter views of optimizer state once, at the first step: state created later
        # (the prototypes', after their frozen steps) or loaded before any step would not be seen. Link it now.
        for lp_params, partition in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(lp_params, partition, zero.optimizer.state)
    for name, p in trainer.model.named_parameters():
        momentum[name] = (zero.state[p]["momentum_buffer"] if trainer.cfg.train.zero_stage == 0
                          else safe_get_full_optimizer_state(p, "momentum_buffer")).detach().clone()
    return {"state": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, "momentum": momentum}


def continue_on_fixed_batch(trainer: Pretrainer) -> dict:
    """Two more steps on the fixed batch: their losses and the state after them."""
    losses = []
    for _ in range(2):
        loss = trainer.train_step(trainer.step, {"crops": fixed_batch(trainer.dist.rank, trainer.dist.world_size)})["loss"]
        losses.append(all_reduce_mean(loss.detach()).item())  # each rank's loss is over its own share
        trainer.step += 1
    return {"losses": losses, **snapshot(trainer)}


def two_rank_reference(out_dir: str, config_files: list[str]) -> None:
    """Launcher entry: per config, train WARM_STEPS steps on 2 ranks, checkpoint, continue on the fixed batch
    (ZeRO-3: checkpoint only, its checkpoints are read back by name but not resumed at another world size)."""
    for config_file in config_files:
        trainer = Pretrainer(load_config(config_file, ()))
        batches = iter(trainer.loader)
        for _ in range(WARM_STEPS):
            trainer.train_step(trainer.step, next(batches))
            trainer.step += 1
        trainer.save_checkpoint()
        if trainer.cfg.train.zero_stage == 3:
            trainer.close()
            continue
        record = {"at_save": snapshot(trainer), "continued": continue_on_fixed_batch(trainer)}
        if trainer.dist.is_main:
            torch.save(record, Path(out_dir) / f"{Path(config_file).stem}.pt")
        trainer.close()


def assert_same(actual: dict, expected: dict, tolerance: float, what: str) -> None:
    """Every tensor within tolerance * max(1, its largest magnitude); tolerance 0: bit for bit."""
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        atol = tolerance * max(1.0, value.float().abs().max().item())
        torch.testing.assert_close(actual[name], value, rtol=0, atol=atol, msg=f"{what}: {name}")


def test_each_file_is_reported_by_the_rank_that_writes_it():
    assert [_writer(name) for name in ("trainer_rank00003.pt", "mp_rank_00_model_states.pt",
                                       "zero_pp_rank_12_mp_rank_00_optim_states.pt",
                                       "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt")] == [3, 0, 12, 2]


def test_two_ranks_resume_on_one_rank(shards, tmp_path):
    stages = (0, 2)
    config_files = []
    # ZeRO-3 too, with a 15-d embedding: the head's bias (15 values) is split unevenly over the 2 ranks.
    for stage, extra in ((0, ()), (2, ()), (3, ("model.embedding_dim=15",))):
        cfg = tiny_config(shards, tmp_path / f"zero{stage}", *CHANGED_WORLD, f"train.zero_stage={stage}", *extra)
        config_files.append(tmp_path / f"zero{stage}.yaml")
        config_files[-1].write_text(yaml.safe_dump(cfg.to_dict()))
    launcher = Path(sys.executable).parent / "deepspeed"
    run = subprocess.run(
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(Path(__file__)), str(tmp_path),
         *map(str, config_files)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # ZeRO-3 (what `seer export` reads): the weights by name equal DeepSpeed's own reconstruction; no resharding.
    tag_dir = tmp_path / "zero3" / "checkpoints" / f"step_{WARM_STEPS:08d}"
    manifest = read_manifest(tag_dir)
    assert manifest["zero_stage"] == 3 and manifest["world_size"] == 2
    weights = consolidated_weights(tag_dir, manifest)
    assert any(value.shape == (15,) for value in weights.values())  # the projection's last bias
    assert_same(weights, get_fp32_state_dict_from_zero_checkpoint(tag_dir.parent, tag=tag_dir.name), 0, "zero3")
    with pytest.raises(ValueError, match="ZeRO stage 3 by 2 rank.*only stages 0-2 can change world size"):
        consolidate(tag_dir, manifest)

    for stage in stages:
        reference = torch.load(tmp_path / f"zero{stage}.pt", weights_only=False)
        tag_dir = tmp_path / f"zero{stage}" / "checkpoints" / f"step_{WARM_STEPS:08d}"
        assert sorted(p.name for p in tag_dir.glob("trainer_rank*.pt")) == [f"trainer_rank0000{r}.pt" for r in (0, 1)]
        # The manifest holds every file with its size, as reported by the rank that wrote it.
        on_disk = {p.name: p.stat().st_size for p in tag_dir.iterdir() if p.name != "complete.json"}
        assert read_manifest(tag_dir)["files"] == on_disk
        assert any(name.startswith("zero_pp_rank_1") for name in on_disk) == (stage > 0)
        # The checkpoint, by name, is exactly what the 2 ranks held; for ZeRO-2 the weights also match DeepSpeed's
        # own reconstruction from the partitions.
        saved = consolidate(tag_dir, read_manifest(tag_dir))
        assert_same({**saved["params"], **saved["buffers"]}, reference["at_save"]["state"], 0, f"zero{stage} saved")
        assert_same(saved["optimizer"]["momentum_buffer"], reference["at_save"]["momentum"], 0, f"zero{stage} momentum")
        assert_same(consolidated_weights(tag_dir, read_manifest(tag_dir)), reference["at_save"]["state"], 0,
                    f"zero{stage} weights")
        if stage == 2:
            assert_same(saved["params"], {k: v for k, v in get_fp32_state_dict_from_zero_checkpoint(
                tag_dir.parent, tag=tag_dir.name).items() if k in saved["params"]}, 0, "zero_to_fp32")
            # Read where used: values are views of the memory-mapped rank files (Linux: /proc/self/maps lists the
            # mappings), except the one per group and rank boundary that straddles two ranks' slices (copied).
            groups = len(torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["param_shapes"])
            mapped = [tuple(int(a, 16) for a in line.split()[0].split("-"))
                      for line in Path("/proc/self/maps").read_text().splitlines()
                      if line.endswith("_optim_states.pt") and str(tag_dir) in line]
            for values in (saved["params"], saved["optimizer"]["momentum_buffer"]):
                copied = sum(not any(lo <= v.data_ptr() < hi for lo, hi in mapped) for v in values.values())
                assert copied <= groups and len(values) - copied > 10, (copied, len(values))

        # One rank with twice the per-rank batch: the same global batch, so the same lr schedule; BatchNorm
        # statistics span all ranks (model.sync_bn_group_size), so the fixed batch gives the same statistics.
        with pytest.warns(CheckpointWarning) as caught:
            trainer = Pretrainer(tiny_config(shards, tmp_path / f"zero{stage}", *CHANGED_WORLD,
                                             f"train.zero_stage={stage}", "train.batch_size=16"))
        messages = " | ".join(str(w.message) for w in caught)
        assert f"written by 2 rank(s) at ZeRO stage {stage}; resuming with 1 at stage {stage}" in messages
        assert "changed config: train.batch_size 8 -> 16" in messages
        assert "global batch changes" not in messages  # 2 x 8 -> 1 x 16 images: the same lr
        try:
            assert trainer.step == WARM_STEPS and trainer.engine.global_steps == WARM_STEPS
            loaded = snapshot(trainer)
            assert_same(loaded["state"], reference["at_save"]["state"], 0, f"zero{stage} loaded")
            assert_same(loaded["momentum"], reference["at_save"]["momentum"], 0, f"zero{stage} loaded momentum")
            continued = continue_on_fixed_batch(trainer)
        finally:
            trainer.close()
        # The resumed state was bit-identical; from here 1 rank sums in another order than 2 ranks' all-reduces
        # (fp32 rounding, amplified ~20x by Sinkhorn's exp(scores / epsilon)): measured <= 1.2e-6 relative on the
        # losses and <= 6e-5 of a tensor's largest value. Zeroing the loaded momentum, or restarting the lr schedule at
        # step 0, moves the second loss by 0.05-0.1 and the state by 0.1-0.4 of a tensor's largest value (measured).
        assert continued["losses"] == pytest.approx(reference["continued"]["losses"], rel=1e-5)
        assert_same(continued["state"], reference["continued"]["state"], 1e-4, f"zero{stage} continued")
        assert_same(continued["momentum"], reference["continued"]["momentum"], 1e-4, f"zero{stage} continued momentum")

    # Half the global batch on one rank: the lr (per 256 images) halves, and the warning says so; images_seen
    # continues from the 2-rank run's count instead of restarting from step x the new batch.
    with pytest.warns(CheckpointWarning) as caught:
        trainer = Pretrainer(tiny_config(shards, tmp_path / "zero0", *CHANGED_WORLD, "train.batch_size=8"))
    try:
        messages = " | ".join(str(w.message) for w in caught)
        peak = trainer.cfg.optim.lr / 256
        assert "the global batch changes from 16 to 8 images per step" in messages
        assert f"the peak learning rate goes from {peak * 16:g} to {peak * 8:g}" in messages
        assert trainer.images_seen(WARM_STEPS) == WARM_STEPS * 16 and trainer.images_seen(WARM_STEPS + 2) == 64
    finally:
        trainer.close()


if __name__ == "__main__":
    import traceback

    from engine.distributed import shutdown_and_exit

    arguments = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank
    try:
        two_rank_reference(arguments[0], arguments[1:])
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    shutdown_and_exit(code)

