"""`seer report RUN_DIR` (engine/report.py) on the metrics of a real, deliberately collapsed, tiny run."""
import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from engine.training.metrics import run_records
from engine.training.pretrain import pretrain
from engine.report import write_report
from tiny_run import REPO, tiny_config


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory):
    """8 steps at softmax temperature 100 (loss pinned at ln K, flagged from step 3) with an online kNN every 4."""
    out = tmp_path_factory.mktemp("report") / "run"
    pretrain(tiny_config(shards, out, "train.steps=8", "swav.temperature=100", "monitor.knn_every=4",
                         "monitor.collapse_check_from_step=1", "monitor.collapse_patience=3"))
    return out


def test_report_plots_and_summarizes_a_real_run(run_dir):
    report = write_report(run_dir)
    assert report == run_dir / "report.md"
    for name in ("loss", "throughput", "prototypes", "knn"):
        with Image.open(run_dir / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 300
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    text = report.read_text()
    for r in (logged[0], logged[-1]):
        assert f"| loss at step {r['step']} | {r['loss']:.4f} ({r['loss'] / math.log(20):.3f} ln K) |" in text
    assert f"| images seen | {8 * 16:,} |" in text
    # Throughput over the run: 8 one-step windows -> total steps / total time.
    mean_rate = 8 / sum(1 / r["img_per_s"] for r in logged)
    assert f"| throughput over the run | {mean_rate:,.0f} images/s |" in text
    knn = [r for r in logged if "knn_top1" in r]
    assert [r["step"] for r in knn] == [4, 8] and f"{knn[-1]['knn_top1']:.2%} at step 8" in text
    assert "| collapse | flagged in 6 of 8 windows, first at step 3 |" in text
    assert "**Warning: training looks collapsed** from step 3" in text
    for name in ("loss", "throughput", "prototypes", "knn"):
        assert f"({name}.png)" in text


def test_seer_report_command(run_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "engine.cli", "report", str(run_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == str(run_dir / "report.md")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        write_report(tmp_path)


def test_a_resumed_run_keeps_the_later_record_of_each_step(tmp_path):
    lines = [{"step": 2, "loss": 5.0}, {"step": 4, "loss": 4.0}, {"step": 6, "loss": 3.5},
             {"step": 4, "loss": 4.1}, {"step": 6, "loss": 3.6}, {"step": 8, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [(r["step"], r["loss"]) for r in run_records(tmp_path / "metrics.jsonl")] == \
        [(2, 5.0), (4, 4.1), (6, 3.6), (8, 3.0)]


def test_a_torn_metrics_line_is_skipped_with_a_warning(run_dir, tmp_path):
    # A run killed while writing a line, then resumed, leaves a cut line between whole ones.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    torn = tmp_path / "run"
    torn.mkdir()
    (torn / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:17], *lines[2:]]) + "\n")
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped 1 line\(s\) that are not JSON \(line 2 first\)"):
        records = run_records(torn / "metrics.jsonl")
    whole = [json.loads(line) for line in [lines[0], *lines[2:]]]
    assert [r["step"] for r in records] == sorted({r["step"] for r in whole if "loss" in r})
