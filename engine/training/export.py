"""Export: backbone weights of a run (backbone_*.pt or a DeepSpeed checkpoint) -> timm-format safetensors.

    seer export RUN/backbone_final.pt OUT.safetensors
    seer export RUN/checkpoints OUT.safetensors          # DeepSpeed checkpoint: the step named by `latest`
    seer export RUN/checkpoints/step_00001000 OUT.safetensors

The backbone is timm's RegNet with timm's module names, so the exported keys are timm's as they are: a file loads
with `timm.create_model(<timm name>, num_classes=0, in_chans=C, checkpoint_path=OUT)` (a strict load), or, for
presets timm has no name for, into `timm.models.regnet.RegNet(RegNetCfg(...), in_chans=C, num_classes=0)`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml
from safetensors.torch import save_file
from timm.models.regnet import RegNetCfg

from engine.models.backbone import PRESETS, build_backbone
from engine.models.weights import BackboneWeights, architecture, check_fits, read_weights

FORMAT = "seer-backbone/1"


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
    from engine.training.checkpoint import read_manifest  # here: they import DeepSpeed
    from engine.training.zero_state import consolidated_weights

    manifest = read_manifest(checkpoints / tag)
    if manifest is None:
        raise ValueError(f"{checkpoints / tag} is not a complete checkpoint (no complete.json, or a file missing or "
                         f"cut short): export the step `latest` names, or another complete step_XXXXXXXX folder")
    run_config = checkpoints.parent / "config.yaml"
    if not run_config.is_file():
        raise FileNotFoundError(f"{run_config} not found: it names the backbone that {checkpoints} was trained with")
    config = yaml.safe_load(run_config.read_text())
    model = consolidated_weights(checkpoints / tag, manifest)  # at ZeRO >= 1 the optimizer's fp32 master copy
    state = {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
    return BackboneWeights(state, config["model"]["backbone"], config["data"]["channels"], checkpoints / tag)


def export(checkpoint: str | Path, out: str | Path) -> dict:
    """Write the backbone of `checkpoint` (backbone_*.pt or a DeepSpeed checkpoint folder) to `out` as safetensors
    with timm key names; returns a summary whose "load" is Python code that loads the file."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"export writes safetensors: name the output *.safetensors, got {out}")
    weights = read_deepspeed_checkpoint(checkpoint) if checkpoint.is_dir() else read_weights(checkpoint)
    architecture(weights)
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
