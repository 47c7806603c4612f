"""A DeepSpeed checkpoint by parameter name, whatever world size and ZeRO stage wrote it, and back into an engine.

DeepSpeed refuses ZeRO-1/2 checkpoints of another data-parallel size, and its universal-checkpoint converter only
knows Adam's state (`KeyError: 'exp_avg'` on momentum SGD). So `consolidate` rebuilds, from the files of any world
size and ZeRO stage 0-2, every parameter's fp32 master value, every tensor of optimizer state (momentum) and every
buffer (BatchNorm running statistics) by parameter name, and `apply_consolidated` places them into a freshly
initialized engine of any world size and ZeRO stage 0-2. `consolidated_weights` reads the weights alone (what
`seer export` needs) and also from ZeRO-3 checkpoints.

Every file is memory-mapped and never concatenated whole: a value that lies inside one rank's slice is a view of
that rank's file, so a reader touches only the values it uses (at SEER's 1.3B parameters, ~10 GB of fp32 weights and
momentum, which every rank of a node resuming at another world size would otherwise load at once).

The checkpoint's manifest (engine.training.checkpoint) supplies its world size and ZeRO stage, and at ZeRO-0 the
parameter names of the optimizer state (`optimizer_param_names`), which DeepSpeed saves by index only.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
from deepspeed.utils import safe_set_full_fp32_param


def optimizer_param_names(engine) -> list[list[str]]:
    """The names of each optimizer group's parameters, in order: the manifest of a ZeRO-0 checkpoint must hold them
    for `consolidate` to name its optimizer state."""
    name_of = {p: name for name, p in engine.module.named_parameters()}
    return [[name_of[p] for p in group["params"]] for group in engine.optimizer.param_groups]


def consolidated_weights(tag_dir: str | Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The model's state_dict from a checkpoint of any world size at ZeRO stage 0-3, on CPU: every parameter's fp32
    master value and every buffer, by name, in the model's order. `manifest`: the checkpoint's complete.json."""
    model_states, ranks = _read(Path(tag_dir), manifest)
    named = {**_buffers(model_states), **_params(manifest["zero_stage"], model_states, ranks)}
    return {name: named[name] for name in model_states["module"]}


def consolidate(tag_dir: str | Path, manifest: dict) -> dict:
    """The training state of a checkpoint of any world size at ZeRO stage 0-2, by parameter name, on CPU:

    {"params": {name: fp32 master value}, "buffers": {name: tensor}, "optimizer": {state key: {name: tensor}},
     "world_size", "zero_stage", "global_steps", "global_samples", "skipped_steps"}

    `manifest`: the checkpoint's complete.json.
    """
    tag_dir = Path(tag_dir)
    stage, world_size = manifest["zero_stage"], manifest["world_size"]
    if stage not in (0, 1, 2):
        raise ValueError(f"checkpoint {tag_dir} was written at ZeRO stage {stage} by {world_size} rank(s); only "
                         f"stages 0-2 can change world size or stage: resume it with {world_size} rank(s) and "
                         f"train.zero_stage={stage}")
    model_states, ranks = _read(tag_dir, manifest)
    if stage == 0:
        names = [name for group in manifest["optimizer_param_names"] for name in group]
        optimizer = _by_name(model_states["optimizer"]["state"], names)
    else:
        optimizer = _zero12_optimizer_state(ranks, model_states["param_shapes"])
    return {
        "params": _params(stage, model_states, ranks),
        "buffers": _buffers(model_states),
        "optimizer": optimizer,
        "world_size": world_size,
        "zero_stage": stage,
        **{key: model_states[key] for key in ("global_steps", "global_samples", "skipped_steps")},
    }


def _read(tag_dir: Path, manifest: dict) -> tuple[dict, list[dict]]:
    """The model states (rank 0's at ZeRO-3) and, at ZeRO >= 1, every rank's ZeRO optimizer state, memory-mapped."""
    stage, world_size = manifest["zero_stage"], manifest["world_size"]
    model_file = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    model_states = _load_mapped(tag_dir / model_file)
    ranks = [] if stage == 0 else [
        _load_mapped(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        for rank in range(world_size)]
    return model_states, ranks


def _load_mapped(path: Path) -> dict:
    """A torch.save file memory-mapped: its tensors are read from disk when used, not when loaded. Not weights_only:
    DeepSpeed pickles its own classes into these files (ZeroStageEnum), so a checkpoint is trusted like code."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _buffers(model_states: dict) -> dict[str, torch.Tensor]:
    return {name: model_states["module"][name] for name in model_states["buffer_names"]}


def _params(stage: int, model_states: dict, ranks: list[dict]) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master value: at ZeRO-0 the module's own, at ZeRO >= 1 the optimizer's partitions."""
    if stage == 3:  # the module's parameters are empty placeholders
        return _unflatten_zero3(ranks, model_states["param_shapes"])
    module, buffer_names = model_states["module"], set(model_states["buffer_names"])
    params = {name: value.float() for name, value in module.items() if name not in buffer_names}
    if stage > 0:  # the module holds copies of the fp32 masters
        params.update(_unflatten_zero12(ranks, model_states["param_shapes"]))
    return params


def _by_name(state: dict, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """torch.optim state (keyed by parameter index) -> {state key: {parameter name: tensor}}; tensors only."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for index, entry in state.items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                out.setdefault(key, {})[names[index]] = value.float()
    return out


def _zero12_groups(ranks: list[dict], param_shapes: list[dict]
                   ) -> Iterator[tuple[list[torch.Tensor], dict, list[int], list[dict]]]:
    """ZeRO-1/2: every rank holds a slice of each group's flat fp32 vector (and of its optimizer state);
    concatenated over ranks, the vector holds the group's parameters in order, each followed by its alignment
    padding (DeepSpeed's own reconstruction in deepspeed.utils.zero_to_fp32 does the same for the weights).

    Yields per group: the ranks' fp32 slices, {name: shape}, the alignment paddings, the ranks' optimizer states."""
    for group, shapes in enumerate(param_shapes):
        slices = [rank["single_partition_of_fp32_groups"][group] for rank in ranks]
        alignment = ranks[0].get("param_alignment_paddings")  # per group, per parameter; may be absent
        paddings = alignment[group] if alignment else [0] * len(shapes)
        states = []
        for rank in ranks:
            base = rank["base_optimizer_state"]  # torch.optim state of the rank's flat slice (a list if elastic)
            states.append(base[group] if isinstance(base, list)
                          else base["state"].get(base["param_groups"][group]["params"][0], {}))
        yield slices, shapes, paddings, states


def _unflatten_zero12(ranks: list[dict], param_shapes: list[dict]) -> dict[str, torch.Tensor]:
    params = {}
    for slices, shapes, paddings, _ in _zero12_groups(ranks, param_shapes):
        params.update(_split(slices, shapes, paddings))
    return params


def _zero12_optimizer_state(ranks: list[dict], param_shapes: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    optimizer: dict[str, dict[str, torch.Tensor]] = {}
    for slices, shapes, paddings, states in _zero12_groups(ranks, param_shapes):
        for key in states[0]:
            if all(torch.is_tensor(state.get(key)) and state[key].dim() == 1 and state[key].numel() >= piece.numel()
                   for state, piece in zip(states, slices)):
                # the state may be padded to the partition size; the fp32 slices are not
                pieces = [state[key][:piece.numel()].float() for state, piece in zip(states, slices)]
                optimizer.setdefault(key, {}).update(_split(pieces, shapes, paddings))
    return optimizer


def _unflatten_zero3(ranks: list[dict], param_shapes: list[dict]) -> dict[str, torch.Tensor]:
    """ZeRO-3: every parameter is cut into world-size parts of ceil(numel / world size) values (the last one padded);
    rank r's flat fp32 vector, held as sub-group pieces, is part r of every parameter in order, unpadded between
    parameters (as DeepSpeed's own reconstruction in deepspeed.utils.zero_to_fp32 reads it)."""
    shapes = {name: torch.Size(shape) for group in param_shapes for name, shape in group.items()}
    part = {name: -(-shape.numel() // len(ranks)) for name, shape in shapes.items()}
    parts_of_rank = [_split(rank["fp32_flat_groups"], {name: (numel,) for name, numel in part.items()},
                            [0] * len(part)) for rank in ranks]
    return {name: torch.cat([parts[name] for parts in parts_of_rank]).narrow(0, 0, shape.numel()).view(shape)
            for name, shape in shapes.items()}


def _split(pieces: list[torch.Tensor], shapes: dict, paddings: list[int]) -> dict[str, torch.Tensor]:
    """The named values of a flat vector held as consecutive 1-D pieces (ranks' slices, or one rank's sub-groups):
    a view where a value lies in one piece, a copy where it straddles two."""
    ends = list(itertools.accumulate(piece.numel() for piece in pieces))
    out, offset = {}, 0
    for (name, shape), padding in zip(shapes.items(), paddings):
        numel = torch.Size(shape).numel()
        if offset + numel > ends[-1]:
            raise ValueError(f"ZeRO partitions hold {ends[-1]} values but the parameters need more (at {name})")
        parts, start, left = [], offset, numel
        while left > 0:
            index = bisect.bisect_right(ends, start)  # the piece holding flat position `start`
            begin = ends[index] - pieces[index].numel()
            take = min(left, ends[index] - start)
            parts.append(pieces[index].narrow(0, start - begin, take))
            start, left = start + take, left - take
        value = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0)
        out[name] = value.view(shape)
        offset += numel + padding
    return out


def apply_consolidated(engine, state: dict) -> None:
    """Load a `consolidate`d checkpoint into a DeepSpeed engine of any world size at ZeRO stage 0-2 (no collectives)."""
    stage = engine.zero_optimization_stage()
    if stage not in (0, 1, 2):
        raise ValueError(f"a checkpoint of {state['world_size']} rank(s) at ZeRO stage {state['zero_stage']} cannot be "
                         f"loaded at ZeRO stage {stage}: set train.zero_stage to 0, 1 or 2")
    model = engine.module
    model.load_state_dict({**state["params"], **state["buffers"]}, strict=True)  # stages 0-2 hold full parameters
    name_of = {p: name for name, p in model.named_parameters()}
    if stage == 0:
        for group in engine.optimizer.param_groups:
            for p in group["params"]:
                for key, values in state["optimizer"].items():
                    if name_of[p] in values:
                        engine.optimizer.state[p][key] = torch.empty_like(p).copy_(values[name_of[p]])
    else:
        zero = engine.optimizer
        for p, name in name_of.items():
            safe_set_full_fp32_param(p, state["params"][name])  # this rank's fragment of the fp32 master
        for lp_params, group in zip(zero.bit16_groups, zero.optimizer.param_groups):
            (partition,) = group["params"]  # this rank's flat fp32 slice of the group
            for key, values in state["optimizer"].items():
                if not any(name_of[p] in values for p in lp_params):
                    continue  # this group had no such state yet (e.g. frozen prototypes)
                flat = torch.zeros_like(partition)
                for p in lp_params:
                    mapping = p._hp_mapping
                    if mapping is not None and name_of[p] in values:
                        address = mapping.get_hp_fragment_address()
                        flat.narrow(0, address.start, address.numel).copy_(_fragment(values[name_of[p]], mapping))
                zero.optimizer.state[partition][key] = flat
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]


def _fragment(full: torch.Tensor, mapping) -> torch.Tensor:
    address = mapping.lp_fragment_address
    return full.reshape(-1).narrow(0, address.start, address.numel)
