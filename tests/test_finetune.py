"""Supervised fine-tuning on real Fashion-MNIST images: the supervised DALI loader, `seer finetune` end to end,
the saved classifier, and clear errors for unusable configs."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from dataloading import pack as pack_module
from dataloading.pack import pack
from dataloading.config import DataConfig
from dataloading.eval import build_eval_loader
from dataloading.sources import load_idx
from dataloading.supervised import build_supervised_loader, define_supervised_pipeline
from engine.evaluation.classifier import load_classifier
from engine.config import ConfigError
from engine.training.finetune import Finetuner, count_correct, finetune
from engine.models.backbone import build_backbone

from tiny_run import SEER, demo_config, metrics_records

N_TRAIN, N_TEST = 400, 200
GRAY = DataConfig(channels=1, mean=(0.286,), std=(0.353,))
# regnety_micro at 24 px, 60 steps of 32 images (~5 epochs of the 400 images): ~1 s, ~60% of the test set right.
TINY = ["model.backbone=regnety_micro", "finetune.image_size=24", "finetune.crop_scale=[0.6, 1]", "finetune.steps=60",
        "finetune.batch_size=32", "finetune.lr=1.0", "finetune.warmup_steps=5", "finetune.log_every=10",
        "finetune.progress=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The first 400 train / 200 test Fashion-MNIST images, packed into 4 and 2 tar files."""
    root = tmp_path_factory.mktemp("fashion-finetune")
    out = {"labels": {}}
    for split, count in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels, classes = load_idx("fashion-mnist", split)
        with pytest.MonkeyPatch.context() as patch:  # pack the dataset spec, restricted to its first images
            patch.setattr(pack_module, "load_idx", lambda name, split: (images[:count], labels[:count], classes))
            pack(f"fashion-mnist:{split}", root / split, shard_size=100, workers=1, progress=False)
        out[split], out["labels"][split] = str(root / split), torch.as_tensor(labels[:count]).long()
    return out


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabelled")
    images, _, _ = load_idx("fashion-mnist", "test")
    (root / "images").mkdir()
    for i in range(8):
        Image.fromarray(images[i]).save(root / "images" / f"{i}.png")
    pack(root / "images", root / "shards", labels_from_folders=False, workers=1, progress=False)
    return str(root / "shards")


def finetune_config(shards, output_dir, *extra):
    return demo_config(*TINY, f"finetune.train_shards={shards['train']}", f"finetune.test_shards={shards['test']}",
                       f"finetune.output_dir={output_dir}", *extra)


def run(cfg, weights="random") -> Finetuner:
    trainer = Finetuner(cfg, weights)
    try:
        trainer.result = trainer.train()
    finally:
        trainer.close()
    return trainer


@pytest.fixture(scope="module")
def finetuned(shards, tmp_path_factory):
    return run(finetune_config(shards, tmp_path_factory.mktemp("finetune") / "run"))


def saved_weights(trainer: Finetuner) -> dict[str, torch.Tensor]:
    return torch.load(Path(trainer.result["classifier"]), weights_only=True)["state_dict"]


# ------------------------------------------------------------------------------------------------------ loader
def supervised_loader(shards, **kwargs):
    return build_supervised_loader(GRAY, shards["train"], size=24, scale=(0.6, 1.0), **kwargs)


def test_supervised_loader_covers_each_sample_once_per_epoch_across_two_ranks(shards):
    seen = {}
    for rank in (0, 1):
        loader = supervised_loader(shards, batch_size=20, shard_id=rank, num_shards=2, with_index=True)
        assert loader.steps_per_epoch == 10
        batches = [next(loader) for _ in range(20)]
        assert loader.epoch == 1
        for batch in batches:
            assert batch["image"].shape == (20, 1, 24, 24) and batch["image"].dtype == torch.float32
            # Labels travel with their images: compare with the source's label of each packed sample.
            assert torch.equal(batch["label"], shards["labels"]["train"][batch["index"]])
        for epoch in (0, 1):
            seen[rank, epoch] = torch.cat([b["index"] for b in batches[epoch * 10:(epoch + 1) * 10]]).tolist()
    for epoch in (0, 1):
        rank0, rank1 = set(seen[0, epoch]), set(seen[1, epoch])
        assert len(rank0) == len(rank1) == N_TRAIN // 2 and not rank0 & rank1
        assert rank0 | rank1 == set(range(N_TRAIN))
    assert seen[0, 0] != seen[0, 1]  # a new order every epoch


def test_supervised_loader_same_seed_same_batches(shards):
    first, second, other = (supervised_loader(shards, batch_size=16, seed=seed) for seed in (3, 3, 4))
    for _ in range(3):
        a, b, c = next(first), next(second), next(other)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert not torch.equal(a["image"], c["image"])


def test_supervised_gpu_graph_serializes_without_a_gpu(shards):
    pipe, names = define_supervised_pipeline(GRAY, shards["train"], size=24, scale=(0.6, 1.0), batch_size=8,
                                             device="cuda", guard=False)  # DALI cannot serialize the guard's Python op
    assert names == ["image", "label"] and pipe.serialize()
    guarded = define_supervised_pipeline(GRAY, shards["train"], size=24, scale=(0.6, 1.0), batch_size=8,
                                         guard=True)[1]
    assert guarded == ["image", "replaced", "label"]


def test_supervised_loader_refuses_unlabelled_shards(unlabelled):
    with pytest.raises(ValueError, match="unlabelled images"):
        build_supervised_loader(GRAY, unlabelled, size=16, scale=(0.5, 1.0), batch_size=4)


# ---------------------------------------------------------------------------------------------------- finetune
def test_finetune_learns(finetuned):
    result = finetuned.result
    assert result["steps"] == 60 and result["weights"] == "random"
    assert result["top1"] > 0.45, result  # 10 classes, 200 images: chance is 0.1. Seen: 0.625
    output = Path(result["output_dir"])
    records = metrics_records(output)
    assert [r["step"] for r in records[:-1]] == [10, 20, 30, 40, 50, 60]
    assert records[-2]["loss"] < 0.7 * records[0]["loss"], records  # seen: 2.42 at step 10, 1.22 at step 60
    assert records[-1] == {"step": 60, "test_top1": result["top1"]}
    assert any((output / "tensorboard").iterdir()) and (output / "config.yaml").is_file()


def test_saved_classifier_gives_the_same_logits_and_top1(finetuned, shards):
    classifier, meta = load_classifier(finetuned.result["classifier"])
    assert meta["source"] == "finetune" and meta["backbone"] == "regnety_micro" and meta["image_size"] == 24
    assert meta["class_names"] == finetuned.classes and meta["mean"] == [0.286] and meta["std"] == [0.353]
    preprocessing = DataConfig(channels=meta["in_chans"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    loader = build_eval_loader(preprocessing, shards["test"], size=meta["image_size"], batch_size=64)
    images = next(iter(loader))["image"]
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), finetuned.classifier(images), rtol=0, atol=0)
    correct, total = count_correct(classifier, loader, torch.device("cpu")).tolist()
    assert total == N_TEST and correct / total == finetuned.result["top1"]


def test_rerun_from_a_backbone_file_of_the_seeds_init_is_bit_identical(finetuned, shards, tmp_path):
    """A second run, from a backbone file holding the weights random init draws for the seed, must give exactly the
    random-init run: fine-tuning is deterministic, and the file is its starting point."""
    torch.manual_seed(0)  # finetune.seed
    state = build_backbone("regnety_micro", in_chans=1).state_dict()
    torch.save({"backbone": "regnety_micro", "in_chans": 1, "state_dict": state}, tmp_path / "backbone.pt")
    from_file = run(finetune_config(shards, tmp_path / "from-file"), weights=str(tmp_path / "backbone.pt"))
    assert from_file.result["top1"] == finetuned.result["top1"]
    reference, loaded = saved_weights(finetuned), saved_weights(from_file)
    assert all(torch.equal(reference[name], loaded[name]) for name in reference)

    torch.save({"backbone": "regnety_micro", "in_chans": 3, "state_dict": {}}, tmp_path / "rgb.pt")
    with pytest.raises(ConfigError, match="takes 3-channel images but data.channels is 1"):
        finetune(finetune_config(shards, tmp_path / "rgb"), str(tmp_path / "rgb.pt"))


def test_zero3_gathers_the_same_model_as_plain_data_parallel(shards, tmp_path):
    """ZeRO-3 partitions parameters; the saved classifier and test top-1 must be the unpartitioned run's."""
    common = ("finetune.steps=10", "model.channels_last=false")  # ZeRO >= 1 trains NCHW; compare like with like
    plain = run(finetune_config(shards, tmp_path / "zero0", *common))
    sharded = run(finetune_config(shards, tmp_path / "zero3", *common, "finetune.zero_stage=3"))
    assert sharded.result["top1"] == plain.result["top1"]
    reference, gathered = saved_weights(plain), saved_weights(sharded)
    for name in reference:
        torch.testing.assert_close(gathered[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_unusable_configs_are_one_clear_error(finetuned, shards, unlabelled, tmp_path):
    with pytest.raises(ConfigError, match="finetune.steps, finetune.batch_size and finetune.image_size must be > 0"):
        finetune_config(shards, tmp_path / "x", "finetune.steps=0")
    with pytest.raises(ConfigError, match=r"finetune.crop_scale must satisfy"):
        finetune_config(shards, tmp_path / "x", "finetune.crop_scale=[0.5, 1.5]")
    with pytest.raises(ConfigError, match="finetune.train_shards=.* holds unlabelled images"):
        finetune(finetune_config(shards, tmp_path / "x", f"finetune.train_shards={unlabelled}"), "random")
    with pytest.raises(ConfigError, match="finetune.test_shards is not set"):
        finetune(finetune_config(shards, tmp_path / "x", "finetune.test_shards=''"), "random")
    with pytest.raises(FileNotFoundError, match="backbone weights not found"):
        finetune(finetune_config(shards, tmp_path / "x"), str(tmp_path / "missing.pt"))
    with pytest.raises(FileExistsError, match="already holds a fine-tuning run"):
        finetune(finetune_config(shards, finetuned.result["output_dir"]), "random")


def test_cli_reports_unlabelled_shards_in_one_line(unlabelled, tmp_path):
    cli = subprocess.run([SEER, "finetune", "--weights", "random", f"finetune.train_shards={unlabelled}",
                          f"finetune.output_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.strip().splitlines()[-1].startswith("seer: error: finetune.train_shards=")
