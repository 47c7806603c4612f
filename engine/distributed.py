"""Process-group set-up (one process or the DeepSpeed launcher's ranks) and a clean exit."""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
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
    becomes a world of one.
    """
    import deepspeed  # heavy import, only where training starts

    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if alone and not dist.is_initialized():
        # A world of one meets itself through a file: a free port picked first could be taken by another process
        # before it is bound (seen with several runs starting at once on one machine).
        rendezvous = tempfile.mkdtemp(prefix="seer-rendezvous-")
        dist.init_process_group(backend, init_method=f"file://{rendezvous}/store", rank=0, world_size=1)
    if not deepspeed.comm.is_initialized():
        # dist_init_required=False: DeepSpeed adopts the group made above instead of looking for the launcher's
        # variables (and, without them, for MPI).
        deepspeed.init_distributed(dist_backend=backend, verbose=False, dist_init_required=not alone)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def parameter_checksum(params) -> torch.Tensor:
    """Sum and sum of squares of all parameters, in fp64: equal on every rank while data parallelism is in sync.
    No copy of a parameter is made (a sum and a dot product each)."""
    params = list(params)
    sums = torch.zeros(2, dtype=torch.float64, device=params[0].device if params else "cpu")
    for p in params:
        flat = p.detach().reshape(-1)
        sums += torch.stack([flat.sum(dtype=torch.float64), torch.dot(flat, flat).double()])
    return sums


def rank_divergence(params, device: torch.device) -> float:
    """Largest difference between any rank's parameter checksum and rank 0's (collective; 0 when in sync): two fp64
    numbers per rank gathered, where comparing the parameters themselves would cost full copies of the model."""
    sums = parameter_checksum(params).to(device)
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def shutdown_and_exit(code: int) -> None:
    """Leave the process group and exit without running interpreter teardown.

    torch's gloo threads race at interpreter shutdown and abort ~10-25% of 2-rank runs with
    `terminate called without an active exception` (../shared/PLATFORM.md); a barrier, an explicit destroy and
    os._exit avoided it in ~90 runs. A failing rank skips the barrier: its peers are in a training collective, not
    here, and would hold it until the collective's timeout; it exits at once, and the launcher (DeepSpeed's,
    torchrun, `srun --kill-on-bad-exit=1`) ends the other ranks.
    """
    gc.collect()
    if code == 0 and dist.is_initialized():
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


def run_rank_and_exit(work: Callable[[], dict | None]) -> None:
    """A process's whole life (a launched rank, or the `seer` command): run `work`, print its JSON result on rank 0,
    report an error (one line for a user's error, prefixed with the rank in a job of several), and exit at once:
    0 done, 2 a user's error, 1 anything else."""
    try:
        result = work()
        if result is not None and int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        code = 0
    except BaseException as err:  # reported here: shutdown_and_exit skips the interpreter's own report
        from engine.errors import USER_ERRORS, error_report

        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"seer [rank {os.environ.get('RANK', '0')}]" if world > 1 else "seer"
        print(error_report(err, prefix), file=sys.stderr)
        code = 2 if isinstance(err, USER_ERRORS) else 1
    shutdown_and_exit(code)
