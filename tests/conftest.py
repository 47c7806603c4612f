"""Test-session set-up: Triton kernels run in its interpreter (no GPU here), and a clean gloo shutdown."""
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
