"""`seer bench train` (benchmarks/train.py) on CPU and the FLOP counter it reports MFU with; `seer bench kernels`
(benchmarks/swav_head.py) on CPU; the harness every benchmark records with."""
import argparse
import json
import math
import re
import shlex

import pytest
import torch
from torch import nn

from benchmarks import swav_head
from benchmarks import train as bench
from benchmarks.harness import percentiles
from engine.plan import count_flops

# Every key the benchmark reads is set here, so that the tests do not depend on the default config.
MICRO_RUN = [
    "model.backbone=regnety_micro",
    "data.crops=[{size: 32, count: 2, scale: [0.14, 1.0]}, {size: 16, count: 4, scale: [0.05, 0.14]}]",
    "data.channels=3", "data.mean=[0.485, 0.456, 0.406]", "data.std=[0.229, 0.224, 0.225]",
    "model.head_hidden_dims=[64]", "model.head_batch_norm=false", "model.embedding_dim=32", "model.num_prototypes=100",
    "model.channels_last=true", "model.activation_checkpointing=none", "train.batch_size=8", "train.precision=fp32",
    "train.zero_stage=0", "swav.backend=auto",
]


def parse(add_arguments, argv):
    """As `seer bench NAME` and `python -m benchmarks.MODULE` parse: config overrides may follow options."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_intermixed_args(argv)


def test_flops_of_a_small_conv_net_equal_the_analytic_count():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4), nn.ReLU(),  # grouped, as every RegNet 3x3
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    x = torch.randn(2, 3, 8, 8)
    conv1 = 2 * 2 * 8 * 8 * 8 * (3 * 3 * 3)  # 2 x batch x C_out x H x W x (C_in x k x k)
    conv2 = 2 * 2 * 16 * 4 * 4 * (8 // 4 * 3 * 3)  # C_in per group
    linear = 2 * 2 * (16 * 4 * 4) * 10
    assert count_flops(lambda: net(x)) == conv1 + conv2 + linear
    # Backward: input and weight gradients cost one forward each, except the first layer's input gradient (the
    # images need none).
    assert count_flops(lambda: net(x).sum().backward()) == (conv1 + conv2 + linear) + (conv1 + 2 * conv2 + 2 * linear)


def _run(tmp_path, *extra):
    argv = ["--steps", "2", "--warmup", "1", "--out", str(tmp_path / "t.json"), *MICRO_RUN, *extra]
    return bench.run(parse(bench.add_arguments, argv), argv), argv


def test_cpu_run_of_regnety_micro_writes_a_sane_record(tmp_path):
    record, argv = _run(tmp_path)
    assert json.loads((tmp_path / "t.json").read_text()) == [record]
    assert record["command"] == "seer bench train " + shlex.join(argv)
    assert record["device_kind"] == "cpu" and record["device_tag"] == "cpu" and record["precision"] == "fp32"
    assert record["steps"] == 2 and record["batch"] == 8 and record["channels_last"]
    assert record["img_per_s"] > 0 and record["step_ms_p20"] <= record["step_ms_p50"] <= record["step_ms_p80"]
    assert record["img_per_s"] == pytest.approx(8 / (record["step_ms_p50"] / 1e3), rel=0.5)
    assert record["flops_per_step"] == 8 * record["flops_per_image"] > 0
    assert record["tflops_achieved"] == pytest.approx(record["flops_per_step"] / record["step_ms_p50"] * 1e-9)
    assert record["mfu"] is None and "not applicable on CPU" in record["peak_tflops_source"]
    assert math.isfinite(record["loss_first"]) and math.isfinite(record["loss_last"])
    memory = record["memory"]
    assert memory["peak_bytes"] == memory["static_bytes"] + memory["step_peak_bytes"]
    # The capacity plan of the same run (an upper-bound model, checked to 15% in test_plan.py).
    assert memory["plan"]["step_peak_bytes"] == pytest.approx(memory["step_peak_bytes"], rel=0.25)
    assert memory["plan"]["static_bytes"] <= memory["static_bytes"]  # the measure also holds BN buffers and crops


def test_peak_tflops_gives_an_mfu_and_records_append(tmp_path):
    first, _ = _run(tmp_path)
    second, _ = _run(tmp_path, "--peak-tflops", "0.5", "model.channels_last=false")
    assert second["mfu"] == pytest.approx(second["tflops_achieved"] / 0.5)
    assert second["peak_tflops_source"] == "--peak-tflops" and not second["channels_last"]
    assert [r["channels_last"] for r in json.loads((tmp_path / "t.json").read_text())] == [True, False]


@pytest.mark.parametrize("extra,message", [
    (["model.backbone=resnet50"], "unknown backbone 'resnet50'"),
    (["train.precision=fp16"], "train.precision=fp16: seer bench train runs bf16 (autocast) or fp32"),
    (["--warmup", "0"], "--steps and --warmup must be >= 1"),
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
])
def test_bad_input_is_one_clear_error(tmp_path, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(tmp_path, *extra)
    assert not (tmp_path / "t.json").exists()


def test_config_file_is_read_and_overrides_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  backbone: regnety_tiny\ntrain:\n  batch_size: 4\n")
    record, argv = _run(tmp_path, "--config", str(config))
    assert record["preset"] == "regnety_micro" and record["batch"] == 8  # MICRO_RUN's overrides win
    assert record["command"] == "seer bench train " + shlex.join(argv)


def test_percentiles_interpolate_between_sorted_values():
    assert percentiles([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((1.8, 3.0, 4.2))
    assert percentiles([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="no values"):
        percentiles([])


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark times the Triton kernels")
def test_kernels_benchmark_on_cpu_records_the_reference(tmp_path, monkeypatch):
    """`seer bench kernels` without a GPU: the reference only, labelled CPU, each record with its command."""
    monkeypatch.setitem(swav_head.SHAPES, "tiny", (4, 8, 16, 32))
    argv = ["--shapes", "tiny", "--benchmarks", "sinkhorn/forward", "head/full", "--providers", "triton", "eager",
            "--out", str(tmp_path / "k.json")]
    threads = torch.get_num_threads()  # run() sets --threads (1) on CPU
    try:
        records = swav_head.run(parse(swav_head.add_arguments, argv), argv)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "k.json").read_text()) == json.loads(json.dumps(records))
    assert [(r["op"], r["mode"], r["provider"]) for r in records] == [("sinkhorn", "forward", "eager"),
                                                                     ("head", "full", "eager")]
    for record in records:
        assert record["device_kind"] == "cpu" and record["shape"] == "tiny" and record["error"] is None
        assert 0 < record["ms_p20"] <= record["ms_p50"] <= record["ms_p80"]
        assert record["command"] == "seer bench kernels " + shlex.join(argv)
