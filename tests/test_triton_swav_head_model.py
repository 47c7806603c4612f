"""benchmarks/swav_head.py's FLOP/byte model of the Triton SwAV head: tied to the launchers it describes, and the
committed predictions (benchmarks/results/swav_head_h200_model.json) current.

The launchers run on meta tensors with every kernel launch caught (tests/test_triton_sm90_compile.py's helpers), so
a kernel added to or dropped from the head without the model following fails here.
"""

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import swav_head as bench
from test_triton_sm90_compile import launches_of

MODEL = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "swav_head_h200_model.json"


@pytest.mark.parametrize("dtype", ["bf16xfp32", "fp32", "bf16"])
@pytest.mark.parametrize("shape", list(bench.SHAPES))
def test_model_counts_the_launches_the_head_makes(shape, dtype):
    caught = launches_of(shape, dtype, "train", iterations=bench.SETTINGS["sinkhorn_iterations"])
    stages = bench.stages("head", "full", shape, dtype)
    kernels = Counter(fn.__name__ for fn, _, _ in caught)
    assert sum(s["triton_launches"] for s in stages) == sum(kernels.values()), (kernels, stages)
    assert kernels["_sinkhorn_row_merge_kernel"] == bench.SETTINGS["sinkhorn_iterations"]  # each row's once
    forward = bench.stages("head", "forward", shape, dtype)
    assert sum(s["triton_launches"] for s in forward) == sum(kernels.values()) - 3  # the backward's three kernels


def test_matmul_work_follows_the_input_types():
    n_crops, b, d, k = bench.SHAPES["large"]
    matmul = 2 * n_crops * b * k * d
    bf16 = bench.work("head", "full", "large", "bf16xfp32")
    fp32 = bench.work("head", "full", "large", "fp32")
    assert bf16["tc_flops"] == 3 * matmul and bf16["fma_flops"] == 0  # scores, G @ P, Gᵀ @ Z on tensor cores
    assert fp32["fma_flops"] == 3 * matmul and fp32["tc_flops"] == 0  # torch's default: exact fp32
    assert bf16["bytes"] < fp32["bytes"]  # G in bf16


def test_committed_predictions_are_current():
    committed = json.loads(MODEL.read_text())
    assert committed["command"] == "python -m benchmarks.swav_head --write-model " \
                                   "benchmarks/results/swav_head_h200_model.json"
    fresh = json.loads(json.dumps(bench.model_record()))
    assert {k: v for k, v in committed.items() if k != "command"} == fresh, (
        f"{MODEL.name} is stale: rerun its command")
    large = next(c for c in committed["cases"] if (c["shape"], c["dtype"], c["op"], c["mode"]) ==
                 ("large", "bf16xfp32", "head", "full"))
    assert large["predicted_ms"] >= large["roofline_ms"] > 0


def test_summary_compares_head_full_with_the_targets():
    def record(provider, ms, **extra):
        return dict(device_kind="cuda", op="head", mode="full", shape="large", dtype="bf16xfp32", provider=provider,
                    ms_p50=ms, **extra)

    records = [record("triton", 1.0, measured_over_predicted=1.2, check={"pass": True}), record("eager", 2.0),
               record("swav", 2.5), record("compile", 1.8), dict(record("swav", 9.0), device_kind="cpu")]
    line = bench.summary(records)
    assert line.startswith("head/full large bf16xfp32: triton 1.000 ms, eager 2.000 ms, swav 2.500 ms")
    assert "2.50x swav (MISSED >= 3.0x)" in line and "1.80x compile (met >= 1.5x)" in line
    assert "measured/predicted 1.20 (met <= 1.5)" in line and line.endswith("check PASS")
    assert bench.summary(records[-1:]) == "no GPU head/full records"


def test_cpu_run_times_pytorch_only_and_says_no_gpu_figure_exists(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bench.SHAPES, "tiny", (4, 6, 16, 100))
    out = tmp_path / "records.json"
    records = bench.run(bench_args(["--shapes", "tiny", "--benchmarks", "sinkhorn/forward", "head/forward",
                                    "--providers", "triton", "eager", "swav", "--out", str(out)]), [])
    assert "NO GPU: no GPU figure exists from this run" in capsys.readouterr().err
    assert {r["provider"] for r in records} == {"eager", "swav"}
    assert all(r["device_kind"] == "cpu" and "pct_of_roofline" not in r and "predicted_h200_ms" not in r
               for r in records)
    assert json.loads(out.read_text()) == json.loads(json.dumps(records))


def bench_args(argv):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)
