"""Backbone weights out (`seer export` -> timm-format safetensors) and back in (model.init_weights).

Every round trip is checked by loading strictly into an independently built network and comparing features
bit for bit; the DeepSpeed checkpoints come from real (2-step) pretraining runs on Fashion-MNIST.
"""
import json
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.regnet import RegNet, RegNetCfg

from engine.cli import build_parser
from engine.models.weights import load_backbone_weights
from engine.training.export import export
from engine.models.backbone import build_backbone
from engine.models.swav import build_swav_model
from engine.training.pretrain import pretrain
from tiny_run import SEER, child_env, tiny_config


def perturbed_backbone(name: str, in_chans: int) -> torch.nn.Module:
    """A backbone whose every weight and BN statistic differs from its initialization, so a tensor that is lost,
    swapped or re-initialized on the way shows in the features."""
    torch.manual_seed(0)
    backbone = build_backbone(name, in_chans=in_chans)
    with torch.no_grad():
        for tensor in backbone.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.rand_like(tensor))  # positive: running variances stay valid
    return backbone.eval()


def save_backbone_file(backbone: torch.nn.Module, name: str, in_chans: int, path: Path) -> Path:
    """The file format of Pretrainer.save_backbone (backbone_final.pt)."""
    torch.save({"backbone": name, "in_chans": in_chans, "state_dict": backbone.state_dict()}, path)
    return path


def features(model: torch.nn.Module, in_chans: int) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(4, in_chans, 32, 32, generator=torch.Generator().manual_seed(1)))


def run_seer(capsys, *argv) -> dict:
    """`seer ARGV` in this process; its JSON line."""
    args = build_parser().parse_args([str(a) for a in argv])
    args.run(args)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_timm_named_backbone_loads_strictly_with_timm(tmp_path, capsys):
    backbone = perturbed_backbone("regnety_002", in_chans=1)
    out = tmp_path / "exported.safetensors"
    summary = run_seer(capsys, "export", save_backbone_file(backbone, "regnety_002", 1, tmp_path / "b.pt"), out)
    expected = features(backbone, 1)
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["timm_model"] == "regnety_002" and metadata["in_chans"] == "1"
    model = timm.create_model("regnety_002", num_classes=0, in_chans=1)
    model.load_state_dict(load_file(out), strict=True)
    assert torch.equal(features(model, 1), expected)
    namespace = {}
    exec(summary["load"], namespace)  # the call `seer export` prints: timm.create_model(..., checkpoint_path=OUT)
    assert "timm.create_model('regnety_002', num_classes=0, in_chans=1" in summary["load"]
    assert torch.equal(features(namespace["model"], 1), expected)
    assert torch.equal(features(load_backbone_weights(out), 1), expected)


def test_preset_without_timm_name_loads_into_timm_regnet_and_build_backbone(tmp_path):
    backbone = perturbed_backbone("regnety_micro", in_chans=3)
    out = tmp_path / "micro.safetensors"
    summary = export(save_backbone_file(backbone, "regnety_micro", 3, tmp_path / "b.pt"), out)
    expected = features(backbone, 3)
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["backbone"] == "regnety_micro" and "timm_model" not in metadata
    timm_regnet = RegNet(RegNetCfg(**json.loads(metadata["regnet_cfg"])), in_chans=3, num_classes=0)
    timm_regnet.load_state_dict(load_file(out), strict=True)
    ours = build_backbone("regnety_micro", in_chans=3)
    ours.load_state_dict(load_file(out), strict=True)
    namespace = {}
    exec(summary["load"], namespace)
    for model in (timm_regnet, ours, namespace["model"], load_backbone_weights(out)):
        assert torch.equal(features(model, 3), expected)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_export_from_deepspeed_checkpoint_equals_the_final_backbone(shards, tmp_path, stage):
    run = tmp_path / "run"
    # Stage 0 trains channels_last: its checkpoint holds NHWC-strided tensors, which safetensors cannot store as such.
    pretrain(tiny_config(shards, run, "train.steps=2", "train.checkpoint_every=1", "optim.name=sgd",
                         f"train.zero_stage={stage}"))
    final = torch.load(run / "backbone_final.pt", weights_only=True)["state_dict"]
    latest = load_file(export(run / "checkpoints", tmp_path / "latest.safetensors")["out"])
    step_2 = load_file(export(run / "checkpoints" / "step_00000002", tmp_path / "step2.safetensors")["out"])
    step_1 = load_file(export(run / "checkpoints" / "step_00000001", tmp_path / "step1.safetensors")["out"])
    assert latest.keys() == final.keys() == step_1.keys()
    for name in final:
        assert torch.equal(latest[name], final[name]) and torch.equal(step_2[name], final[name]), name
    assert not torch.equal(step_1["stem.conv.weight"], final["stem.conv.weight"])  # the step asked for, not `latest`
    if stage > 0:  # bit for bit what DeepSpeed's own reconstruction from the ranks' partitions gives
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        deepspeed_weights = get_fp32_state_dict_from_zero_checkpoint(run / "checkpoints", tag="step_00000001")
        for name, value in step_1.items():
            assert torch.equal(value, deepspeed_weights[f"backbone.{name}"]), name
    (run / "checkpoints" / "step_00000001" / "complete.json").unlink()  # as a save cut short would leave it
    with pytest.raises(ValueError, match="step_00000001 is not a complete checkpoint"):
        export(run / "checkpoints" / "step_00000001", tmp_path / "torn.safetensors")


def test_init_weights_start_pretraining_from_the_file(shards, tmp_path):
    exported = tmp_path / "start.safetensors"
    export(save_backbone_file(perturbed_backbone("regnety_micro", 1), "regnety_micro", 1, tmp_path / "b.pt"), exported)
    run = tmp_path / "run"
    pretrain(tiny_config(shards, run, "train.steps=1", f"model.init_weights={exported}"))
    start = torch.load(run / "backbone_init.pt", weights_only=True)["state_dict"]
    expected = load_file(exported)
    assert start.keys() == expected.keys()
    for name in expected:
        assert torch.equal(start[name], expected[name]), name
    # A backbone_*.pt file works the same way.
    model = build_swav_model(tiny_config(shards, run, f"model.init_weights={tmp_path / 'b.pt'}"))
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_init_weights_from_timm_classifier_weights_ignore_its_classifier(shards, tmp_path):
    classifier = timm.create_model("regnety_002", num_classes=10, in_chans=1)
    torch.nn.init.normal_(classifier.stem.conv.weight)
    save_file(classifier.state_dict(), tmp_path / "timm.safetensors")  # no seer metadata, as timm writes them
    model = build_swav_model(tiny_config(shards, tmp_path, "model.backbone=regnety_002",
                                         f"model.init_weights={tmp_path / 'timm.safetensors'}"))
    expected = classifier.state_dict()
    assert set(expected) - set(model.backbone.state_dict()) == {"head.fc.weight", "head.fc.bias"}
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_bad_weight_files_are_one_clear_error(shards, tmp_path):
    micro = save_backbone_file(build_backbone("regnety_micro", in_chans=1), "regnety_micro", 1, tmp_path / "m.pt")
    tiny = r"backbone regnety_tiny \(in_chans=1\)"
    with pytest.raises(ValueError, match=rf"model.init_weights={micro} does not fit {tiny}: 'stem.conv.weight' has "
                                         rf"shape \(8, 1, 3, 3\) in the file, {tiny} expects \(24, 1, 3, 3\) "
                                         r"\(and \d+ more"):
        build_swav_model(tiny_config(shards, tmp_path, "model.backbone=regnety_tiny", f"model.init_weights={micro}"))
    with pytest.raises(ValueError, match=r"'stem.conv.weight' has shape \(8, 1, 3, 3\) in the file, .* expects "
                                         r"\(8, 3, 3, 3\)$"):
        build_swav_model(tiny_config(shards, tmp_path, "data.channels=3", "data.mean=[0.5, 0.5, 0.5]",
                                     "data.std=[0.2, 0.2, 0.2]", f"model.init_weights={micro}"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        load_backbone_weights(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt is neither a .safetensors file nor a backbone file"):
        export(tmp_path / "junk.pt", tmp_path / "out.safetensors")
    with pytest.raises(FileNotFoundError, match="backbone weights not found"):
        export(tmp_path / "missing.pt", tmp_path / "out.safetensors")
    with pytest.raises(FileNotFoundError, match="holds no DeepSpeed checkpoint"):
        export(tmp_path, tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match="name the output \\*.safetensors"):
        export(micro, tmp_path / "out.pt")
    # Through the command: one line, no traceback. (Without the rank variables this test process has set.)
    run = subprocess.run([SEER, "pretrain", *[f"{k}={v}" for k, v in (
        ("data.train_shards", shards["train"]), ("model.backbone", "regnety_tiny"), ("model.init_weights", micro),
        ("train.output_dir", tmp_path / "cli-run"))]], capture_output=True, text=True, timeout=300, env=child_env())
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith(f"seer: error: model.init_weights={micro} does not fit")
    assert "Traceback" not in run.stderr
