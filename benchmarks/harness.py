"""What every benchmark shares: the environment a record was measured in, records appended to a JSON list,
p20/p50/p80 of timings, where records go by default, and the script entry point."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from engine.provenance import checkout_git, git_commit

if TYPE_CHECKING:
    import torch

# Relative to the current directory: run from a checkout's root, records land in the committed benchmarks/results/;
# an installed package has no results folder of its own to write into.
RESULTS_DIR = Path("benchmarks") / "results"


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    """p20, p50 (the median) and p80 of `values`, interpolated linearly between the sorted values."""
    if not values:
        raise ValueError("percentiles of no values")
    ordered = sorted(values)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return at(0.2), at(0.5), at(0.8)


def environment(device: torch.device) -> dict:
    """Commit (when run from a checkout), versions, time and the device of a record."""
    import torch  # here: the parsers of the benchmarks that use this module stay free of torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    status = checkout_git("status", "--porcelain", "kernels")
    env = dict(commit=git_commit(),
               kernels_uncommitted_changes=None if status is None else bool(status),
               torch=torch.__version__, triton=triton_version, python=platform.python_version(),
               timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               float32_matmul_precision=torch.get_float32_matmul_precision())
    if device.type == "cuda":
        env.update(device_kind="cuda", device=torch.cuda.get_device_name(device))
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                cpu = next(x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name"))
        except (OSError, StopIteration):
            pass
        env.update(device_kind="cpu", device=f"CPU: {cpu}", threads=torch.get_num_threads())
    return env


def append_records(path: Path, records: list[dict]) -> Path:
    """Append `records` to the JSON list at `path` (created, with its folder, when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(previous + records, indent=1) + "\n")
    return path


def script_main(module: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace, list[str]], object], argv: list[str] | None) -> None:
    """`python -m benchmarks.MODULE ...` for a benchmark that also runs as `seer bench NAME`: run(args, argv), where
    argv (the arguments given) is recorded as the command that reproduces the result."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    run(parser.parse_intermixed_args(argv), argv)  # config overrides may follow options, as with `seer`
