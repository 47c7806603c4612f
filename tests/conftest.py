"""Test-session set-up: Triton kernels run in its interpreter (no GPU here), a clean gloo shutdown, and the tiny runs
that several test files read, each trained once per session."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module imports triton
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

_exit_status = 0


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Packed real Fashion-MNIST shards {"train": dir, "test": dir}, made once per test session."""
    from tiny_run import pack_class_folders

    return pack_class_folders(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="session")
def reference_run(shards, tmp_path_factory):
    """pretrain's result for the tiny config as it is (tiny_run.TINY: 6 steps, checkpoints at steps 3 and 6).

    Shared by every test that reads it: copy result["output_dir"] before changing anything in it.
    """
    from engine.training.pretrain import pretrain
    from tiny_run import tiny_config

    return pretrain(tiny_config(shards, tmp_path_factory.mktemp("reference") / "run"))


@pytest.fixture(scope="session")
def two_rank_run(shards, tmp_path_factory):
    """(output dir, completed launcher process) of 2 ranks pretraining 4 steps through the DeepSpeed launcher.

    Checkpoints and online kNN every 2 steps; collapse thresholds that flag every window, so that the one warning
    names the size of the histogram summed over the ranks.
    """
    from tiny_run import launch_two_ranks, tiny_config

    root = tmp_path_factory.mktemp("two_ranks")
    cfg = tiny_config(shards, root / "run", "train.steps=4", "train.checkpoint_every=2", "monitor.knn_every=2",
                      "monitor.collapse_min_entropy=1", "monitor.collapse_check_from_step=0",
                      "monitor.collapse_patience=1")
    launched = launch_two_ranks(cfg, root / "tiny.yaml")
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    return root / "run", launched


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config):
    """After pytest's summary: leave the process group and exit, keeping pytest's exit code.

    In-process training tests create a gloo group whose threads can abort the interpreter at teardown
    (see engine.distributed.shutdown_and_exit).
    """
    import sys

    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_initialized():
            from engine.distributed import shutdown_and_exit

            shutdown_and_exit(_exit_status)
