"""`seer bench train` (benchmarks/train.py) on CPU, and the FLOP counter it reports MFU with."""
import argparse
import json
import math

import pytest
import torch
from torch import nn

from engine.cli import benchmark_script
from engine.plan import count_flops

bench = benchmark_script("train")


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
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--preset", "regnety_micro", "--crops", "2x32,4x16", "--batch", "8", "--steps", "2", "--warmup", "1",
            "--head-hidden", "64", "--embedding-dim", "32", "--prototypes", "100", "--out", str(tmp_path / "t.json"),
            *extra]
    return bench.run(parser.parse_args(argv), argv), argv


def test_cpu_run_of_regnety_micro_writes_a_sane_record(tmp_path):
    record, argv = _run(tmp_path)
    assert json.loads((tmp_path / "t.json").read_text()) == [record]
    assert record["command"] == "seer bench train " + " ".join(argv)
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
    second, _ = _run(tmp_path, "--peak-tflops", "0.5", "--no-channels-last")
    assert second["mfu"] == pytest.approx(second["tflops_achieved"] / 0.5)
    assert second["peak_tflops_source"] == "--peak-tflops" and not second["channels_last"]
    assert [r["channels_last"] for r in json.loads((tmp_path / "t.json").read_text())] == [True, False]


@pytest.mark.parametrize("extra,message", [
    (["--preset", "resnet50"], "unknown backbone 'resnet50'"),
    (["--precision", "fp16"], "--precision must be bf16 or fp32"),
    (["--warmup", "0"], "--steps and --warmup must be >= 1"),
])
def test_bad_input_is_one_clear_error(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, *extra)
    assert not (tmp_path / "t.json").exists()
