"""Activation checkpointing of the RegNet trunk through DeepSpeed's checkpointing API (its non-reentrant variant:
the reentrant one double-reduces gradients under ZeRO-3 in DeepSpeed 0.19).

A checkpointed module keeps only its input for the backward pass and runs its forward again there. Granularity:
"block" keeps one tensor per RegNet block (the usual trade: ~1/3 more compute, activations a few block inputs);
"stage" keeps one per stage (SEER-10B's stage groups: least memory, largest recompute peak).

BatchNorm layers update their running statistics in a forward pass; the recomputation would update them a second
time, so it runs them with momentum 0 (statistics unchanged) and undoes its count: checkpointed and plain training
give the same weights and the same BN buffers.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import nn

GRANULARITIES = ("none", "block", "stage")


class _Recomputable:
    """The module's plain forward; every call after the first is the backward pass's recomputation, which must not
    update BatchNorm running statistics a second time."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.calls = 0
        self.autocast: tuple[str, bool, torch.dtype] | None = None

    def __call__(self, *inputs):
        self.calls += 1
        plain_forward = functools.partial(type(self.module).forward, self.module)
        if self.calls == 1:
            device = inputs[0].device.type
            self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            return plain_forward(*inputs)
        # The recomputation runs in the backward pass, outside the forward's autocast region: re-enter it.
        device, enabled, dtype = self.autocast
        plain_forward = torch.autocast(device, dtype=dtype, enabled=enabled)(plain_forward)
        norms = [m for m in self.module.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            return plain_forward(*inputs)
        finally:
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)


def _checkpointed_forward(self: nn.Module, *inputs):
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, *inputs)
    import deepspeed  # here: the model must build where DeepSpeed is not installed (plans, benchmarks)

    return deepspeed.checkpointing.non_reentrant_checkpoint(_Recomputable(self), *inputs)


def checkpointed_modules(backbone: nn.Module, granularity: str) -> list[nn.Module]:
    """The trunk's modules that keep only their input: RegNet blocks or stages (timm's s1..s4 of b1..bN)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"model.activation_checkpointing must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if granularity == "none":
        return []
    stages = [module for name, module in backbone.named_children() if name.startswith("s") and name[1:].isdigit()]
    if not stages:
        raise ValueError(f"model.activation_checkpointing={granularity}: {type(backbone).__name__} has no RegNet "
                         f"stages (children s1, s2, ...)")
    return stages if granularity == "stage" else [block for stage in stages for block in stage.children()]


def enable_activation_checkpointing(backbone: nn.Module, granularity: str) -> nn.Module:
    """Checkpoint `backbone`'s blocks or stages in place (module names and weights unchanged).

    DeepSpeed's CPU checkpointing is not offered: with the non-reentrant variant it fails in DeepSpeed 0.19.8.
    """
    modules = checkpointed_modules(backbone, granularity)
    if modules:
        import deepspeed

        deepspeed.checkpointing.configure(None)
    for module in modules:
        # A bound method stored on the instance: deepcopy rebinds it to the copy; the class is untouched.
        module.forward = types.MethodType(_checkpointed_forward, module)
    return backbone
