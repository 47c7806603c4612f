"""Process-group set-up (one process or the DeepSpeed launcher's ranks) and a clean exit."""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        """The group Sinkhorn balances codes over: every rank, or None for a single process."""
        return dist.group.WORLD if self.world_size > 1 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or create) the default process group: NCCL on CUDA machines, gloo on CPU.

    Under the DeepSpeed launcher or torchrun the rank variables are set; a plain `python` / `seer` process
    becomes a world of one on a free local port.
    """
    import deepspeed  # heavy import, only where training starts

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def shutdown_and_exit(code: int) -> None:
    """Leave the process group and exit without running interpreter teardown.

    torch's gloo threads race at interpreter shutdown and abort ~10-25% of 2-rank runs with
    `terminate called without an active exception` (../shared/PLATFORM.md); a barrier, an explicit destroy and
    os._exit avoided it in ~90 runs.
    """
    gc.collect()
    if dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already died; the exit code below still reports this rank's outcome
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launched_arguments(prog: str, description: str, add_arguments: Callable, argv: list[str] | None):
    """The arguments of an entry point run by the DeepSpeed launcher, which also passes --local_rank."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_rank_and_exit(work: Callable[[], dict]) -> None:
    """A launched rank's whole life: run `work`, print its JSON result on rank 0, report an error, exit cleanly."""
    try:
        result = work()
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        code = 0
    except BaseException:  # print it here: shutdown_and_exit skips the interpreter's own report
        traceback.print_exc()
        code = 1
    shutdown_and_exit(code)
