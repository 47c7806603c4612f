"""RegNetY backbones: timm's implementation and module names, SEER's presets."""
from __future__ import annotations

from contextlib import nullcontext

import timm
import torch
from timm.models._manipulate import named_apply
from timm.models.regnet import RegNet, RegNetCfg
from timm.models.regnet import _init_weights as regnet_init_weights
from torch import nn

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
