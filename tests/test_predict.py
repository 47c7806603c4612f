"""Recognition: `seer eval linear --save-head` saves the probe as a classifier, `seer predict` applies it to files.

The reference for `seer predict` is the saved Classifier run in memory on the same images read from the packed
shards by the eval loader; the images are real Fashion-MNIST training images written as PNG files.
"""
import contextlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from dataloading.config import DataConfig
from dataloading.eval import build_eval_loader
from dataloading.pack import pack, prepare_file
from engine.evaluation.classifier import load_classifier
from engine.cli import build_parser
from engine.config import load_config
from engine.evaluation.evaluate import evaluate
from engine.models.weights import load_backbone_weights
from engine.training.export import export
from engine.models.backbone import build_backbone
from engine.evaluation.predict import predict
from tiny_run import SEER, child_env, write_class_folders

IMAGE_SIZE = 32


def run_seer(capsys, *argv) -> str:
    """`seer ARGV` in this process; its stdout."""
    args = build_parser().parse_args([str(a) for a in argv])
    args.run(args)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """300 training / 50 test images as class folders of PNG files, packed, and a random-init tiny backbone
    (features of random convolutions are enough for a linear probe to fit 300 images)."""
    root = tmp_path_factory.mktemp("recognition")
    folders = {split: write_class_folders(root, split, per_class) for split, per_class in (("train", 30), ("test", 5))}
    for split, folder in folders.items():
        pack(str(folder), root / f"{split}-shards", shard_size=200, workers=1, progress=False)
    torch.manual_seed(0)
    backbone_file = root / "backbone.pt"
    torch.save({"backbone": "regnety_tiny", "in_chans": 1,
                "state_dict": build_backbone("regnety_tiny", in_chans=1).state_dict()}, backbone_file)
    weights = root / "micro.safetensors"
    export(backbone_file, weights)
    overrides = [f"eval.train_shards={root / 'train-shards'}", f"eval.test_shards={root / 'test-shards'}",
                 f"eval.image_size={IMAGE_SIZE}", "eval.batch_size=64"]
    return {"root": root, "folders": folders, "weights": weights, "overrides": overrides,
            "shards": {split: root / f"{split}-shards" for split in folders}}


@pytest.fixture(scope="module")
def head(setup, tmp_path_factory):
    """`seer eval linear --save-head` on the exported weights: (head file, its JSON result)."""
    out = tmp_path_factory.mktemp("head") / "head.pt"
    # Overrides right after the protocol: after an option, Python 3.11's argparse leaves them unparsed.
    args = build_parser().parse_args(["eval", "linear", *setup["overrides"], "--weights", str(setup["weights"]),
                                      "--save-head", str(out)])
    with contextlib.redirect_stdout(io.StringIO()) as stdout:  # capsys is per test, this fixture per module
        args.run(args)
    return out, json.loads(stdout.getvalue().strip().splitlines()[-1])


def classifier_on_shards(head_file, shards) -> dict[bytes, torch.Tensor]:
    """Class probabilities of the saved classifier, run in memory on the eval loader's batches, keyed by the
    packed image bytes of each sample."""
    classifier, meta = load_classifier(head_file)
    encoded = {}
    for tar in sorted(Path(shards).glob("*.tar")):
        with tarfile.open(tar) as archive:
            encoded.update({int(m.name[:-4]): archive.extractfile(m).read()
                            for m in archive if m.name.endswith(".jpg")})
    preprocessing = DataConfig(channels=meta["in_chans"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    loader = build_eval_loader(preprocessing, shards, size=meta["image_size"], batch_size=64, with_index=True)
    probabilities = {}
    with torch.no_grad():
        for batch in loader:
            for index, p in zip(batch["index"].tolist(), classifier(batch["image"]).softmax(dim=1)):
                probabilities[encoded[index]] = p
    return probabilities


def test_saved_head_is_the_linear_probe_of_seer_eval(setup, head):
    head_file, result = head
    cfg = load_config("demo", setup["overrides"])
    reference = evaluate(load_backbone_weights(setup["weights"]), cfg, ("linear",))["linear_top1"]
    assert result["linear_top1"] == reference and result["head"] == str(head_file)
    classifier, meta = load_classifier(head_file)
    assert meta["source"] == "linear_probe" and meta["backbone"] == "regnety_tiny" and meta["in_chans"] == 1
    assert meta["class_names"] == sorted(p.name for p in setup["folders"]["train"].iterdir())
    assert meta["image_size"] == IMAGE_SIZE and meta["mean"] == list(cfg.data.mean)
    # The saved classifier, on the test images, scores what the probe scored.
    test = classifier_on_shards(head_file, setup["shards"]["test"])
    labels = {prepare_file(str(p), 95, None)[0]: meta["class_names"].index(p.parent.name)
              for p in setup["folders"]["test"].rglob("*.png")}
    top1 = sum(int(p.argmax()) == labels[key] for key, p in test.items()) / len(test)
    assert top1 == pytest.approx(result["linear_top1"], abs=1 / len(test))


def test_predict_matches_the_classifier_on_the_eval_loader(setup, head, capsys):
    head_file, _ = head
    results = json.loads(run_seer(capsys, "predict", "--model", head_file, "--json", "--top-k", "10",
                                  setup["folders"]["train"]))
    files = sorted(p for p in setup["folders"]["train"].rglob("*") if p.is_file())
    assert [r["file"] for r in results] == [str(p) for p in files] and len(files) == 300
    reference = classifier_on_shards(head_file, setup["shards"]["train"])
    correct = 0
    for file, result in zip(files, results):
        expected = reference[prepare_file(str(file), 95, None)[0]]  # the sample packed from this file
        predicted = torch.zeros(10)
        predicted[[t["index"] for t in result["top"]]] = torch.tensor([t["probability"] for t in result["top"]])
        torch.testing.assert_close(predicted, expected, rtol=0, atol=1e-5, msg=str(file))
        correct += result["top"][0]["class"] == file.parent.name
    assert correct / len(files) >= 0.9  # training images: the probe was fitted on them


def test_predict_prints_top_k_per_image(setup, head, capsys):
    head_file, _ = head
    images = sorted(setup["folders"]["train"].rglob("*.png"))[:2]
    lines = run_seer(capsys, "predict", "--model", head_file, "--top-k", "3", *images).splitlines()
    assert len(lines) == 2 * (1 + 3) and lines[0] == str(images[0]) and lines[4] == str(images[1])
    probabilities = [float(line.split()[0]) for line in lines[1:4]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001
    assert predict(head_file, images, top_k=50)[0]["top"].__len__() == 10  # capped at the number of classes


def test_bad_inputs_are_one_clear_error(setup, head, tmp_path):
    head_file, _ = head
    good = next(setup["folders"]["train"].rglob("*.png"))
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match=f"{tmp_path / 'notes.png'} is not a usable image file: not an image"):
        predict(head_file, [good, tmp_path / "notes.png"])
    with pytest.raises(ValueError, match=f"{tmp_path / 'cut.png'} is not a usable image file: corrupt"):
        predict(head_file, [tmp_path / "cut.png"])
    with pytest.raises(FileNotFoundError, match="image not found"):
        predict(head_file, [tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="is not a classifier saved by seer"):
        predict(setup["root"] / "backbone.pt", [good])
    with pytest.raises(ValueError, match="--save-head saves the linear probe"):
        args = build_parser().parse_args(["eval", "knn", *setup["overrides"], "--weights", str(setup["weights"]),
                                          "--save-head", str(tmp_path / "h.pt")])
        args.run(args)
    run = subprocess.run([SEER, "predict", "--model", str(head_file), str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=child_env())
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (f"seer: error: {tmp_path / 'cut.png'} is not a usable image "
                                                   f"file: corrupt")
