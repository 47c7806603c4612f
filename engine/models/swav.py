"""The SwAV model: backbone + projection head + prototypes, whose forward is the swapped-prediction loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.config import prototype_heads
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

    def __call__(self, embeddings: torch.Tensor, prototypes: torch.Tensor, n_crops: int,
                 queue: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss, and each assigned sample's nearest prototype (n_assign x B, from the kernels' scoring pass)."""
        return kernels.swav_loss(embeddings, prototypes, n_crops=n_crops, crops_for_assign=self.crops_for_assign,
                                 temperature=self.temperature, epsilon=self.epsilon,
                                 sinkhorn_iterations=self.sinkhorn_iterations, group=self.group, backend=self.backend,
                                 queue=queue, return_nearest=True)


class SwAVHead(nn.Module):
    """Projection MLP, one or several prototype heads, and this rank's queue of past embeddings; forward returns
    the SwAV loss of a multi-crop batch's features (the mean over heads).

    The loss is computed here, inside the module that owns the prototypes, so that ZeRO-3 has them gathered.
    The queue (SwAV's, for batches smaller than the prototype count) holds the assigned crops' latest embeddings:
    filled once `queue_started` is set, it enters Sinkhorn once full. It is a per-rank buffer outside the state dict
    (rank 0's copy is not every rank's); the trainer checkpoints it per rank.
    """

    def __init__(self, in_dim: int, hidden_dims: list[int], embedding_dim: int, num_prototypes: int | list[int],
                 batch_norm: bool, loss: SwAVLoss, queue_length: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers.append(nn.Linear(in_dim, width))
            layers += [nn.BatchNorm1d(width)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            in_dim = width
        layers.append(nn.Linear(in_dim, embedding_dim))
        self.projection = nn.Sequential(*layers)
        self.heads = prototype_heads(num_prototypes)
        # Unit-norm rows, kept in fp32 whatever the compute dtype; normalize_prototypes() after every optimizer step.
        self.prototypes = nn.ParameterList(
            nn.Parameter(F.normalize(torch.randn(k, embedding_dim), dim=1)) for k in self.heads)
        self.loss = loss
        self.register_buffer("queue", torch.zeros(len(loss.crops_for_assign), queue_length, embedding_dim),
                             persistent=False)
        self.queue_filled = 0  # rows of the queue holding embeddings
        self.queue_started = False
        # Histograms of the assigned crops' nearest prototypes (one per head) over the training forwards since the
        # last take_assignment_counts(): the collapse monitor's prototype-usage statistics (engine/training/monitor.py).
        self.assignment_counts: list[torch.Tensor] | None = None
        self.head_losses: list[torch.Tensor] = []  # of the last forward, detached
        self.last_embeddings: torch.Tensor | None = None

    def forward(self, features: torch.Tensor, n_crops: int) -> torch.Tensor:
        embeddings = self.projection(features)
        queue = self.queue if self.queue.shape[1] and self.queue_filled == self.queue.shape[1] else None
        losses, nearest = zip(*(self.loss(embeddings, p, n_crops, queue) for p in self.prototypes))
        if self.training:
            self._count_assignments(nearest)
            if self.queue_started:
                self._enqueue(embeddings.detach(), n_crops)
        self.head_losses = [loss.detach() for loss in losses]
        self.last_embeddings = embeddings.detach()  # for a non-finite loss's diagnostics
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def _assigned(self, embeddings: torch.Tensor, n_crops: int) -> torch.Tensor:
        """The assigned crops' rows: n_assign x B x D."""
        return embeddings.view(n_crops, -1, embeddings.shape[1])[list(self.loss.crops_for_assign)]

    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor, n_crops: int) -> None:
        """First in, first out: the newest embeddings at the front (their normalization is the loss's)."""
        length = self.queue.shape[1]
        if length == 0:
            return
        new = self._assigned(embeddings, n_crops)[:, :length].to(self.queue.dtype)
        self.queue.copy_(torch.cat([new, self.queue[:, :length - new.shape[1]]], dim=1))
        self.queue_filled = min(length, self.queue_filled + new.shape[1])

    @torch.no_grad()
    def _count_assignments(self, nearest: tuple[torch.Tensor, ...]) -> None:
        """Add each head's nearest prototypes of the assigned crops (from the loss's scoring pass) to its histogram."""
        counts = []
        for k, head_nearest in zip(self.heads, nearest):
            flat = head_nearest.flatten()
            # Not bincount: on CUDA it reads the largest index on the host to size its output, a sync every step.
            counts.append(torch.zeros(k, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat)))
        if self.assignment_counts is not None:
            counts = [a + b for a, b in zip(self.assignment_counts, counts)]
        self.assignment_counts = counts

    def take_assignment_counts(self) -> list[torch.Tensor] | None:
        """This rank's assignment histograms (per head, K int64 counts; None if no training forward ran), reset."""
        counts, self.assignment_counts = self.assignment_counts, None
        return counts

    def queue_state(self) -> dict:
        return {"queue": self.queue.detach().cpu().clone(), "queue_filled": self.queue_filled}

    def load_queue_state(self, state: dict) -> None:
        if tuple(state["queue"].shape) != tuple(self.queue.shape):
            raise ValueError(f"the checkpoint's queue has shape {tuple(state['queue'].shape)}, this run's "
                             f"{tuple(self.queue.shape)} (swav.queue_length or the world size changed)")
        self.queue.copy_(state["queue"])
        self.queue_filled = state["queue_filled"]

    @torch.no_grad()
    def normalize_prototypes(self, zero_stage: int = 0) -> None:
        """Unit-norm prototype rows (after each optimizer step), in the module and in ZeRO's fp32 master copy alike.

        Under ZeRO >= 1 the optimizer updates a separate fp32 copy and writes it back to the module, so an in-place
        change of the module's tensor alone would be lost at the next step; under ZeRO-3 the rows are partitioned.
        """
        if zero_stage == 0:
            for prototypes in self.prototypes:
                prototypes.copy_(F.normalize(prototypes.float(), dim=1))
            return
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        for prototypes in self.prototypes:
            with deepspeed.zero.GatheredParameters([prototypes], modifier_rank=0, enabled=zero_stage == 3):
                value = F.normalize(prototypes.detach().float(), dim=1)
                prototypes.copy_(value)
            safe_set_full_fp32_param(prototypes, value)


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


def build_swav_model(cfg, group=None, bn_group=None, queue_length: int = 0) -> SwAVModel:
    """The SwAV model described by a Config (engine.config); `group` spans the ranks Sinkhorn balances over,
    `bn_group` the ranks sharing BatchNorm statistics (engine.models.batchnorm.batch_norm_group; None: per rank);
    `queue_length`: this rank's share of swav.queue_length."""
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
                    cfg.model.num_prototypes, cfg.model.head_batch_norm, SwAVLoss.from_config(cfg.swav, group),
                    queue_length)
    return sync_batch_norm(SwAVModel(backbone, head, channels_last=cfg.model.channels_last), bn_group)
