"""Backbone weight files: reading them (exported or timm .safetensors, backbone_*.pt of pretraining) and loading
them strictly into a backbone. Below the trainer and export, beside the backbone it builds."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from engine.models.backbone import build_backbone

# A timm classifier's head: absent from a num_classes=0 backbone, so dropped when such weights initialize one.
CLASSIFIER_KEYS = ("head.fc.weight", "head.fc.bias")


@dataclass
class BackboneWeights:
    """A backbone state dict (timm key names) read from `path`; `name` and `in_chans` are None when the file
    does not say (a safetensors file written by timm rather than by seer)."""

    state_dict: dict[str, torch.Tensor]
    name: str | None
    in_chans: int | None
    path: Path


def read_weights(path: str | Path) -> BackboneWeights:
    """Backbone weights from a safetensors file or a backbone file of pretraining (`backbone_final.pt`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        in_chans = metadata.get("in_chans")
        return BackboneWeights(state, metadata.get("backbone"), int(in_chans) if in_chans else None, path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and unpickling errors alike mean "not such a file"
        raise ValueError(f"{path} is neither a .safetensors file nor a backbone file of pretraining: {err}") from None
    if not isinstance(saved, dict) or not {"backbone", "in_chans", "state_dict"} <= set(saved):
        raise ValueError(f"{path} is not a backbone file of pretraining (a dict with backbone, in_chans and "
                         f"state_dict, like RUN/backbone_final.pt)")
    return BackboneWeights(saved["state_dict"], saved["backbone"], saved["in_chans"], path)


def check_fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path, target: str,
               label: str = "") -> None:
    """Raise one ValueError naming the file (`label=path` when given) and the first key that keeps `state` from
    loading strictly into a module whose state dict is `expected` (described as `target`)."""
    problems = []
    for key, reference in expected.items():
        if key not in state:
            problems.append(f"{key!r} is missing from the file")
        elif state[key].shape != reference.shape:
            problems.append(f"{key!r} has shape {tuple(state[key].shape)} in the file, {target} expects "
                            f"{tuple(reference.shape)}")
    problems += [f"{key!r} in the file is not in {target}" for key in state if key not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise ValueError(f"{label + '=' if label else ''}{path} does not fit {target}: {problems[0]}{more}")


def load_weights_into(backbone: nn.Module, weights: BackboneWeights, target: str, label: str = "") -> None:
    """Strictly load `weights` into `backbone` (described as `target` in errors, see check_fits).

    A timm classifier's weights (`head.fc.*`) are ignored when the backbone has no classifier, so weights of a
    timm ImageNet model can start a pretraining.
    """
    expected = backbone.state_dict()
    state = {k: v for k, v in weights.state_dict.items() if k in expected or k not in CLASSIFIER_KEYS}
    check_fits(expected, state, weights.path, target, label)
    backbone.load_state_dict(state, strict=True)


def architecture(weights: BackboneWeights, default_name: str | None = None,
                  default_chans: int | None = None) -> tuple[str, int]:
    """The backbone name and input channels of `weights` (the defaults where the file does not say)."""
    name, in_chans = weights.name or default_name, weights.in_chans or default_chans
    if name is None or in_chans is None:
        raise ValueError(f"{weights.path} does not say which backbone it holds (no seer metadata): load it with "
                         f"timm.create_model(<name>, num_classes=0, checkpoint_path=...), or pretrain from it "
                         f"with model.init_weights")
    return name, in_chans


def backbone_from_weights(weights: BackboneWeights, *, channels: int | None = None, default_name: str | None = None,
                          label: str = "") -> tuple[nn.Module, str]:
    """The backbone `weights` describe, loaded strictly, and its name.

    channels: what the caller will feed it (data.channels); a file for other images is an error.
    default_name: the backbone a file without seer metadata (e.g. written by timm) is taken to be.
    """
    name, in_chans = architecture(weights, default_name, channels)
    if channels is not None and in_chans != channels:
        raise ValueError(f"{weights.path} takes {in_chans}-channel images but data.channels is {channels}")
    backbone = build_backbone(name, in_chans=in_chans)
    load_weights_into(backbone, weights, f"backbone {name} (in_chans={in_chans})", label=label)
    return backbone, name


def load_backbone_weights(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The backbone stored at `path` (exported .safetensors or backbone_*.pt), in eval mode."""
    return backbone_from_weights(read_weights(path))[0].to(device).eval()
