"""Backbone weights in and out: export to timm-format safetensors, and strict loading of such files.

    seer export RUN/backbone_final.pt OUT.safetensors
    seer export RUN/checkpoints OUT.safetensors          # DeepSpeed checkpoint: the step named by `latest`
    seer export RUN/checkpoints/step_00001000 OUT.safetensors

The backbone is timm's RegNet with timm's module names, so the exported keys are timm's as they are: a file loads
with `timm.create_model(<timm name>, num_classes=0, in_chans=C, checkpoint_path=OUT)` (a strict load), or, for
presets timm has no name for, into `timm.models.regnet.RegNet(RegNetCfg(...), in_chans=C, num_classes=0)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from timm.models.regnet import RegNetCfg
from torch import nn

from engine.models import PRESETS, build_backbone

FORMAT = "seer-backbone/1"
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


def read_deepspeed_checkpoint(path: str | Path) -> BackboneWeights:
    """The backbone of a pretraining checkpoint: `train.output_dir/checkpoints` (the step `latest` names) or one
    `step_XXXXXXXX` folder in it. The architecture comes from the run's config.yaml next to `checkpoints`."""
    path = Path(path)
    if (path / "latest").is_file():
        checkpoints, tag = path, (path / "latest").read_text().strip()
    elif any(path.glob("*model_states.pt")):
        checkpoints, tag = path.parent, path.name
    else:
        raise FileNotFoundError(f"{path} holds no DeepSpeed checkpoint: expected train.output_dir/checkpoints (with a "
                                f"`latest` file) or one of its step_XXXXXXXX folders")
    from engine.checkpoint import read_manifest  # here: it imports DeepSpeed

    manifest = read_manifest(checkpoints / tag)
    if manifest is None:
        raise ValueError(f"{checkpoints / tag} is not a complete checkpoint (no complete.json, or a file missing or "
                         f"cut short): export the step `latest` names, or another complete step_XXXXXXXX folder")
    run_config = checkpoints.parent / "config.yaml"
    if not run_config.is_file():
        raise FileNotFoundError(f"{run_config} not found: it names the backbone that {checkpoints} was trained with")
    config = yaml.safe_load(run_config.read_text())
    if manifest["zero_stage"] == 0:
        model = torch.load(checkpoints / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=True)["module"]
    else:
        # ZeRO >= 1: the exact fp32 weights are the optimizer's master copy, partitioned across the ranks' files.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it reports its progress with print()
            model = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    state = {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
    return BackboneWeights(state, config["model"]["backbone"], config["data"]["channels"], checkpoints / tag)


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


def _architecture(weights: BackboneWeights, default_name: str | None = None,
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
    name, in_chans = _architecture(weights, default_name, channels)
    if channels is not None and in_chans != channels:
        raise ValueError(f"{weights.path} takes {in_chans}-channel images but data.channels is {channels}")
    backbone = build_backbone(name, in_chans=in_chans)
    load_weights_into(backbone, weights, f"backbone {name} (in_chans={in_chans})", label=label)
    return backbone, name


def load_backbone_weights(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The backbone stored at `path` (exported .safetensors or backbone_*.pt), in eval mode."""
    return backbone_from_weights(read_weights(path))[0].to(device).eval()


def export(checkpoint: str | Path, out: str | Path) -> dict:
    """Write the backbone of `checkpoint` (backbone_*.pt or a DeepSpeed checkpoint folder) to `out` as safetensors
    with timm key names; returns a summary whose "load" is Python code that loads the file."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"export writes safetensors: name the output *.safetensors, got {out}")
    weights = read_deepspeed_checkpoint(checkpoint) if checkpoint.is_dir() else read_weights(checkpoint)
    _architecture(weights)
    spec = PRESETS.get(weights.name, weights.name)
    target = f"backbone {weights.name} (in_chans={weights.in_chans})"
    # The file must load strictly as it is: checked against the architecture built on the meta device (no memory).
    check_fits(build_backbone(weights.name, in_chans=weights.in_chans, device="meta").state_dict(),
               weights.state_dict, weights.path, target)
    metadata = {"format": FORMAT, "backbone": weights.name, "in_chans": str(weights.in_chans),
                "source": str(weights.path)}
    if isinstance(spec, RegNetCfg):
        metadata["regnet_cfg"] = json.dumps(dataclasses.asdict(spec))
        load = (f"from safetensors.torch import load_file\nfrom timm.models.regnet import RegNet, RegNetCfg\n"
                f"model = RegNet({spec!r}, in_chans={weights.in_chans}, num_classes=0)\n"
                f"model.load_state_dict(load_file({str(out)!r}))")
    else:
        metadata["timm_model"] = spec
        load = (f"import timm\n"
                f"model = timm.create_model({spec!r}, num_classes=0, in_chans={weights.in_chans}, "
                f"checkpoint_path={str(out)!r})")
    # Contiguous copies: safetensors stores plain row-major tensors (checkpoints may hold channels_last ones).
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.state_dict.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return {"out": str(out), "backbone": weights.name, "in_chans": weights.in_chans, "tensors": len(tensors),
            "source": str(weights.path), "load": load}
