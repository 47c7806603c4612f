"""`seer plan` (engine/plan.py): exact model-state bytes, activations traced on the meta device against real CPU runs
(saved tensors byte for byte, step peaks within 15%), SEER's published setting, one clear error for bad input."""
import argparse
import json
import re
import subprocess

import pytest
import torch

from engine import plan as P
from engine.config import load_config
from engine.models.backbone import build_backbone
from engine.models.swav import build_swav_model

from tiny_run import SEER

# Every key the plan reads is set here, so that the tests do not depend on the default config.
RGB = ["data.channels=3", "data.mean=[0.485, 0.456, 0.406]", "data.std=[0.229, 0.224, 0.225]"]
SEER_HEAD = ["model.head_hidden_dims=[8192, 8192]", "model.head_batch_norm=false", "model.embedding_dim=256",
             "model.num_prototypes=16000"]
SMALL_HEAD = ["model.head_hidden_dims=[64]", "model.head_batch_norm=false", "model.embedding_dim=32",
              "model.num_prototypes=100"]
# (preset, crops, batch): small enough for a CPU step; not used to shape the activation model (regnety_micro at
# 2x32,4x16 and regnety_tiny/002/004 at 48-64 px were). Shapes chosen to stay clear of a oneDNN crash in torch
# 2.14.1's CPU backward of 1x1 stride-2 channels_last convolutions (regnety_micro at 96 px and above).
CHECKED_RUNS = [("regnety_tiny", "2x40,4x20", 8), ("regnety_006", "2x32,4x16", 4)]


def run_overrides(backbone: str, crops: str, batch: int, *overrides: str, head=SMALL_HEAD) -> list[str]:
    """Overrides for `backbone` at `crops` ('2x40,4x20': count x size px) and `batch` images per GPU, RGB, fp32,
    ZeRO-0, no checkpointing, unless `overrides` say otherwise."""
    groups = ", ".join(f"{{size: {size}, count: {count}, scale: [0.14, 1.0]}}"
                       for count, size in (part.split("x") for part in crops.split(",")))
    return [f"model.backbone={backbone}", f"data.crops=[{groups}]", f"train.batch_size={batch}", *RGB, *head,
            "train.precision=fp32", "train.zero_stage=0", "model.activation_checkpointing=none", *overrides]


def run_config(backbone: str, crops: str, batch: int, *overrides: str, head=SMALL_HEAD):
    return load_config(None, run_overrides(backbone, crops, batch, *overrides, head=head))


@pytest.fixture(scope="module")
def seer_head_model():
    cfg = run_config("regnety_32gf", "2x224,4x96", 16, head=SEER_HEAD)
    return P.meta_swav_model(cfg), cfg


def test_parameter_counts_are_the_real_models(seer_head_model):
    model, cfg = seer_head_model
    counts = P.parameter_counts(model)
    feat = build_backbone("regnety_32gf", device="meta").num_features
    assert counts["backbone"] == sum(p.numel() for p in build_backbone("regnety_32gf", device="meta").parameters())
    assert counts["projection"] == (feat * 8192 + 8192) + (8192 * 8192 + 8192) + (8192 * 256 + 256)  # no BN in SEER's
    assert counts["prototypes"] == 16000 * 256


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_state_bytes_are_counts_times_dtype_sizes_sharded_by_zero(seer_head_model, precision, zero):
    counts = P.parameter_counts(seer_head_model[0])
    dense, protos, n = counts["backbone"] + counts["projection"], counts["prototypes"], 8
    fp32, bf16 = torch.float32.itemsize, torch.bfloat16.itemsize
    weight = optimizer = fp32  # fp32 weights and momentum in every precision (autocast)
    got = P.state_bytes(counts, precision, zero, n)
    assert got["weights"] == (dense * weight + protos * fp32) / (n if zero >= 3 else 1)
    assert got["gradients"] == (dense * weight + protos * fp32) / (n if zero >= 2 else 1)
    assert got["optimizer"] == (dense * optimizer + protos * fp32) / (n if zero >= 1 else 1)
    assert got["autocast_weight_copies"] == (dense * bf16 if precision != "fp32" else 0)
    assert got["zero12_master_partition"] == ((dense + protos) * fp32 / n if zero in (1, 2) else 0)
    assert got["zero3_gathered"] == (min(dense + protos, 10**9) * weight if zero == 3 else 0)


def _cpu_model(preset, crops, batch, checkpointing="none"):
    cfg = run_config(preset, crops, batch, f"model.activation_checkpointing={checkpointing}", "swav.backend=torch")
    torch.manual_seed(0)
    model = build_swav_model(cfg)
    model.head.eval()  # as traced: the head's assignment histogram has no meta kernel (and no autograd)
    return model.to(memory_format=model.memory_format), cfg


@pytest.mark.parametrize("preset,crops,batch", CHECKED_RUNS)
def test_meta_trace_saves_what_a_real_cpu_forward_saves(preset, crops, batch):
    model, cfg = _cpu_model(preset, crops, batch)
    real = P.trace_activations(model, P.synthetic_crops(cfg.data, batch, "cpu"))
    meta = P.trace_activations(P.meta_swav_model(cfg), P.synthetic_crops(cfg.data, batch, "meta"))
    assert meta.saved_bytes == real.saved_bytes > 0
    assert P.saved_bytes_by_segment(meta) == P.saved_bytes_by_segment(real)
    assert [c.name for c in meta.block_calls] == [c.name for c in real.block_calls]
    # bf16: everything but the loss at half size
    halved = P.saved_bytes_by_segment(meta, "bf16")
    full = P.saved_bytes_by_segment(meta)
    assert halved["loss"] == full["loss"] and halved["s1"] == full["s1"] / 2


@pytest.fixture(scope="module")
def process_group():
    from engine.distributed import init_distributed

    init_distributed()  # DeepSpeed's activation checkpointing needs one (conftest shuts it down)


@pytest.mark.parametrize("checkpointing", ["block", "stage"])
def test_engine_checkpointing_saves_only_what_the_plan_keeps(process_group, checkpointing):
    """The engine's checkpointed forward saves (for autograd) exactly the plan's tensors made outside checkpointed
    calls; the calls' inputs DeepSpeed keeps itself, out of reach of saved-tensor hooks (the step-peak test below
    covers them)."""
    preset, crops, batch = CHECKED_RUNS[0]
    model, cfg = _cpu_model(preset, crops, batch, checkpointing)
    trace = P.trace_activations(P.meta_swav_model(cfg), P.synthetic_crops(cfg.data, batch, "meta"))
    outside = sum(s.nbytes for s in trace.saved.values() if getattr(s, checkpointing) is None)
    params = {P.storage_key(p) for p in model.parameters()}
    seen = {}

    def pack(t):
        if P.storage_key(t) not in params:
            seen[P.storage_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(P.synthetic_crops(cfg.data, batch, "cpu"))
    assert sum(seen.values()) == outside < trace.saved_bytes / 2


@pytest.mark.parametrize("checkpointing", ["none", "block", "stage"])
@pytest.mark.parametrize("preset,crops,batch", CHECKED_RUNS)
def test_activation_peak_within_15_percent_of_measured_cpu_step(process_group, preset, crops, batch, checkpointing):
    model, cfg = _cpu_model(preset, crops, batch, checkpointing)
    crop_tensors = P.synthetic_crops(cfg.data, batch, "cpu")
    model(crop_tensors).backward()  # first-call allocations (oneDNN primitives) out of the measured step
    for p in model.parameters():
        p.grad = None  # as zero_grad leaves them: the step allocates its gradients

    measured = P.cpu_peak_bytes(lambda: model(crop_tensors).backward())
    trace = P.trace_activations(P.meta_swav_model(cfg), P.synthetic_crops(cfg.data, batch, "meta"))
    gradients = 4 * sum(p.numel() for p in model.parameters())
    estimate = P.activation_peak(trace, checkpointing)["peak"] + gradients
    assert estimate == pytest.approx(measured, rel=0.15), (estimate, measured)


def test_seer_on_512_v100s():
    """SEER (arXiv 2103.01988): RegNetY-256GF, 16 images per 32 GB V100, 512 GPUs, mixed precision and activation
    checkpointing, ~122k iterations for 1B images, ~2.8 img/s per GPU (~9% MFU, ../shared/SEER_RECIPE.md)."""
    cfg = run_config("regnety_256gf", "2x224,4x96", 16, "train.precision=fp16", "model.activation_checkpointing=block",
                     head=SEER_HEAD)
    p = P.plan(cfg, gpus=512, gpu_mem_gib=32, img_per_s=2.8)
    assert p["parameters"]["backbone"] / 1e6 == pytest.approx(1272.2, abs=0.1)
    # The name's 256 GF: multiply-adds of one 224 px forward pass; a training image is 2x224 + 4x96, forward
    # and backward (3x the forward).
    forward_224 = 2 * 256e9
    assert p["train_flops_per_image"] == pytest.approx(3 * forward_224 * (2 + 4 * (96 / 224) ** 2), rel=0.03)
    assert p["fits"]
    # Without checkpointing every saved activation stays: it does not fit, which is why SEER checkpointed.
    saved = 16 * sum(p["activations"]["saved_per_image_by_part"].values())
    assert sum(v for k, v in p["bytes"].items() if k not in ("activations", "total")) + saved > p["usable_bytes"]
    s = p["schedule"]
    assert s["days"] == pytest.approx(1e9 / (2.8 * 512) / 86400)
    assert s["steps"] == pytest.approx(122_070, rel=1e-3)
    assert 0.08 < s["tflops_per_gpu"] / 125 < 0.10  # V100 fp16 tensor-core peak


@pytest.mark.parametrize("overrides,message", [
    (["model.backbone=nope"], "unknown backbone 'nope'"),
    (["train.zero_stage=4"], "train.zero_stage must be 0, 1, 2 or 3"),
    (["model.activation_checkpointing=blocks"], "model.activation_checkpointing must be"),
    (["train.precision=fp8"], "train.precision must be"),
    (["data.crops=[{size: 224, count: 1, scale: [0.14, 1]}]"], "data.crops must define at least 2 crops"),
    (["train.batch_size=0"], "train.batch_size must be > 0"),
])
def test_bad_config_is_one_clear_error_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        P.plan(run_config("regnety_micro", "2x32,4x16", 16, *overrides), gpus=2, gpu_mem_gib=80)


@pytest.mark.parametrize("kwargs,message", [
    (dict(gpus=0), "--gpus must be >= 1, got 0"),
    (dict(gpu_mem_gib=0), "--gpu-mem must be > 0"),
    (dict(headroom=1.0), "--headroom in [0, 1)"),
    (dict(img_per_s=-1.0), "--img-per-s must be > 0"),
])
def test_bad_option_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        P.plan(run_config("regnety_micro", "2x32,4x16", 16), **(dict(gpus=2, gpu_mem_gib=80) | kwargs))


def test_json_and_table(capsys):
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    argv = ["--gpus", "4", "--gpu-mem", "1", "--img-per-s", "100",
            *run_overrides("regnety_micro", "2x32,4x16", 16, "train.zero_stage=1", "train.precision=bf16",
                           "model.activation_checkpointing=block")]
    P.run(parser.parse_args(argv + ["--json"]))
    p = json.loads(capsys.readouterr().out)
    assert p["global_batch"] == 64 and p["zero"] == 1 and p["fits"] and p["max_batch_per_gpu"] >= 16
    assert p["crops"] == "2x32,4x16" and p["precision"] == "bf16" and p["checkpointing"] == "block"
    assert p["bytes"]["total"] == pytest.approx(sum(v for k, v in p["bytes"].items() if k != "total"))
    assert p["schedule"]["days"] == pytest.approx(1e9 / 400 / 86400)
    P.run(parser.parse_args(argv))
    table = capsys.readouterr().out
    assert "ZeRO-1" in table and "FITS" in table and "(4P + 4Q) / 4" in table and "recomputed in the backward" in table


def test_config_file_and_overrides(tmp_path, capsys):
    """--config FILE as for `seer pretrain`; overrides win over the file."""
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  backbone: regnety_micro\ntrain:\n  batch_size: 8\n")
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    P.run(parser.parse_args(["--config", str(config), "--gpus", "2", "--gpu-mem", "1", "--json"]))
    p = json.loads(capsys.readouterr().out)
    assert p["preset"] == "regnety_micro" and p["batch_per_gpu"] == 8 and p["global_batch"] == 16
    P.run(parser.parse_args(["--config", str(config), "--gpus", "2", "--gpu-mem", "1", "--json",
                             "train.batch_size=4"]))
    assert json.loads(capsys.readouterr().out)["batch_per_gpu"] == 4


def test_cli_error_is_one_line():
    run = subprocess.run([SEER, "plan", "--gpus", "0", "--gpu-mem", "1", "model.backbone=regnety_micro"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == "seer: error: --gpus must be >= 1, got 0"
    run = subprocess.run([SEER, "plan", "--gpus", "4", "--gpu-mem", "1", "train.zero_stage=5"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("seer: error: train.zero_stage must be 0, 1, 2 or 3")


def test_plan_warns_when_sinkhorn_batch_is_smaller_than_the_prototypes(capsys):
    """SEER's config on one node (8 x 64 images, 16,000 prototypes) is told the queue that fixes it; 512 ranks are
    not; several heads count their prototypes."""
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    options = ["--config", "seer_regnety_256gf", "--gpu-mem", "141"]
    node = ["train.batch_size=64", "model.backbone=regnety_micro"]
    P.run(parser.parse_args([*options, "--gpus", "8", *node]))
    table = capsys.readouterr().out
    assert "WARNING: Sinkhorn spreads 1,024 samples per step" in table and "swav.queue_length=7488" in table
    P.run(parser.parse_args([*options, "--gpus", "512", "--json", *node]))
    p = json.loads(capsys.readouterr().out)
    assert p["small_batch"] is None and p["sinkhorn_rows"] == 2 * 512 * 64
    P.run(parser.parse_args([*options, "--gpus", "8", "--json", *node, "swav.queue_length=7488",
                             "model.num_prototypes=[100, 50]"]))
    p = json.loads(capsys.readouterr().out)
    assert p["small_batch"] is None and p["parameters"]["prototypes"] == 150 * 256
