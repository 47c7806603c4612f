"""RegNetY backbones (timm's implementation and module names) and the SwAV head."""
from __future__ import annotations

from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F
from timm.models._manipulate import named_apply
from timm.models.regnet import RegNet, RegNetCfg
from timm.models.regnet import _init_weights as regnet_init_weights
from torch import nn

import kernels
from engine.activation_checkpointing import enable_activation_checkpointing
from engine.batchnorm import sync_batch_norm

# name -> timm model name, or a RegNetCfg for sizes timm has no name for. Trunk parameter counts (no classifier)
# are in ../shared/SEER_RECIPE.md; tests/test_models.py checks them on the meta device.
PRESETS: dict[str, str | RegNetCfg] = {
    # CPU sizes: tests (micro) and the Fashion-MNIST demo (tiny, 0.46M, 192-d features).
    "regnety_micro": RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=8, se_ratio=0.25, stem_width=8),
    "regnety_tiny": RegNetCfg(depth=10, w0=24, wa=16.0, wm=2.0, group_size=8, se_ratio=0.25, stem_width=24),
    # SEER sizes.
    "regnety_32gf": "regnety_320",  # 141.3M
    "regnety_64gf": "regnety_640",  # 276.5M
    "regnety_128gf": "regnety_1280",  # 637.4M
    "regnety_256gf": "regnety_2560",  # 1272.2M, the SEER one (ClassyVision's regnet_y_256gf is another net)
    "seer_10b": RegNetCfg(depth=27, w0=1744, wa=620.83, wm=2.52, group_size=1010, se_ratio=0.25),  # 9323.9M
}


def build_backbone(name: str, *, in_chans: int = 3, device: torch.device | str | None = None) -> RegNet:
    """A RegNet trunk without classifier: forward(images) -> pooled features of size `.num_features`.

    `name` is a key of PRESETS or any timm RegNet name. Each block's last BN starts at weight 1, not timm's
    default 0 (`zero_init_last`), so features at initialization are not degenerate and a random-init baseline
    is an honest one.
    """
    spec = PRESETS.get(name, name)
    if not isinstance(spec, RegNetCfg) and (not spec.startswith("regnet") or not timm.is_model(spec)):
        raise ValueError(
            f"unknown backbone {name!r}: use one of {', '.join(PRESETS)} or a timm RegNet name "
            f"(e.g. {', '.join(timm.list_models('regnety_0*')[:3])})"
        )
    with torch.device(device) if device is not None else nullcontext():
        if isinstance(spec, RegNetCfg):
            backbone = RegNet(spec, in_chans=in_chans, num_classes=0, zero_init_last=False)
        else:
            backbone = timm.create_model(spec, pretrained=False, num_classes=0, in_chans=in_chans, zero_init_last=False)
    if is_partitioned(backbone):
        _initialize_partitioned(backbone)
    return backbone


def is_partitioned(module: nn.Module) -> bool:
    """Built under deepspeed.zero.Init (ZeRO-3): each parameter holds only this rank's partition."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _initialize_partitioned(backbone: nn.Module) -> None:
    """Run timm's RegNet weight init again, one module at a time with its parameters gathered.

    Under deepspeed.zero.Init a module's parameters are partitioned as soon as its own __init__ returns, so the init
    pass RegNet.__init__ makes over its finished children wrote into empty partitions. Repeating it in the same
    (depth-first) order draws the same random numbers, so ZeRO-3 starts from exactly the weights of stages 0-2, and
    only one module is ever whole in memory.
    """
    import deepspeed

    def init_gathered(module: nn.Module, name: str) -> None:
        params = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=bool(params)):
            regnet_init_weights(module, name, zero_init_last=False)

    named_apply(init_gathered, backbone)


class SwAVHead(nn.Module):
    """Projection MLP + prototypes; forward returns the SwAV swapped-prediction loss.

    The loss is computed here, inside the module that owns the prototypes, so that ZeRO-3 has them gathered.
    """

    def __init__(self, in_dim: int, hidden_dims: list[int], embedding_dim: int, num_prototypes: int,
                 batch_norm: bool, swav_options: dict):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers.append(nn.Linear(in_dim, width))
            layers += [nn.BatchNorm1d(width)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            in_dim = width
        layers.append(nn.Linear(in_dim, embedding_dim))
        self.projection = nn.Sequential(*layers)
        # Unit-norm rows, kept in fp32 whatever the compute dtype; the trainer re-normalizes them after every step.
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_prototypes, embedding_dim), dim=1))
        self.swav_options = swav_options
        self.num_prototypes = num_prototypes
        # Histogram of the assigned crops' nearest prototypes over the training forwards since the last
        # take_assignment_counts(): the collapse monitor's prototype-usage statistics (engine/monitor.py).
        self.assignment_counts: torch.Tensor | None = None

    def forward(self, features: torch.Tensor, n_crops: int) -> torch.Tensor:
        embeddings = self.projection(features)
        if self.training:
            self._count_assignments(embeddings.detach(), n_crops)
        return kernels.swav_loss(embeddings, self.prototypes, n_crops=n_crops, **self.swav_options)

    @torch.no_grad()
    def _count_assignments(self, embeddings: torch.Tensor, n_crops: int) -> None:
        # Here, not in the loss kernels: under ZeRO-3 the prototypes are gathered only during this forward. One
        # (assigned crops x B) x K score matrix, small next to the backbone.
        assigned = embeddings.view(n_crops, -1, embeddings.shape[1])[list(self.swav_options["crops_for_assign"])]
        nearest = (F.normalize(assigned.flatten(0, 1).float(), dim=1) @ self.prototypes.float().T).argmax(dim=1)
        # Not bincount: on CUDA it reads the largest index on the host to size its output, a sync every step.
        counts = torch.zeros(self.num_prototypes, dtype=torch.long, device=nearest.device)
        counts.index_add_(0, nearest, torch.ones_like(nearest))
        self.assignment_counts = counts if self.assignment_counts is None else self.assignment_counts + counts

    def take_assignment_counts(self) -> torch.Tensor | None:
        """This rank's assignment histogram (K int64 counts; None if no training forward ran) and a reset."""
        counts, self.assignment_counts = self.assignment_counts, None
        return counts


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
    `bn_group` the ranks sharing BatchNorm statistics (engine.batchnorm.batch_norm_group; None: per rank)."""
    backbone = build_backbone(cfg.model.backbone, in_chans=cfg.data.channels)
    enable_activation_checkpointing(backbone, cfg.model.activation_checkpointing)
    if cfg.model.init_weights:
        from engine.export import load_weights_into, read_weights  # here: engine.export imports this module

        import deepspeed

        # ZeRO-3 (built under deepspeed.zero.Init): the backbone is whole on each rank while the file is loaded.
        with deepspeed.zero.GatheredParameters(list(backbone.parameters()), modifier_rank=0,
                                               enabled=is_partitioned(backbone)):
            load_weights_into(backbone, read_weights(cfg.model.init_weights),
                              f"backbone {cfg.model.backbone} (in_chans={cfg.data.channels})", label="model.init_weights")
    swav = cfg.swav
    head = SwAVHead(
        backbone.num_features, cfg.model.head_hidden_dims, cfg.model.embedding_dim, cfg.model.num_prototypes,
        cfg.model.head_batch_norm,
        dict(crops_for_assign=tuple(swav.crops_for_assign), temperature=swav.temperature, epsilon=swav.epsilon,
             sinkhorn_iterations=swav.sinkhorn_iterations, group=group, backend=swav.backend),
    )
    return sync_batch_norm(SwAVModel(backbone, head, channels_last=cfg.model.channels_last), bn_group)
