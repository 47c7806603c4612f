"""BatchNorm whose batch statistics span a group of ranks, as SEER's SyncBN over groups of 64 GPUs.

torch.nn.SyncBatchNorm refuses CPU tensors, so this is one implementation for every device: each rank computes
its per-channel count, mean and sum of squared deviations, the group all-gathers them (differentiably, so the
backward pass is synchronized too) and combines them with the parallel-variance formula. Layers keep their class
hierarchy and parameter names (timm's BatchNormAct2d stays a BatchNormAct2d), so checkpoints and exported weights
are unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d
from torch import nn


def batch_norm_group(group_size: int) -> dist.ProcessGroup | None:
    """This rank's group of `group_size` consecutive ranks (None: BN stays per rank).

    Every rank must call this, in the same order: creating a process group is a collective.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if group_size < 1:
        raise ValueError(f"model.sync_bn_group_size must be >= 1, got {group_size}")
    size = min(group_size, world)
    if world % size:
        raise ValueError(f"model.sync_bn_group_size={group_size} does not divide the {world} ranks into equal groups")
    if size == 1:
        return None
    rank, mine = dist.get_rank(), None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


class _AllGather(torch.autograd.Function):
    """Stack of every group rank's tensor; backward sends each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # every rank's loss depends on every rank's statistics
        return grad[dist.get_rank(ctx.group)], None


def _group_statistics(x: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel over the whole group's batch, and the group's sample count."""
    dims = [d for d in range(x.dim()) if d != 1]
    count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
    mean = x.mean(dims)
    squared_deviations = (x - mean.view(1, -1, *[1] * (x.dim() - 2))).square().sum(dims)
    stacked = _AllGather.apply(torch.cat([count, mean, squared_deviations]), group)  # ranks x (1 + 2C)
    counts, means, deviations = stacked[:, :1], stacked[:, 1:1 + x.shape[1]], stacked[:, 1 + x.shape[1]:]
    total = counts.sum()
    group_mean = (counts * means).sum(0) / total
    group_m2 = (deviations + counts * (means - group_mean).square()).sum(0)
    return group_mean, group_m2 / total, total


class _GroupSynced:
    """Mixin: in training mode with a group set, normalize with the group's batch statistics."""

    sync_group: dist.ProcessGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.sync_group is not None):
            return super().forward(x)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in fp32 at least
        mean, var, total = _group_statistics(xf, self.sync_group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1).clamp_min(1), momentum)  # unbiased
        shape = (1, -1, *[1] * (x.dim() - 2))
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        y = y.to(x.dtype)
        if isinstance(self, BatchNormAct2d):
            y = self.act(self.drop(y))
        return y


class GroupSyncBatchNorm1d(_GroupSynced, nn.BatchNorm1d):
    pass


class GroupSyncBatchNorm2d(_GroupSynced, nn.BatchNorm2d):
    pass


class GroupSyncBatchNormAct2d(_GroupSynced, BatchNormAct2d):
    pass


_SYNCED = {nn.BatchNorm1d: GroupSyncBatchNorm1d, nn.BatchNorm2d: GroupSyncBatchNorm2d,
           BatchNormAct2d: GroupSyncBatchNormAct2d}


def sync_batch_norm(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Make every BatchNorm layer of `module` share batch statistics across `group` (None: leave them local).

    Layers change class in place to a synchronized subclass of their own class: parameters, buffers and names stay.
    """
    if group is None:
        return module
    for layer in module.modules():
        synced = _SYNCED.get(type(layer))
        if synced is not None:
            layer.__class__ = synced
            layer.sync_group = group
    return module
