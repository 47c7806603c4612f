"""Capacity planning for SwAV pretraining: what one rank holds in memory, whether it fits, and how long a run takes.

    seer plan --config engine/configs/seer_regnety_256gf.yaml --gpus 8 --gpu-mem 141 train.batch_size=64

The run is a Config (engine.config, loaded as for `seer pretrain`): model.* (backbone, head, prototypes, activation
checkpointing), data.crops and data.channels, train.batch_size (B), train.precision and train.zero_stage, swav.*.

Everything comes from the real model (engine.models.swav.build_swav_model) built on the meta device: shapes without
storage, so even seer_10b costs a second. Sizes are bytes; P = parameters other than the prototypes, K·D = the
prototypes (always fp32), N = ranks, B = images per rank, each with every crop.

Model state per rank (bytes per parameter: weights w, gradients g, optimizer state o; the prototypes take 4, 4, 4):

    precision   w  g  o                                   ZeRO-1: o / N;  ZeRO-2: also g / N;  ZeRO-3: also w / N
    fp32        4  4  4  (momentum)
    bf16, fp16  4  4  4  + 2·P for the 16-bit copies of the weights autocast makes in the forward pass and
                         autograd keeps for backward (not sharded): train.precision bf16/fp16 is autocast over fp32
                         weights (SEER's AMP), not DeepSpeed's 16-bit weights.

    ZeRO-1/2 also keep an fp32 master copy of this rank's partition, even of fp32 weights: + 4(P + K·D) / N.
    ZeRO-3 also gathers parameters layer by layer: + min(P, 1e9)·w bytes at most (DeepSpeed's default
    stage3_max_live_parameters), an upper bound.

Activations: one training forward pass is traced on the meta device at the real per-rank batch and crop sizes.
Every tensor autograd saves for backward (torch.autograd.graph.saved_tensors_hooks) is counted once per storage,
parameters excluded: what a real run saves, byte for byte (tests/test_plan.py compares with real CPU runs, with
and without the engine's activation checkpointing). Each saved tensor is attributed to the RegNet block call and
stage call that made it (the backbone runs once per crop size, so each block has a call per crop size) and keeps its
place in forward order. With C the checkpointed calls (none: no calls; block: every block call; stage: every stage
call):

    kept         = saved tensors made outside C, and the input of every call in C
    recompute_c  = saved tensors of call c that are not kept (rebuilt when backward reaches c)
    transient_b  = output + 2 x the largest saved tensor of block call b: during b's backward, the gradient of its
                   output (held for the shortcut) and the gradients of one inner op's output and input
    at_c         = kept tensors made before c ends (backward frees in reverse forward order) + recompute_c
                   + the largest transient_b of the block calls within c
    peak         = max(all kept, max over c of at_c)          (no checkpointing: c runs over the block calls)

With bf16 or fp16, activations of the backbone and the projection MLP are counted at 2 bytes per element and
those of the SwAV loss at 4 (its kernels compute in fp32): CUDA autocast runs every op of a RegNet in bf16. Every
term scales with B (BatchNorm's per-channel statistics aside), which gives the largest batch that fits.

Checked against the peak CPU allocation of real fp32 training steps (torch.profiler allocation events, gradients
created during backward as after zero_grad): activations + gradients came out 0-10% above the measured peak for
regnety_micro/tiny/002/004 at 16-64 px crops, with and without checkpointing; tests/test_plan.py holds it to 15%.
The bf16 rule needs a GPU to check: `seer bench train` records the plan's figure next to
torch.cuda.max_memory_allocated.

Not modelled, hence the --headroom fraction of --gpu-mem kept free (default 10%): the CUDA context, DeepSpeed's
communication buckets, allocator fragmentation, library workspaces.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dataloading.config import CropGroup, DataConfig
from engine.config import Config, load_config, sinkhorn_rows, small_batch_advice
from engine.models.activation_checkpointing import GRANULARITIES

PRECISIONS = {  # bytes per parameter: weights, gradients, optimizer state
    "fp32": (4, 4, 4),
    "bf16": (4, 4, 4),
    "fp16": (4, 4, 4),
}
PROTOTYPE_BYTES = (4, 4, 4)  # prototypes stay fp32 in every precision; the optimizer keeps their momentum only
AUTOCAST_COPY_BYTES = 2
ZERO3_MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's default stage3_max_live_parameters
GIB = 2**30


def crops_label(crops: list[CropGroup]) -> str:
    """'2x224,4x96': count x size (px) of each crop group, in crop-major order."""
    return ",".join(f"{group.count}x{group.size}" for group in crops)


def meta_swav_model(cfg: Config) -> nn.Module:
    """The engine's SwAV model for `cfg`, on the meta device, in training mode, without activation checkpointing.

    The head runs in eval mode: its training-only assignment histogram (no autograd; bincount has no meta kernel)
    is skipped. Checkpointing is left to the analysis (activation_peak), which needs every saved tensor.
    """
    from engine.models.swav import build_swav_model

    checkpointing, cfg.model.activation_checkpointing = cfg.model.activation_checkpointing, "none"
    try:
        with torch.device("meta"):
            model = build_swav_model(cfg)
    finally:
        cfg.model.activation_checkpointing = checkpointing
    model.train()
    model.head.eval()
    return model.to(memory_format=model.memory_format)


def synthetic_crops(data: DataConfig, batch: int, device) -> list[torch.Tensor]:
    """One normal-noise tensor per crop of `data` (its crops and channels), crop-major (the layout the data loader
    delivers)."""
    return [torch.randn(batch, data.channels, group.size, group.size, device=device)
            for group in data.crops for _ in range(group.count)]


# ------------------------------------------------------------------------------------------------ activations
def storage_key(t: torch.Tensor) -> int:
    # The StorageImpl's address: views and in-place results share it, on real and meta tensors alike (a meta
    # tensor's data_ptr is 0 for all).
    return t.untyped_storage()._cdata


@dataclass
class Saved:
    """One storage autograd keeps for backward."""

    nbytes: int
    floating: bool
    segment: str  # stem, s1..sN, projection, loss or other: the part of the model that saved it first
    order: int  # position in the forward pass (shared counter with Call.start/end)
    block: int | None  # index into ActivationTrace.block_calls of the call that saved it, if any
    stage: int | None


@dataclass
class Call:
    """One forward call of a block or a stage."""

    name: str
    input: torch.Tensor
    start: int
    output: torch.Tensor | None = None
    end: int = 0


@dataclass
class ActivationTrace:
    """What autograd saved in one forward pass, by storage, and the block and stage calls it happened in."""

    saved: dict[int, Saved] = field(default_factory=dict)
    block_calls: list[Call] = field(default_factory=list)
    stage_calls: list[Call] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)  # referenced so that no storage address is reused

    @property
    def saved_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved.values())


def trace_activations(model: nn.Module, crops: list[torch.Tensor]) -> ActivationTrace:
    """Run model(crops) once, recording every tensor autograd saves (parameters excluded) and where it was made.

    Works on meta tensors (the plan) and on real ones (the check).
    """
    from engine.models.activation_checkpointing import checkpointed_modules

    backbone, head = model.backbone, model.head
    trace = ActivationTrace()
    params = {storage_key(p) for p in model.parameters()}
    state = {"segment": "other", "block": None, "stage": None, "order": 0}

    def tick() -> int:
        state["order"] += 1
        return state["order"]

    def call_hooks(kind: str, calls: list[Call], name: str):
        def pre_hook(module, args):
            calls.append(Call(name, input=args[0], start=tick()))
            state[kind] = len(calls) - 1
            if kind == "stage":
                state["segment"] = name

        def post_hook(module, args, output):
            calls[state[kind]].output, calls[state[kind]].end = output, tick()
            state[kind] = None
        return pre_hook, post_hook

    handles = []
    names = {id(m): n for n, m in backbone.named_modules()}
    for kind, calls in (("stage", trace.stage_calls), ("block", trace.block_calls)):
        for module in checkpointed_modules(backbone, kind):
            pre, post = call_hooks(kind, calls, names[id(module)])
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def set_segment(name):
        return lambda *_: state.__setitem__("segment", name)
    handles += [backbone.stem.register_forward_pre_hook(set_segment("stem")),
                backbone.register_forward_hook(set_segment("other")),
                head.projection.register_forward_pre_hook(set_segment("projection")),
                head.projection.register_forward_hook(set_segment("loss"))]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in params and key not in trace.saved:
            trace.tensors.append(t)
            trace.saved[key] = Saved(t.untyped_storage().nbytes(), t.is_floating_point(), state["segment"], tick(),
                                     state["block"], state["stage"])
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(crops)
    finally:
        for handle in handles:
            handle.remove()
    return trace


def _bytes_at(saved: Saved, precision: str) -> float:
    """Bytes of a saved storage at the planned precision (traced in fp32; bf16 compute halves all but the loss)."""
    if precision != "fp32" and saved.floating and saved.segment != "loss":
        return saved.nbytes / 2
    return saved.nbytes


def _tensor_bytes(t: torch.Tensor, precision: str) -> float:
    return t.numel() * (2 if precision != "fp32" and t.is_floating_point() else t.element_size())


def activation_peak(trace: ActivationTrace, checkpointing: str, precision: str = "fp32") -> dict:
    """The activation part of a step's peak memory (bytes) under `checkpointing`, by the model in the docstring."""
    if checkpointing not in GRANULARITIES:
        raise ValueError(f"model.activation_checkpointing must be one of {', '.join(GRANULARITIES)}, "
                         f"got {checkpointing!r}")
    owner_of = {"none": lambda s: None, "block": lambda s: s.block, "stage": lambda s: s.stage}[checkpointing]
    checkpointed = {"none": [], "block": trace.block_calls, "stage": trace.stage_calls}[checkpointing]
    calls = checkpointed or trace.block_calls  # without checkpointing, the block calls bound the transients
    kept: dict[int, tuple[int, float]] = {}  # storage -> (forward order, bytes)
    for key, saved in trace.saved.items():
        if owner_of(saved) is None:
            kept[key] = (saved.order, _bytes_at(saved, precision))
    for call in checkpointed:
        kept.setdefault(storage_key(call.input), (call.start, _tensor_bytes(call.input, precision)))
    recompute = [0.0] * len(calls)
    largest = [0.0] * len(trace.block_calls)  # largest saved tensor of each block call
    for key, saved in trace.saved.items():
        owner = owner_of(saved)
        if owner is not None and key not in kept:
            recompute[owner] += _bytes_at(saved, precision)
        if saved.block is not None:
            largest[saved.block] = max(largest[saved.block], _bytes_at(saved, precision))
    # Backward through a block holds the gradient of its output (buffered for the shortcut) and the gradients of
    # one inner op's output and input.
    block_transient = [_tensor_bytes(c.output, precision) + 2 * largest[i]
                       for i, c in enumerate(trace.block_calls)]
    candidates = []
    for i, call in enumerate(calls):
        alive = sum(nbytes for order, nbytes in kept.values() if order <= call.end)
        transient = max(t for t, b in zip(block_transient, trace.block_calls) if call.start <= b.start <= call.end)
        candidates.append((alive + recompute[i] + transient, i, alive, transient))
    peak, worst, alive, transient = max(candidates)
    kept_total = sum(nbytes for _, nbytes in kept.values())
    return {
        "kept": kept_total,
        "alive_at_worst": alive,
        "recompute": recompute[worst],
        "transient": transient,
        "worst_call": calls[worst].name,
        "peak": max(peak, kept_total),
    }


def saved_bytes_by_segment(trace: ActivationTrace, precision: str = "fp32") -> dict[str, float]:
    """Saved-activation bytes per part of the model (stem, s1..s4, projection, loss), no checkpointing."""
    parts: dict[str, float] = {}
    for saved in trace.saved.values():
        parts[saved.segment] = parts.get(saved.segment, 0.0) + _bytes_at(saved, precision)
    return parts


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    # The input gradient and the weight gradient each cost what the forward convolution costs. torch's own formula
    # (torch 2.11-2.14) drops the group division for the weight gradient, counting a grouped convolution's
    # (every RegNet 3x3's) weight gradient `groups` times over (pytorch/pytorch#183405).
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and convolutions fn() runs (torch.utils.flop_counter, 2 per multiply-add; grouped
    convolutions' backward counted correctly)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def train_flops(model: nn.Module, crops: list[torch.Tensor]) -> int:
    """Model FLOPs of one training step's forward and backward (meta tensors are enough; recompute not counted)."""
    return count_flops(lambda: model(crops).backward())


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CPU memory allocated by torch while fn() runs, above what was allocated when it started.

    From torch.profiler's allocation events (every allocation and free of torch's CPU allocator, in order): the
    measurement that the activation model is checked against, and the benchmark's CPU peak memory.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            current += event.nbytes()
            peak = max(peak, current)
    return peak


# ------------------------------------------------------------------------------------------------ model state
def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of the backbone, the projection MLP and the prototypes."""
    return {
        "backbone": sum(p.numel() for p in model.backbone.parameters()),
        "projection": sum(p.numel() for p in model.head.projection.parameters()),
        "prototypes": sum(p.numel() for p in model.head.prototypes),  # every head
    }


def state_bytes(counts: dict[str, int], precision: str, zero: int, gpus: int) -> dict[str, float]:
    """Per-rank bytes of weights, gradients and optimizer state (and the extras of autocast and ZeRO-3)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3 (DeepSpeed ZeRO stage), got {zero}")
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    dense = counts["backbone"] + counts["projection"]
    protos = counts["prototypes"]
    w, g, o = PRECISIONS[precision]
    pw, pg, po = PROTOTYPE_BYTES
    shard = {name: gpus if zero >= stage else 1 for name, stage in (("optimizer", 1), ("gradients", 2), ("weights", 3))}
    return {
        "weights": (dense * w + protos * pw) / shard["weights"],
        "gradients": (dense * g + protos * pg) / shard["gradients"],
        "optimizer": (dense * o + protos * po) / shard["optimizer"],
        "autocast_weight_copies": dense * AUTOCAST_COPY_BYTES if precision != "fp32" else 0.0,
        "zero12_master_partition": (dense + protos) * 4 / gpus if zero in (1, 2) else 0.0,
        "zero3_gathered": min(dense + protos, ZERO3_MAX_LIVE_PARAMETERS) * w if zero == 3 else 0.0,
    }


# ------------------------------------------------------------------------------------------------ the plan
def plan(cfg: Config, *, gpus: int, gpu_mem_gib: float, img_per_s: float | None = None, images: float = 1e9,
         headroom: float = 0.1) -> dict:
    """Per-rank memory of the SwAV run `cfg` on `gpus` ranks and whether it fits; the run's duration if a per-GPU
    speed is given."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if gpu_mem_gib <= 0 or not 0 <= headroom < 1:
        raise ValueError(f"--gpu-mem must be > 0 and --headroom in [0, 1), got {gpu_mem_gib} and {headroom}")
    if img_per_s is not None and img_per_s <= 0:
        raise ValueError(f"--img-per-s must be > 0, got {img_per_s}")
    if images <= 0:
        raise ValueError(f"--images must be > 0, got {images}")
    batch, precision, zero = cfg.train.batch_size, cfg.train.precision, cfg.train.zero_stage
    checkpointing = cfg.model.activation_checkpointing
    model = meta_swav_model(cfg)
    counts = parameter_counts(model)
    state = state_bytes(counts, precision, zero, gpus)

    flops_per_image = train_flops(model, synthetic_crops(cfg.data, batch, "meta")) / batch
    trace = trace_activations(model, synthetic_crops(cfg.data, batch, "meta"))
    act = activation_peak(trace, checkpointing, precision)
    # Every term scales with B but BatchNorm's per-channel statistics (bytes), so this is the per-image slope.
    per_image = act["peak"] / batch
    static = sum(state.values())
    usable = gpu_mem_gib * GIB * (1 - headroom)
    total = static + act["peak"]
    max_batch = max(math.floor((usable - static) / per_image), 0)
    result = {
        "preset": cfg.model.backbone, "gpus": gpus, "gpu_mem_gib": gpu_mem_gib, "zero": zero,
        "checkpointing": checkpointing, "precision": precision, "batch_per_gpu": batch, "global_batch": batch * gpus,
        "crops": crops_label(cfg.data.crops), "channels": cfg.data.channels,
        "head": {"hidden": cfg.model.head_hidden_dims, "embedding_dim": cfg.model.embedding_dim,
                 "prototypes": cfg.model.num_prototypes},
        "parameters": counts,
        "bytes": {**state, "activations": act["peak"], "total": total},
        "activations": {**act, "per_image": per_image,
                        "saved_per_image_by_part": {k: v / batch for k, v in
                                                    saved_bytes_by_segment(trace, precision).items()}},
        "train_flops_per_image": flops_per_image,
        "headroom": headroom, "usable_bytes": usable, "fits": total <= usable, "max_batch_per_gpu": max_batch,
        "sinkhorn_rows": sinkhorn_rows(cfg, gpus), "small_batch": small_batch_advice(cfg, gpus),
    }
    if img_per_s is not None:
        seconds = images / (img_per_s * gpus)
        result["schedule"] = {"img_per_s_per_gpu": img_per_s, "images": images, "steps": images / (batch * gpus),
                              "days": seconds / 86400, "tflops_per_gpu": img_per_s * flops_per_image / 1e12}
    return result


def format_plan(p: dict) -> str:
    """The plan as a readable table (GiB, or MiB for runs under 1 GiB)."""
    c, b, a = p["parameters"], p["bytes"], p["activations"]
    n, z = p["gpus"], p["zero"]
    w, g, o = PRECISIONS[p["precision"]]
    unit, scale = ("GiB", GIB) if b["total"] >= GIB else ("MiB", 2**20)

    def size(x: float) -> str:
        return f"{x / scale:9.2f}"

    def millions(x: float) -> str:
        return f"{x / 1e6:,.{1 if x >= 1e7 else 3}f}M"

    def per(stage: int) -> str:
        return f" / {n}" if z >= stage else ""

    lines = [
        f"seer plan: {p['preset']} on {n} GPU(s) x {p['gpu_mem_gib']:g} GiB, ZeRO-{z}, {p['precision']}, "
        f"checkpointing {p['checkpointing']}",
        f"  parameters {millions(sum(c.values()))} = backbone {millions(c['backbone'])} + projection "
        f"{millions(c['projection'])} + prototypes {millions(c['prototypes'])} (fp32); "
        f"P = {millions(c['backbone'] + c['projection'])}, Q = prototypes",
        f"  batch {p['batch_per_gpu']} images/GPU x crops {p['crops']} -> global batch {p['global_batch']:,}; "
        f"{p['train_flops_per_image'] / 1e9:,.4g} GFLOP per image (forward + backward)",
        "",
        f"  {'per GPU':<44}{unit:>9}   formula (bytes)",
        f"  {'weights':<44}{size(b['weights'])}   ({w}P + 4Q){per(3)}",
        f"  {'gradients':<44}{size(b['gradients'])}   ({g}P + 4Q){per(2)}",
        f"  {'optimizer state (momentum)':<44}{size(b['optimizer'])}   ({o}P + 4Q){per(1)}",
    ]
    if b["autocast_weight_copies"]:
        lines.append(f"  {'16-bit weight copies made by autocast':<44}{size(b['autocast_weight_copies'])}   2P")
    if b["zero12_master_partition"]:
        lines.append(f"  {'ZeRO-1/2 fp32 master partition':<44}{size(b['zero12_master_partition'])}   (4P + 4Q) / {n}")
    if b["zero3_gathered"]:
        lines.append(f"  {'ZeRO-3 gathered parameters (upper bound)':<44}{size(b['zero3_gathered'])}   "
                     f"min(P + Q, 1e9) x {w}")
    kept_what = {"none": "all saved tensors", "block": "block inputs + stem + head",
                 "stage": "stage inputs + stem + head"}[p["checkpointing"]]
    lines += [
        f"  {'activations (peak of the step)':<44}{size(b['activations'])}   "
        f"{a['per_image'] / 2**20:,.2f} MiB/image x {p['batch_per_gpu']}",
        f"  {'  kept, made before ' + a['worst_call'] + ' ends':<44}{size(a['alive_at_worst'])}   "
        f"of {size(a['kept']).strip()} kept ({kept_what})",
    ]
    if p["checkpointing"] != "none":
        lines.append(f"  {'  recomputed in the backward of ' + a['worst_call']:<44}{size(a['recompute'])}")
    lines += [
        f"  {'  gradients in flight in its backward':<44}{size(a['transient'])}",
        f"  {'total':<44}{size(b['total'])}   of {p['usable_bytes'] / GIB:.1f} GiB usable "
        f"({100 * (1 - p['headroom']):.0f}% of {p['gpu_mem_gib']:g})",
        "",
        f"  {'FITS' if p['fits'] else 'DOES NOT FIT'}; largest batch per GPU that fits: {p['max_batch_per_gpu']:,}",
        "  saved activations per image, no checkpointing (MiB): " + ", ".join(
            f"{k} {v / 2**20:,.{1 if v >= 2**20 else 3}f}" for k, v in a["saved_per_image_by_part"].items()),
    ]
    if p["small_batch"]:
        lines.append(f"  WARNING: {p['small_batch']}")
    if "schedule" in p:
        s = p["schedule"]
        lines.append(f"  {s['images']:.3g} images at {s['img_per_s_per_gpu']:g} img/s per GPU on {n} GPU(s): "
                     f"{s['days']:,.2f} days, {s['steps']:,.0f} steps ({s['tflops_per_gpu']:.1f} TFLOP/s per GPU)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config of the run, as for `seer pretrain` (default: none, i.e. the "
                                         "defaults: SEER's RegNetY-256GF recipe); planned: model.*, data.crops and "
                                         "data.channels, train.batch_size (per GPU), train.precision, "
                                         "train.zero_stage, swav.queue_length")
    parser.add_argument("--gpus", type=int, required=True, help="ranks (GPUs) in the data-parallel run")
    parser.add_argument("--gpu-mem", type=float, required=True, metavar="GIB",
                        help="memory per GPU in GiB (an H200 reports ~140, an 80 GB H100 ~79.2)")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of --gpu-mem kept free (default 0.1)")
    parser.add_argument("--img-per-s", type=float, default=None, help="training speed per GPU, for the run's days")
    parser.add_argument("--images", type=float, default=1e9, help="images the run sees (default 1e9, SEER)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.batch_size=64 model.activation_checkpointing=block")


def run(args: argparse.Namespace) -> None:
    result = plan(load_config(args.config, args.overrides), gpus=args.gpus, gpu_mem_gib=args.gpu_mem,
                  img_per_s=args.img_per_s, images=args.images, headroom=args.headroom)
    print(json.dumps(result) if args.json else format_plan(result))  # one line, as every seer command's JSON
