"""The SwAV model: backbone + projection head + prototypes, whose forward is the swapped-prediction loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.models.activation_checkpointing import enable_activation_checkpointing
from engine.models.backbone import build_backbone, is_partitioned
from engine.models.batchnorm import sync_batch_norm
from engine.models.weights import load_weights_into, read_weights


@dataclass(frozen=True)
class SwAVLoss:
    """The swapped-prediction objective (the config's swav section) and the ranks whose samples Sinkhorn balances
    codes over (`group`, None: the default process group)."""

    crops_for_assign: tuple[int, ...] = (0, 1)
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    backend: str = "auto"  # kernels backend: auto (Triton on CUDA) | torch | triton
    group: object = None

    @classmethod
    def from_config(cls, swav, group=None) -> SwAVLoss:
        return cls(tuple(swav.crops_for_assign), swav.temperature, swav.epsilon, swav.sinkhorn_iterations,
                   swav.backend, group)

    def __call__(self, embeddings: torch.Tensor, prototypes: torch.Tensor, n_crops: int) -> torch.Tensor:
        return kernels.swav_loss(embeddings, prototypes, n_crops=n_crops, crops_for_assign=self.crops_for_assign,
                                 temperature=self.temperature, epsilon=self.epsilon,
                                 sinkhorn_iterations=self.sinkhorn_iterations, group=self.group, backend=self.backend)


class SwAVHead(nn.Module):
    """Projection MLP + prototypes; forward returns the SwAV loss of the multi-crop batch's features.

    The loss is computed here, inside the module that owns the prototypes, so that ZeRO-3 has them gathered.
    """

    def __init__(self, in_dim: int, hidden_dims: list[int], embedding_dim: int, num_prototypes: int,
                 batch_norm: bool, loss: SwAVLoss):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers.append(nn.Linear(in_dim, width))
            layers += [nn.BatchNorm1d(width)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            in_dim = width
        layers.append(nn.Linear(in_dim, embedding_dim))
        self.projection = nn.Sequential(*layers)
        # Unit-norm rows, kept in fp32 whatever the compute dtype; normalize_prototypes() after every optimizer step.
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_prototypes, embedding_dim), dim=1))
        self.loss = loss
        self.num_prototypes = num_prototypes
        # Histogram of the assigned crops' nearest prototypes over the training forwards since the last
        # take_assignment_counts(): the collapse monitor's prototype-usage statistics (engine/training/monitor.py).
        self.assignment_counts: torch.Tensor | None = None

    def forward(self, features: torch.Tensor, n_crops: int) -> torch.Tensor:
        embeddings = self.projection(features)
        if self.training:
            self._count_assignments(embeddings.detach(), n_crops)
        return self.loss(embeddings, self.prototypes, n_crops)

    @torch.no_grad()
    def _count_assignments(self, embeddings: torch.Tensor, n_crops: int) -> None:
        # Here, not in the loss kernels: under ZeRO-3 the prototypes are gathered only during this forward. One
        # (assigned crops x B) x K score matrix, small next to the backbone.
        assigned = embeddings.view(n_crops, -1, embeddings.shape[1])[list(self.loss.crops_for_assign)]
        nearest = (F.normalize(assigned.flatten(0, 1).float(), dim=1) @ self.prototypes.float().T).argmax(dim=1)
        # Not bincount: on CUDA it reads the largest index on the host to size its output, a sync every step.
        counts = torch.zeros(self.num_prototypes, dtype=torch.long, device=nearest.device)
        counts.index_add_(0, nearest, torch.ones_like(nearest))
        self.assignment_counts = counts if self.assignment_counts is None else self.assignment_counts + counts

    def take_assignment_counts(self) -> torch.Tensor | None:
        """This rank's assignment histogram (K int64 counts; None if no training forward ran) and a reset."""
        counts, self.assignment_counts = self.assignment_counts, None
        return counts

    @torch.no_grad()
    def normalize_prototypes(self, zero_stage: int = 0) -> None:
        """Unit-norm prototype rows (after each optimizer step), in the module and in ZeRO's fp32 master copy alike.

        Under ZeRO >= 1 the optimizer updates a separate fp32 copy and writes it back to the module, so an in-place
        change of the module's tensor alone would be lost at the next step; under ZeRO-3 the rows are partitioned.
        """
        if zero_stage == 0:
            self.prototypes.copy_(F.normalize(self.prototypes.float(), dim=1))
            return
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        with deepspeed.zero.GatheredParameters([self.prototypes], modifier_rank=0, enabled=zero_stage == 3):
            value = F.normalize(self.prototypes.detach().float(), dim=1)
            self.prototypes.copy_(value)
        safe_set_full_fp32_param(self.prototypes, value)


class SwAVModel(nn.Module):
    """Backbone + SwAV head over a multi-crop batch: forward(list of crop tensors, crop-major) -> loss.

    With channels_last, crops are fed NHWC; convert the module too (`.to(memory_format=model.memory_format)`):
    NHWC inputs against NCHW weights were 3.5x slower on CPU, both NHWC 1.9x faster than NCHW.
    """

    def __init__(self, backbone: nn.Module, head: SwAVHead, channels_last: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        # One backbone pass per run of consecutive equal-size crops (e.g. 2x224 then 4x96): fewer, larger batches.
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            batch = torch.cat(crops[start:end]).contiguous(memory_format=self.memory_format)
            features.append(self.backbone(batch))
            start = end
        return self.head(torch.cat(features).float(), n_crops=len(crops))


def build_swav_model(cfg, group=None, bn_group=None) -> SwAVModel:
    """The SwAV model described by a Config (engine.config); `group` spans the ranks Sinkhorn balances over,
    `bn_group` the ranks sharing BatchNorm statistics (engine.models.batchnorm.batch_norm_group; None: per rank)."""
    backbone = build_backbone(cfg.model.backbone, in_chans=cfg.data.channels)
    enable_activation_checkpointing(backbone, cfg.model.activation_checkpointing)
    if cfg.model.init_weights:
        import deepspeed

        # ZeRO-3 (built under deepspeed.zero.Init): the backbone is whole on each rank while the file is loaded.
        with deepspeed.zero.GatheredParameters(list(backbone.parameters()), modifier_rank=0,
                                               enabled=is_partitioned(backbone)):
            load_weights_into(backbone, read_weights(cfg.model.init_weights),
                              f"backbone {cfg.model.backbone} (in_chans={cfg.data.channels})", label="model.init_weights")
    head = SwAVHead(backbone.num_features, cfg.model.head_hidden_dims, cfg.model.embedding_dim,
                    cfg.model.num_prototypes, cfg.model.head_batch_norm, SwAVLoss.from_config(cfg.swav, group))
    return sync_batch_norm(SwAVModel(backbone, head, channels_last=cfg.model.channels_last), bn_group)
