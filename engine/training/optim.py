"""SGD with LARS (as SEER/SwAV), exact under DeepSpeed ZeRO partitioning; parameter groups; per-step schedules."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

# Names of the parameter groups; schedules are looked up by these.
WEIGHTS, NO_DECAY, PROTOTYPES = "weights", "no_decay", "prototypes"


class Segments:
    """Which pieces of which parameters one stepped tensor holds: (slot, start, length) triples.

    Elements [start, start + length) of the tensor's flat view belong to parameter `slot` (its position among
    the parameters LARS was built with). Unsharded, a stepped tensor is a parameter: one segment, the whole
    tensor. Under DeepSpeed ZeRO it is a flat fp32 partition holding pieces of several parameters (and
    padding, which belongs to no segment).
    """

    def __init__(self, numel: int, segments: list[tuple[int, int, int]]):
        self.numel = numel
        self.segments = sorted((s for s in segments if s[2] > 0), key=lambda s: s[1])
        end = 0
        for slot, start, length in self.segments:
            if start < end or start + length > numel:
                raise ValueError(f"segment (slot {slot}, start {start}, length {length}) overlaps another or lies "
                                 f"outside a tensor of {numel} elements")
            end = start + length
        self.whole = len(self.segments) == 1 and self.segments[0][1:] == (0, numel)
        self._index_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slots of the segments; and, covering the whole tensor, slots (-1 for padding) with their lengths."""
        if device not in self._index_cache:
            covering, lengths, cursor = [], [], 0
            for slot, start, length in self.segments:
                if start > cursor:
                    covering.append(-1)
                    lengths.append(start - cursor)
                covering.append(slot)
                lengths.append(length)
                cursor = start + length
            if cursor < self.numel:
                covering.append(-1)
                lengths.append(self.numel - cursor)
            self._index_cache[device] = tuple(torch.tensor(v, dtype=torch.int64, device=device) for v in
                                              ([s[0] for s in self.segments], covering, lengths))
        return self._index_cache[device]

    def slots(self, device: torch.device) -> torch.Tensor:
        """The slots of the segments, in order (int64 on `device`)."""
        return self._index(device)[0]

    def norms(self, tensor: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """The norm of each segment's piece of `tensor`, in the order of `slots`."""
        if self.whole:  # the tensor itself: keeps its memory format (channels_last parameters)
            pieces = [tensor]
        else:
            flat = tensor.view(-1)
            pieces = [flat.narrow(0, start, length) for _, start, length in self.segments]
        return [torch.linalg.vector_norm(piece, dtype=dtype) for piece in pieces]

    def spread(self, per_slot: torch.Tensor) -> torch.Tensor:
        """Each element's slot value (1 on padding): a scalar for a whole parameter, else one value per element."""
        if self.whole:
            return per_slot[self.segments[0][0]]
        _, covering, lengths = self._index(per_slot.device)
        values = torch.cat([per_slot, per_slot.new_ones(1)])[covering]
        return torch.repeat_interleave(values, lengths, output_size=self.numel)


class LARS(torch.optim.Optimizer):
    """Momentum SGD whose step for each parameter is scaled by its LARS trust ratio, exact under ZeRO sharding.

    ratio = eta * ||w|| / (||g|| + wd * ||w|| + eps), applied to (g + wd * w), then momentum and lr (apex's LARC
    without clipping, the form SwAV and SEER trained with). Groups with `lars=False` (biases, norm parameters)
    take plain momentum SGD with their own weight decay. A group whose lr is 0 is left untouched,
    momentum included: that is how prototypes are frozen in the first steps (SwAV drops their gradient).

    The norms are those of whole original parameters. Under DeepSpeed ZeRO the optimizer steps flat partitions
    that cut through parameters (DeepSpeed issue #490), so after `deepspeed.initialize` call
    `attach_zero_layout(engine)`: each rank then sums the squares of the pieces it holds per parameter, the
    sums are all-reduced over the data-parallel group, and each piece is scaled by its parameter's ratio.
    Momentum and weight decay are elementwise, so they need no layout.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, lars: bool = True):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars=lars)
        super().__init__(params, defaults)
        # The parameters as given, in order: slot i of the norm vectors is originals[i], wherever its pieces go.
        self.originals = [p for group in self.param_groups for p in group["params"]]
        self._group_slots, first = [], 0
        for group in self.param_groups:
            self._group_slots.append(range(first, first + len(group["params"])))
            first += len(group["params"])
        self.set_layout({p: [(slot, 0, p.numel())] for slot, p in enumerate(self.originals)}, group=None)

    def set_layout(self, layout: dict, group=None) -> None:
        """What each stepped tensor holds ({tensor: [(slot, start, length), ...]}, see Segments), and the
        process group whose ranks hold the other pieces (None: no other pieces exist)."""
        self.layout = {tensor: Segments(tensor.numel(), segments) for tensor, segments in layout.items()}
        self._group = group

    def attach_zero_layout(self, engine) -> None:
        """Learn where DeepSpeed ZeRO put each parameter's pieces; call right after `deepspeed.initialize`.

        ZeRO 1/2 hand the optimizer one flat fp32 partition per parameter group: this rank's equal share of a flat
        buffer that the module's parameters are views of (in an order and with padding DeepSpeed chooses), cut
        without regard to parameter boundaries. The pieces are read off where each parameter's storage lies in
        that buffer. (Not off DeepSpeed's `_hp_mapping`: with `round_robin_gradients` it ignores the reordering in
        0.19.8, and `safe_get_full_fp32_param` returns parameters swapped.) ZeRO-3 partitions each parameter on its
        own (rank r holds elements [r * n, (r + 1) * n), the last slices padded) and concatenates a sub-group's
        slices into one flat fp32 partition. Checked here: each piece holds its parameter's values, and across the
        ranks every parameter is covered exactly once.
        """
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        zero = engine.optimizer
        if zero is self:  # ZeRO 0: the parameters themselves are stepped
            return
        if getattr(zero, "optimizer", None) is not self:
            raise ValueError("attach_zero_layout: this DeepSpeed engine was not initialized with this optimizer")
        if not isinstance(zero, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
            raise NotImplementedError(f"LARS knows the partition layout of DeepSpeed's ZeRO 1-3 optimizers, not of "
                                      f"{type(zero).__name__} (DeepSpeed's own bf16/fp16 mode wraps the optimizer)")
        group = zero.dp_process_group or dist.group.WORLD
        stage3 = isinstance(zero, DeepSpeedZeroOptimizer_Stage3)
        layout = self._zero3_layout(zero) if stage3 else self._zero12_layout(zero)
        self._check_coverage(layout, group)
        self.set_layout(layout, group)

    def _zero12_layout(self, zero) -> dict:
        layout = {}
        for i, (group, slots) in enumerate(zip(self.param_groups, self._group_slots)):
            # DeepSpeed swapped the group's parameters for `partition`: an fp32 copy of `flat_slice`, this rank's
            # slice of the group's flat buffer, which the module's parameters are views of.
            (partition,) = group["params"]
            flat_slice = zero.parallel_partitioned_bit16_groups[i][dist.get_rank(group=zero.real_dp_process_group[i])]
            segments = []
            for slot in slots:
                p = self.originals[slot]
                if p.untyped_storage().data_ptr() != flat_slice.untyped_storage().data_ptr():
                    raise RuntimeError(f"LARS: parameter {slot} ({tuple(p.shape)}) is not a view of its group's flat "
                                       f"ZeRO buffer; this DeepSpeed version lays partitions out differently")
                offset = (p.data_ptr() - flat_slice.data_ptr()) // p.element_size()  # < 0: begins on a lower rank
                start, end = max(offset, 0), min(offset + p.numel(), partition.numel())
                if start < end:
                    _check_piece(partition, start, p.detach().view(-1)[start - offset:end - offset], slot)
                    segments.append((slot, start, end - start))
            layout[partition] = segments
        return layout

    def _zero3_layout(self, zero) -> dict:
        slot_of = {p: slot for slot, p in enumerate(self.originals)}
        layout = {}
        for params, partition in zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat):
            segments, offset = [], 0
            for p in params:
                size = p.partition_numel()
                held = min(size, max(0, p.ds_numel - dist.get_rank(group=p.ds_process_group) * size))
                if held:
                    _check_piece(partition, offset, p.ds_tensor[:held], slot_of[p])
                    segments.append((slot_of[p], offset, held))
                offset += size
            layout[partition] = segments
        return layout

    def _check_coverage(self, layout: dict, group) -> None:
        counts = torch.zeros(len(self.originals), dtype=torch.int64)
        for segments in layout.values():
            for slot, _, length in segments:
                counts[slot] += length
        counts = counts.to(_reduce_device(group))
        dist.all_reduce(counts, group=group)
        for slot, (p, count) in enumerate(zip(self.originals, counts.tolist())):
            numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty tensor in the module
            if count != numel:
                raise RuntimeError(f"LARS: the ZeRO partitions hold {count} elements of parameter {slot} "
                                   f"(shape {tuple(getattr(p, 'ds_shape', p.shape))}, {numel} elements); this "
                                   f"DeepSpeed version lays partitions out differently")

    def _segments(self, tensor: torch.Tensor) -> Segments:
        try:
            return self.layout[tensor]
        except KeyError:
            raise RuntimeError(f"LARS was handed a tensor of shape {tuple(tensor.shape)} it has no layout for: under "
                               f"DeepSpeed ZeRO call attach_zero_layout(engine) right after deepspeed.initialize"
                               ) from None

    def _norms(self, groups: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """||w|| and ||g|| of every original parameter (indexed by slot) that has pieces in these groups."""
        first = groups[0]["params"][0]
        dtype = torch.promote_types(first.dtype, torch.float32)
        sums = torch.zeros(2, len(self.originals), device=first.device, dtype=dtype)
        slots, w_pieces, g_pieces = [], [], []
        for group in groups:
            for p in group["params"]:
                if p.grad is not None:
                    segments = self._segments(p)
                    slots.append(segments.slots(sums.device))
                    w_pieces += segments.norms(p, dtype)
                    g_pieces += segments.norms(p.grad, dtype)
        if w_pieces:
            # One index_add per row for all tensors: a call steps at most one piece of a parameter on this rank,
            # so each slot receives one term, the same sums as one add per tensor.
            index = torch.cat(slots)
            sums[0].index_add_(0, index, torch.stack(w_pieces).square())
            sums[1].index_add_(0, index, torch.stack(g_pieces).square())
        if self._group is not None:  # add the pieces the other ranks hold
            total = sums.to(_reduce_device(self._group))
            dist.all_reduce(total, group=self._group)
            sums = total.to(sums.device)
        w_norm, g_norm = sums.sqrt()
        return w_norm, g_norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        # DeepSpeed calls step once per group (ZeRO-3: per sub-group; the other groups then hold no tensors), in
        # the same order on every rank: what decides whether the norms are all-reduced is the same on all ranks.
        groups = [g for g in self.param_groups if g["lr"] != 0 and g["params"]]
        lars_groups = [g for g in groups if g["lars"]]
        w_norm, g_norm = self._norms(lars_groups) if lars_groups else (None, None)
        for group in groups:
            lr, wd = group["lr"], group["weight_decay"]
            if group["lars"]:
                ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                # A zero weight or gradient (fresh zero-init layer, unused parameter) keeps the plain step.
                ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if group["lars"]:
                    update.mul_(self._segments(p).spread(ratio).to(update.dtype))
                state = self.state[p]
                if group["momentum"]:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                    update = state["momentum_buffer"]
                p.add_(update, alpha=-lr)
        return loss


def _check_piece(partition: torch.Tensor, start: int, piece: torch.Tensor, slot: int) -> None:
    """The fp32 partition must hold the parameter's values where the layout says (compared at the parameter's
    precision, as DeepSpeed copied them from it)."""
    if not torch.equal(partition[start:start + piece.numel()].to(piece.device, piece.dtype), piece.view(-1)):
        raise RuntimeError(f"LARS: the ZeRO partition does not hold parameter {slot} where its layout says; this "
                           f"DeepSpeed version lays partitions out differently")


def _reduce_device(group) -> torch.device:
    """gloo reduces CPU tensors, NCCL CUDA ones, wherever the partitions live (ZeRO can offload them to CPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def parameter_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool = False) -> list[dict]:
    """Weights (decay + LARS) and prototypes (the same, on their own lr schedule). Biases and norm parameters are
    weights too, as SwAV/SEER trained (LARC over every parameter, VISSL's regularize_bn/bias); with
    `exclude_bias_and_norm` they form a group with neither (the SimCLR/BYOL habit)."""
    groups = {WEIGHTS: [], NO_DECAY: [], PROTOTYPES: []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.split(".")[-1] == "prototypes" or ".prototypes." in name:  # one head, or head i: prototypes.i
            groups[PROTOTYPES].append(p)
        elif exclude_bias_and_norm and len(getattr(p, "ds_shape", p.shape)) <= 1:  # ds_shape: under ZeRO-3's
            groups[NO_DECAY].append(p)                                               # zero.Init, p is empty
        else:
            groups[WEIGHTS].append(p)
    decay = {WEIGHTS: weight_decay, NO_DECAY: 0.0, PROTOTYPES: weight_decay}
    return [
        {"name": name, "params": params, "weight_decay": decay[name], "lars": name != NO_DECAY}
        for name, params in groups.items()
        if params
    ]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optim_cfg.weight_decay, optim_cfg.exclude_bias_and_norm)
    if optim_cfg.name == "lars":
        return LARS(groups, lr=0.0, momentum=optim_cfg.momentum, trust_coefficient=optim_cfg.trust_coefficient)
    # Plain momentum SGD: same groups and schedules, no trust ratio. Elementwise, so exact under ZeRO too.
    return LARS([{**g, "lars": False} for g in groups], lr=0.0, momentum=optim_cfg.momentum)


def lr_schedule(steps: int, peak: float, warmup_steps: int, final_fraction: float) -> list[float]:
    """Linear warm-up from 0 to `peak`, then cosine from `peak` to `peak * final_fraction`, one value per step."""
    warmup_steps = min(warmup_steps, steps)
    final = peak * final_fraction
    values = [peak * (s + 1) / warmup_steps for s in range(warmup_steps)]
    decay_steps = steps - warmup_steps
    span = max(decay_steps - 1, 1)  # the last step runs at exactly `final`
    values += [final + 0.5 * (peak - final) * (1 + math.cos(math.pi * s / span)) for s in range(decay_steps)]
    return values


def schedules(cfg, global_batch: int) -> dict[str, list[float]]:
    """Per-group lr for every step; the prototypes' lr is zero while they are frozen."""
    peak = cfg.optim.lr * global_batch / 256
    base = lr_schedule(cfg.train.steps, peak, cfg.optim.warmup_steps, cfg.optim.final_lr_fraction)
    frozen = cfg.swav.freeze_prototypes_steps
    return {
        WEIGHTS: base,
        NO_DECAY: base,
        PROTOTYPES: [0.0 if step < frozen else lr for step, lr in enumerate(base)],
    }
