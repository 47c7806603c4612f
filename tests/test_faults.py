"""Faults users meet at scale, injected for real: a rank failing at start-up or mid-training, a loss going NaN.
The job ends in seconds with a non-zero code and the failing rank's message; no poison is kept."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine.distributed import free_port, parameter_checksum
from engine.training.checkpoint import read_manifest
from engine.training.pretrain import pretrain
from tiny_run import REPO, child_env, tiny_config

FAST = 60  # seconds: a failed job must end well inside gloo's 10-minute collective timeout


def start_two_ranks(cfg, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    launcher = Path(sys.executable).parent / "deepspeed"
    job = subprocess.Popen(
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "engine.training.pretrain",
         "--config", str(config_file)],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return job, config_file


def wait_for_end(job: subprocess.Popen, started: float) -> tuple[int, str, float]:
    try:
        out, err = job.communicate(timeout=FAST + 60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        pytest.fail(f"the job still ran {FAST + 60} s after the fault:\n{err[-3000:]}")
    return job.returncode, out + err, time.monotonic() - started


def wait_for_records(run_dir: Path, count: int, job: subprocess.Popen) -> None:
    """Until the run has logged `count` steps (the ranks are past start-up, inside training)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)
    pytest.fail(f"the run never logged {count} steps: {job.poll()=}")


def test_a_rank_failing_at_start_up_ends_the_job_with_its_message(shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # Rank 0 creates the run folder, under a file: it fails after the ranks have joined, while rank 1 goes on.
    job, _ = start_two_ranks(tiny_config(shards, blocker / "run", "train.steps=50"), tmp_path)
    code, output, seconds = wait_for_end(job, time.monotonic())
    assert code != 0 and seconds < FAST, (code, seconds, output[-3000:])
    errors = [line for line in output.splitlines() if "error:" in line]
    assert errors and errors[0].startswith("seer [rank 0]: error: [Errno 20] Not a directory"), output[-3000:]
    assert "Traceback" not in output.split(errors[0])[0][-2000:]  # a user's error: one line, no traceback


def test_a_rank_raising_mid_training_ends_the_job(shards, tmp_path):
    run = tmp_path / "run"
    job, _ = start_two_ranks(tiny_config(shards, run, "train.steps=1000", "train.checkpoint_every=8"), tmp_path)
    wait_for_records(run, 1, job)
    # The checkpoint folder turns into a file (a failing file system): rank 0 raises at its next save, while rank 1
    # waits for it in a collective.
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    (run / "checkpoints").write_text("")
    started = time.monotonic()
    code, output, seconds = wait_for_end(job, started)
    assert code != 0 and seconds < FAST, (code, seconds, output[-3000:])
    assert "seer [rank 0]: error:" in output and "checkpoints" in output


def test_nan_stops_before_the_step_and_never_becomes_a_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(shards, run, "optim.lr=1e9", "swav.freeze_prototypes_steps=0", "train.steps=20",
                      "train.checkpoint_every=3", "train.log_every=5")
    with pytest.raises(FloatingPointError, match=r"loss is not finite at step (\d+).*diagnostics .* in ") as caught:
        pretrain(cfg)
    step = int(caught.value.args[0].split("step ")[1].split()[0])
    diagnostics = json.loads((run / f"nonfinite_step_{step:08d}.json").read_text())
    assert diagnostics["step"] == step and not all(map(lambda x: x == x, diagnostics["loss_per_rank"]))  # NaN
    assert {"embeddings", "heads", "lr", "parameters_non_finite", "gradients_non_finite"} <= set(diagnostics)
    assert diagnostics["heads"][0]["scores"].keys() == {"non_finite", "min", "max"}
    latest = run / "checkpoints" / "latest"
    if latest.exists():  # every checkpoint that exists holds finite weights
        tag_dir = run / "checkpoints" / latest.read_text().strip()
        assert read_manifest(tag_dir) is not None
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_checksums_tell_diverged_parameters_apart():
    params = [torch.randn(5, 3), torch.randn(7)]
    same = [p.clone() for p in params]
    assert torch.equal(parameter_checksum(params), parameter_checksum(same))
    same[1][4] += 1e-6
    assert not torch.equal(parameter_checksum(params), parameter_checksum(same))
