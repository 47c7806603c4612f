"""Training-step benchmark: img/s, TFLOP/s, MFU and peak memory of real SwAV steps on synthetic crops.

    seer bench train --config engine/configs/demo.yaml --steps 5 train.batch_size=32     # CPU: the demo's model
    seer bench train --config engine/configs/seer_regnety_256gf.yaml --steps 20          # GPU: SEER's run
    python -m benchmarks.train --config FILE [section.key=value ...]                      # the same, without `seer`

The run is a Config, loaded as for `seer pretrain` (--config FILE and section.key=value overrides): model.* (backbone,
head, prototypes, channels_last, activation_checkpointing), data.crops and data.channels, train.batch_size (images
per step), train.precision (bf16 autocast or fp32), optim.* and swav.* (swav.backend: the loss kernels, auto =
Triton on CUDA). The step runs in one process at ZeRO 0, whatever train.zero_stage says.

What one step is: pretraining's step (engine.training.pretrain.SwAVTraining, run by engine.training.loop as in
`seer pretrain`): the engine's SwAV model (backbone, projection head, fp32 prototypes, the SwAV loss of `kernels`)
on a DeepSpeed engine at ZeRO 0 in one process, forward under bf16 autocast (train.precision=bf16) or in fp32,
backward, the engine's LARS step (every group at the peak lr, prototypes not frozen) and the prototype
re-normalisation. Inputs: synthetic normal-noise crops of the recipe, created once on the device: data loading is
excluded (`seer bench data` measures it). The first --warmup steps are not timed; each timed step ends when its loss
reaches the host.

Reported (appended to benchmarks/results/train_<backbone>_<device>.json under the current directory, or --out, one
record per run, with the command):
- img/s: images (each with all its crops) per second over the timed steps; step time p20/p50/p80.
- FLOPs per step: torch.utils.flop_counter over forward + backward of one step of the same model on the meta
  device (engine.plan.train_flops: model FLOPs, 2 per multiply-add, grouped-convolution backward counted right,
  activation-checkpointing recompute and the optimizer not counted). TFLOP/s = FLOPs per step / p50 step time.
- MFU = TFLOP/s / peak: dense tensor-core peak of the GPU from PEAK_TFLOPS (bf16; fp32 runs use the TF32 peak,
  as cuDNN convolutions use TF32 by default), or --peak-tflops. On CPU MFU is not applicable unless --peak-tflops.
- Memory. CUDA: torch.cuda.max_memory_allocated over the timed steps; `static_bytes` is what is allocated when a
  step starts (weights, momentum, crops), `step_peak_bytes` the peak above it (activations, gradients, temporaries).
  CPU: `step_peak_bytes` is the peak of torch's CPU allocations during one extra step, from torch.profiler's
  allocation events (engine.plan.cpu_peak_bytes); `static_bytes` is the bytes of weights, optimizer state and crops.
  Beside them, the plan's figures for the same run (engine.plan at ZeRO 0 on one GPU, same precision), so a GPU run
  checks the capacity model.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import shlex
import sys
from pathlib import Path

import torch

from benchmarks.harness import RESULTS_DIR, append_records, environment, percentiles, script_main
from engine import plan as capacity
from engine.config import Config, load_config
from engine.training import loop
from engine.training.pretrain import SwAVTraining
from engine.training.runtime import Runtime

# Dense tensor-core peak TFLOP/s by device-name fragment (first match wins): bf16 (V100: fp16, it has no bf16), and
# TF32 for fp32 runs (V100 has no TF32: its fp32 peak).
PEAK_TFLOPS = {
    "bf16": {"H200": 989.0, "H100": 989.0, "A100": 312.0, "V100": 125.0},
    "fp32": {"H200": 494.5, "H100": 494.5, "A100": 156.0, "V100": 15.7},
}


def device_tag(device: torch.device) -> str:
    """'cpu', or the GPU's name in lower case with runs of other characters as '_' (e.g. nvidia_h200)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def peak_tflops(device: torch.device, precision: str, override: float | None) -> tuple[float | None, str]:
    """The peak the MFU is relative to, and where it came from."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "not applicable on CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for fragment, value in PEAK_TFLOPS[precision].items():
        if fragment in name:
            return value, f"table: {fragment} {precision} dense"
    return None, f"unknown GPU {name!r} (pass --peak-tflops)"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Timings(list):
    """Metrics records of the training loop, kept in memory (the loop's `metrics`)."""

    def write(self, step: int, **record: float) -> None:
        self.append(record)


def bench_config(cfg: Config, steps: int) -> Config:
    """`cfg` as the benchmark runs it: one process at ZeRO 0, every group at the peak lr from the first step
    (prototypes not frozen), no progress bar."""
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, zero_stage=0, steps=steps, progress=False),
        optim=dataclasses.replace(cfg.optim, warmup_steps=0, final_lr_fraction=1.0),
        swav=dataclasses.replace(cfg.swav, freeze_prototypes_steps=0))


def static_bytes(task: SwAVTraining, crops: list[torch.Tensor]) -> int:
    """Weights, optimizer state and crops: what stays allocated between steps."""
    state = [t for s in task.engine.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return _tensor_bytes(list(task.model.parameters()) + list(task.model.buffers()) + state + crops)


def benchmark(cfg: Config, *, steps: int, warmup: int, device: str | None = None, peak: float | None = None,
              threads: int | None = None) -> dict:
    """One record: speed, FLOPs, MFU and memory of `steps` timed training steps of the run `cfg`."""
    precision, batch = cfg.train.precision, cfg.train.batch_size
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision={precision}: seer bench train runs bf16 (autocast) or fp32")
    if steps < 1 or warmup < 1:
        # At least one warm-up step: the first one creates the momentum buffers (and compiles Triton kernels).
        raise ValueError(f"--steps and --warmup must be >= 1, got {steps} and {warmup}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if threads:
        torch.set_num_threads(threads)
    # On the meta device, before anything is allocated: FLOPs, the capacity model's figures (of this one-process
    # ZeRO-0 step), and a clear error for an unknown backbone.
    plan = capacity.plan(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=0)), gpus=1,
                         gpu_mem_gib=1.0)
    flops = plan["train_flops_per_image"] * batch

    cfg = bench_config(cfg, warmup + steps)
    task = SwAVTraining(cfg, Runtime(cfg.train, channels_last=cfg.model.channels_last,
                                     gradient_clipping=cfg.optim.gradient_clipping))
    if task.dist.device != dev:
        raise ValueError(f"--device {dev.type}: training runs on {task.dist.device} in this process")
    batch_of_crops = {"crops": capacity.synthetic_crops(cfg.data, batch, dev)}
    batches = itertools.repeat(batch_of_crops)
    records = Timings()

    def run_steps(start: int, end: int) -> None:
        loop.train(task, batches, dist=task.dist, start=start, steps=end, log_every=1, images_per_step=batch,
                   metrics=records, progress=False, desc="bench train")

    run_steps(0, warmup)
    if dev.type == "cuda":
        static = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    run_steps(warmup, warmup + steps)
    # Each record is one step, timed to the loss's arrival on the host (the loop waits for it).
    times = [batch / r["img_per_s"] for r in records[warmup:]]
    losses = [r["loss"] for r in records]
    if dev.type == "cuda":
        memory = {"method": "torch.cuda.max_memory_allocated over the timed steps", "static_bytes": static,
                  "step_peak_bytes": torch.cuda.max_memory_allocated(dev) - static}
    else:
        memory = {"method": "torch.profiler CPU allocation events over one extra step (engine.plan.cpu_peak_bytes)",
                  "static_bytes": static_bytes(task, batch_of_crops["crops"]),
                  "step_peak_bytes": capacity.cpu_peak_bytes(lambda: task.train_step(warmup + steps - 1,
                                                                                     batch_of_crops))}
    plan_bytes = plan["bytes"]
    memory["plan"] = {
        "precision": plan["precision"],
        "static_bytes": plan_bytes["weights"] + plan_bytes["optimizer"],
        "step_peak_bytes": plan_bytes["gradients"] + plan_bytes["autocast_weight_copies"] + plan_bytes["activations"],
        "activation_bytes": plan_bytes["activations"],
    }
    memory["peak_bytes"] = memory["static_bytes"] + memory["step_peak_bytes"]

    p20, p50, p80 = percentiles(times)
    achieved = flops / p50 / 1e12
    peak_value, peak_source = peak_tflops(dev, precision, peak)
    return {
        "benchmark": "train",
        "preset": cfg.model.backbone,
        "parameters": plan["parameters"],
        "batch": batch,
        "crops": plan["crops"],
        "channels": cfg.data.channels,
        "precision": precision,
        "channels_last": cfg.model.channels_last,
        "checkpointing": cfg.model.activation_checkpointing,
        "loss_backend": cfg.swav.backend,
        "head": plan["head"],
        "steps": steps,
        "warmup_steps": warmup,
        "step": "engine.training.pretrain.SwAVTraining through engine.training.loop: DeepSpeed engine at ZeRO 0, "
                "one process",
        "data": "synthetic crops created once on the device: data loading excluded",
        "img_per_s": batch * steps / sum(times),
        "step_ms_p20": 1e3 * p20,
        "step_ms_p50": 1e3 * p50,
        "step_ms_p80": 1e3 * p80,
        "flops_per_step": flops,
        "flops_per_image": flops / batch,
        "tflops_achieved": achieved,
        "peak_tflops": peak_value,
        "peak_tflops_source": peak_source,
        "mfu": achieved / peak_value if peak_value else None,
        "memory": memory,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "device_tag": device_tag(dev),
        "threads": torch.get_num_threads(),
        **environment(dev),
    }


def write_record(record: dict, out: Path | None) -> Path:
    """Append `record` to `out` (default benchmarks/results/train_<backbone>_<device>.json under the current
    directory, a JSON list)."""
    return append_records(out or RESULTS_DIR / f"train_{record['preset']}_{record['device_tag']}.json", [record])


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def summary(record: dict) -> str:
    mem = record["memory"]
    mfu = f"{100 * record['mfu']:.1f}% MFU" if record["mfu"] is not None else f"MFU: {record['peak_tflops_source']}"
    return (f"{record['preset']} on {record['device']}: {record['img_per_s']:.2f} img/s, "
            f"{record['step_ms_p50']:.1f} ms/step (p50), {record['tflops_achieved']:.3f} TFLOP/s, {mfu}; "
            f"peak memory {_size(mem['peak_bytes'])} (in the step {_size(mem['step_peak_bytes'])}, "
            f"plan {_size(mem['plan']['step_peak_bytes'])})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config of the run, as for `seer pretrain` (default: none, i.e. the "
                                         "defaults: SEER's RegNetY-256GF recipe); used: model.*, data.crops and data.channels, train.batch_size "
                                         "(images per step), train.precision (bf16 or fp32), swav.*")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for the MFU (default: GPU table)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file the record is appended to (default: benchmarks/results/"
                             "train_<backbone>_<device>.json under the current directory)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. model.backbone=regnety_32gf train.batch_size=64")


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Benchmark, append the record to its JSON file, print a summary (stderr) and a JSON line (stdout).

    `argv`: the arguments after `seer bench train`, stored with the record as the command that reproduces it."""
    record = benchmark(load_config(args.config, args.overrides), steps=args.steps, warmup=args.warmup,
                       device=args.device, peak=args.peak_tflops, threads=args.threads)
    record["command"] = "seer bench train " + shlex.join(argv)
    path = write_record(record, args.out)
    print(summary(record), file=sys.stderr)
    print(json.dumps({"out": str(path), "img_per_s": record["img_per_s"], "mfu": record["mfu"],
                      "peak_bytes": record["memory"]["peak_bytes"]}))
    return record


def main(argv: list[str] | None = None) -> None:
    script_main("benchmarks.train", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
