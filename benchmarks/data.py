"""Data-loading benchmark: img/s of the DALI multi-crop train loader vs a PyTorch DataLoader + Pillow doing the same
recipe with the same number of CPU threads (torchvision's transforms, and the DALI graph's own ops and colour maths),
side by side in one run.

    seer data tiles runs/tiles --count 2000 && seer data pack runs/tiles runs/tiles-shards --no-labels
    seer bench data runs/tiles-shards --threads 2                      # every provider, SEER's 6-crop recipe
    python -m benchmarks.data runs/tiles-shards --threads 2            # the same, without `seer`

Recipe: the DataConfig defaults, i.e. SEER's: 2×224 px crops at scale 0.14-1 and 4×96 px at 0.05-0.14, 3 channels,
colour jitter 0.8 (brightness, contrast, saturation 0.8, hue 0.2), grayscale 0.2, Gaussian blur 0.5 (sigma 0.1-2 px),
flip 0.5, ImageNet mean/std; crops delivered as the trainer gets them (float32, channels_last, CPU).
Providers:
- dali: dataloading.multicrop's CPU pipeline, num_threads = --threads, as training runs on these shards (written by
  `seer data pack`, which checked every JPEG: no per-sample guard while loading);
- dali_guarded: the same with the per-sample guard forced on, as for shards not written by `seer data pack`;
- pillow: dataloading.torch_baseline with torchvision's PIL transforms (as the SwAV code), --threads worker processes;
- pillow_dali_ops: the same DataLoader with the DALI graph's ops and maths (one colour matrix per crop on uint8 HWC,
  HWC float output), the peer that does what DALI does, so that the comparison is of the engines, not the recipes.
The main process runs torch with one thread. All loaders are built first, then timed in turns: --rounds rounds, each
timing --batches / --rounds batches of every provider, so that a drift of the machine's speed weighs on all alike.
Each turn starts with --warmup untimed batches (the first also covers the build and the workers' start-up), which
empty the loader's queue (DataLoader: 2 batches per worker; DALI: 2; the default, 2 × threads + 3, is more), and
ends with a pause as long as --warmup of its batches, in which the loader refills its queue without slowing the
next provider. img/s = timed batches × batch size / their wall time; p20/p50/p80 of the time between batches;
CPU ms per image = CPU time of this process and its children (DALI's threads, DataLoader workers) during the timed
batches / their images: what a provider costs, which other jobs on a shared machine disturb far less than wall time.
Records are appended to benchmarks/results/data_cpu.json under the current directory (or --out), one per provider,
with the command, the data (samples, mean image size and JPEG size), the guard's cost per image, machine (CPUs, and
other_jobs_cpu_share: the share of the machine's CPU time other processes used during the measurement), versions and
commit.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks.harness import RESULTS_DIR, append_records, environment, percentiles, script_main

PROVIDERS = ("dali", "dali_guarded", "pillow", "pillow_dali_ops")
PILLOW_OPS = {"pillow": "torchvision", "pillow_dali_ops": "dali"}  # provider -> PillowTrainLoader's ops
GUARD_SAMPLE = 256  # images on which the guard's cost per image is timed


def make_loader(provider: str, cfg, batch_size: int):
    from dataloading.multicrop import build_train_loader
    from dataloading.torch_baseline import PillowTrainLoader

    if provider in PILLOW_OPS:
        return PillowTrainLoader(cfg, batch_size=batch_size, ops=PILLOW_OPS[provider])
    return build_train_loader(cfg, batch_size=batch_size, guard=True if provider == "dali_guarded" else None)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads: DALI's) and of its child processes, live (DataLoader
    workers) or ended."""
    import psutil  # a dependency of DeepSpeed

    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def busy_cpu_seconds() -> float:
    """CPU time all processes on the machine have used since boot (all CPUs; idle, I/O wait and steal excluded)."""
    import psutil

    times = psutil.cpu_times()
    # Linux counts guest time within user time; steal is time the hypervisor gave to other machines.
    return times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)


def measure(providers, cfg, *, batch_size: int, batches: int, warmup: int, rounds: int) -> dict[str, dict]:
    """Each provider's img/s, measured in turns: every loader is built and warmed up, then each round times
    batches / rounds batches of each provider in turn, so that a drift of the machine's speed (~10% over minutes
    on a shared machine) weighs on all of them alike. After its timed batches a loader refills its queue in the
    background (DALI: 2 batches; DataLoader: 2 per worker), which would slow the next provider down: each turn
    ends with a pause as long as `warmup` of its batches. Each turn starts with `warmup` untimed batches, which
    empty the queue (its batches would count as instant). The CPU time spent during a provider's timed batches
    (this process and its children) is its cost: other jobs on a shared machine stretch wall time far more."""
    loaders, results = {}, {}
    for provider in providers:
        start = time.perf_counter()
        loaders[provider] = make_loader(provider, cfg, batch_size)
        for _ in range(warmup):
            next(loaders[provider])
        results[provider] = dict(warmup_s=time.perf_counter() - start, intervals=[], cpu_s=0.0)
    per_round = [batches // rounds + (r < batches % rounds) for r in range(rounds)]
    for round_batches in per_round:
        for provider, loader in loaders.items():
            for _ in range(warmup):
                next(loader)
            cpu_start, last, turn = cpu_seconds(), time.perf_counter(), []
            for _ in range(round_batches):
                next(loader)
                now = time.perf_counter()
                turn.append(now - last)
                last = now
            results[provider]["cpu_s"] += cpu_seconds() - cpu_start
            results[provider]["intervals"] += turn
            time.sleep(warmup * statistics.median(turn))  # the loader refills its queue undisturbed
    for provider, loader in loaders.items():
        intervals = results[provider].pop("intervals")
        q20, q50, q80 = percentiles(intervals)
        results[provider].update(img_per_s=batches * batch_size / sum(intervals), batch_s_p20=q20, batch_s_p50=q50,
                                 batch_s_p80=q80, cpu_ms_per_image=results[provider].pop("cpu_s") * 1e3 / (
                                     batches * batch_size), bad_samples=getattr(loader, "bad_samples", None))
    # DALI pipelines first: stopping DataLoader workers while DALI threads still refill their queues made a worker
    # abort on exit now and then ("terminate called without an active exception"), after the measurement.
    pillows = [loaders.pop(provider) for provider in PILLOW_OPS if provider in loaders]
    loaders.clear()
    for pillow in pillows:
        pillow.close()
    return results


def describe_shards(shards: str) -> dict:
    """Samples, mean image size and JPEG size (over the first GUARD_SAMPLE images), and the guard's cost per image."""
    from PIL import Image

    from dataloading.jpeg import jpeg_problem
    from dataloading.torch_baseline import ShardSamples

    samples = ShardSamples(shards, transform=bytes)
    encoded = [samples[i][0] for i in range(min(GUARD_SAMPLE, len(samples)))]
    sizes = [Image.open(io.BytesIO(data)).size for data in encoded]
    start = time.perf_counter()
    problems = [jpeg_problem(data) for data in encoded]
    guard_s = (time.perf_counter() - start) / len(encoded)
    return dict(shards=str(Path(shards).resolve()), samples=len(samples),
                image_width_mean=statistics.fmean(w for w, _ in sizes),
                image_height_mean=statistics.fmean(h for _, h in sizes),
                jpeg_kb_mean=statistics.fmean(len(d) for d in encoded) / 1024,
                guard_us_per_image=guard_s * 1e6, guard_rejects_in_sample=sum(p is not None for p in problems))


def benchmark(shards: str, *, providers, threads: int, batch_size: int, batches: int, warmup: int,
              rounds: int) -> list[dict]:
    import nvidia.dali
    import PIL
    import torch
    import torchvision

    from dataloading.config import DataConfig

    torch.set_num_threads(1)
    cfg = DataConfig(train_shards=shards, num_threads=threads)  # the defaults are SEER's recipe
    recipe = dict(crops=[dict(size=g.size, count=g.count, scale=list(g.scale)) for g in cfg.crops],
                  augment=vars(cfg.augment), channels=cfg.channels, output="float32, channels_last, cpu")
    common = dict(benchmark="data/multicrop", recipe=recipe, loader_threads=threads, batch_size=batch_size,
                  batches=batches, rounds=rounds, warmup_batches=warmup, **describe_shards(shards),
                  **environment(torch.device("cpu")), dali=nvidia.dali.__version__, pillow=PIL.__version__,
                  torchvision=torchvision.__version__, cpus=os.cpu_count())
    print(f"{', '.join(providers)}: {batches} timed batches of {batch_size} each, in {rounds} rounds of turns "
          f"(each turn after {warmup} untimed batches)", file=sys.stderr, flush=True)
    machine_start, ours_start, wall_start = busy_cpu_seconds(), cpu_seconds(), time.perf_counter()
    results = measure(providers, cfg, batch_size=batch_size, batches=batches, warmup=warmup, rounds=rounds)
    others = (busy_cpu_seconds() - machine_start) - (cpu_seconds() - ours_start)
    common["other_jobs_cpu_share"] = max(0.0, others) / ((time.perf_counter() - wall_start) * common["cpus"])
    return [dict(provider=provider, **results[provider], **common) for provider in providers]


def summary(records: list[dict]) -> str:
    first = records[0]
    lines = [f"data loading, SEER 6 crops (2x224 + 4x96), {first['loader_threads']} CPU threads, "
             f"batch {first['batch_size']}, "
             f"{first['samples']} JPEGs of ~{first['image_width_mean']:.0f}x{first['image_height_mean']:.0f} px "
             f"({first['jpeg_kb_mean']:.0f} KB), {first['device']}"]
    img_per_s = {r["provider"]: r["img_per_s"] for r in records}
    for r in records:
        lines.append(f"  {r['provider']:15} {r['img_per_s']:8.1f} img/s   batch p50 {r['batch_s_p50'] * 1e3:7.0f} ms   "
                     f"CPU {r['cpu_ms_per_image']:5.1f} ms per image")
    cpu = {r["provider"]: r["cpu_ms_per_image"] for r in records}
    for pillow in PILLOW_OPS:
        if "dali" in img_per_s and pillow in img_per_s:
            lines.append(f"  dali / {pillow}: {img_per_s['dali'] / img_per_s[pillow]:.2f}x img/s, "
                         f"{cpu['dali'] / cpu[pillow]:.2f}x CPU time per image")
    lines.append(f"  guard (jpeg_problem): {first['guard_us_per_image']:.0f} us per image")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="packed shard folder of real-photo JPEGs (seer data tiles, then seer data pack)")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch, each with all 6 crops")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per provider, over all rounds")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds in which every provider times batches / rounds batches in turn, so that a "
                             "drift of the machine's speed weighs on all alike")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches at the start of each turn (default 2 x threads + 3: build, start-up, "
                             "queued batches)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "data_cpu.json",
                        help="JSON file records are appended to (default: benchmarks/results/data_cpu.json under the "
                             "current directory)")


def run(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """Benchmark, append the records, print a summary (stderr) and a JSON line (stdout).

    `argv`: the arguments after `seer bench data`, stored with each record as the command that reproduces it."""
    warmup = 2 * args.threads + 3 if args.warmup is None else args.warmup
    if min(args.threads, args.batch_size, args.rounds) < 1 or args.batches < args.rounds or warmup < 0:
        raise ValueError("--threads, --batch-size and --rounds must be >= 1, --batches >= --rounds, --warmup >= 0")
    records = benchmark(args.shards, providers=list(dict.fromkeys(args.providers)), threads=args.threads,
                        batch_size=args.batch_size, batches=args.batches, warmup=warmup, rounds=args.rounds)
    command = "seer bench data " + shlex.join(argv)
    for record in records:
        record["command"] = command
    append_records(args.out, records)
    print(summary(records), file=sys.stderr)
    print(json.dumps({"out": str(args.out), **{r["provider"]: round(r["img_per_s"], 1) for r in records}}))
    return records


def main(argv: list[str] | None = None) -> None:
    script_main("benchmarks.data", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
