"""The `seer` console command as a user runs it: one clear line for bad input, JSON results otherwise."""
import json
import shlex
import subprocess

from PIL import Image

from tiny_run import SEER, child_env


def seer(*args, cwd=None):
    return subprocess.run([SEER, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=child_env())


def test_bad_config_key_is_one_clear_error(tmp_path):
    run = seer("pretrain", "train.stepz=3", f"train.output_dir={tmp_path}")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("seer: error: unknown config key 'train.stepz'")
    assert "Traceback" not in run.stderr


def test_missing_config_file_and_weights(tmp_path):
    run = seer("pretrain", "--config", tmp_path / "nope.yaml")
    assert run.returncode == 2 and f"config file not found: {tmp_path / 'nope.yaml'}" in run.stderr
    run = seer("eval", "knn", "--weights", tmp_path / "none.pt")
    assert run.returncode == 2 and "backbone weights not found" in run.stderr
    run = seer("eval", "knn", "--weights", tmp_path / "none.pt", "eval.knn_k=3")  # overrides after an option
    assert run.returncode == 2 and "backbone weights not found" in run.stderr
    run = seer("eval", "knn", "--weights", tmp_path / "none.pt", "--bogus")
    assert run.returncode == 2 and "unrecognized arguments: --bogus" in run.stderr


def test_pack_folder_reports_kept_and_skipped(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(3):
            colour = (40 * i, 80, 120 if label == "cat" else 160)  # identical files would be packed once
            Image.new("RGB", (20, 16), colour).save(tmp_path / "src" / label / f"{i}.png")
    (tmp_path / "src" / "dog" / "notes.jpg").write_text("not an image")
    run = seer("data", "pack", tmp_path / "src", tmp_path / "out", "--workers", "1")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary == {"kept": 6, "skipped": {"not_an_image": 1}}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog"]


def test_errors_raised_in_a_library_keep_their_traceback(monkeypatch):
    import json as json_module

    from engine.errors import error_report
    from engine.config import load_config

    try:
        load_config(None, ["train.stepz=3"])  # raised here: the message names the key
    except ValueError as err:
        ours = err
    try:
        json_module.loads("{cut")  # raised inside a library: the message alone names no file
    except ValueError as err:
        theirs = err
    assert error_report(ours) == f"seer: error: {ours}" and "unknown config key 'train.stepz'" in str(ours)
    report = error_report(theirs).splitlines()
    assert report[0] == "Traceback (most recent call last):" and report[-1].startswith("seer: error: Expecting")
    assert any("json" in line and "decoder.py" in line for line in report)
    monkeypatch.setenv("SEER_TRACEBACK", "1")
    assert error_report(ours).splitlines()[0] == "Traceback (most recent call last):"


def test_bench_train_takes_config_overrides_before_and_after_options(tmp_path):
    micro = ["model.backbone=regnety_micro", "model.head_hidden_dims=[16]", "model.embedding_dim=8",
             "model.num_prototypes=10", "train.batch_size=2", "train.precision=fp32", "train.zero_stage=0",
             "model.activation_checkpointing=none"]
    crops = "data.crops=[{size: 16, count: 2, scale: [0.4, 1]}, {size: 8, count: 2, scale: [0.1, 0.4]}]"
    args = ["bench", "train", *micro, "--steps", "1", "--warmup", "1", "--out", tmp_path / "t.json", crops,
            "--threads", "1"]
    run = seer(*args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["out"] == str(tmp_path / "t.json")
    [record] = json.loads((tmp_path / "t.json").read_text())
    assert record["preset"] == "regnety_micro" and record["crops"] == "2x16,2x8" and record["batch"] == 2
    assert shlex.split(record["command"]) == ["seer", *map(str, args)]
