"""The Pillow peer that does the DALI train graph's ops (`PillowTrainLoader(ops="dali")`, provider pillow_dali_ops of
`seer bench data`): its colour map, flip + normalize and blur against the graph's own ops on fixed images and fixed
draws, its draws against the config, its batches against the DALI loader's, and the benchmark with it (img/s and
CPU time)."""
from __future__ import annotations

import functools
import json
import math
import random
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import test_augment_stats as stats
import torch
from nvidia.dali import fn, pipeline_def, types
from PIL import Image, ImageFilter

from benchmarks import data as bench_data
from dataloading.augment import blur, map_colors, normalize
from dataloading.config import AugmentConfig, CropGroup, DataConfig
from dataloading.multicrop import build_train_loader
from dataloading.torch_baseline import DaliOpsMultiCropTransform, PillowTrainLoader

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
coordinate_shards, noise_shards = stats.coordinate_shards, stats.noise_shards  # fixtures of the statistics tests
CROPS = [CropGroup(32, 2, (0.4, 1.0)), CropGroup(16, 4, (0.1, 0.4))]


def _image(channels: int, size: int = 48, blocks: int = 8) -> np.ndarray:
    """An image of strong colours, smooth within and sharp between blocks x blocks random blocks, HWC uint8."""
    blocks = np.random.default_rng(channels).integers(0, 256, (blocks, blocks, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((size, size), Image.Resampling.BICUBIC)
    return np.array(image if channels == 3 else image.convert("L")).reshape(size, size, channels)


def _peer(channels: int, **augment) -> DaliOpsMultiCropTransform:
    cfg = DataConfig(channels=channels, mean=MEAN[:channels], std=STD[:channels], augment=AugmentConfig(**augment))
    return DaliOpsMultiCropTransform(cfg)


def _pillow(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def _feed(values):
    """An external_source callback (no arguments: DALI reads one as an iteration index) giving one scalar each."""
    return lambda: [np.float32(v) for v in values]


def _dali(images: np.ndarray, graph, **per_sample: list[float]) -> np.ndarray:
    """graph(images, **per-sample parameters fed as DALI inputs), run once on the CPU."""

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=3)
    def pipeline():
        x = fn.external_source(source=lambda: list(images), layout="HWC", dtype=types.UINT8, batch=True)
        fed = {name: fn.external_source(source=_feed(values), batch=True) for name, values in per_sample.items()}
        return graph(x, **fed)

    pipe = pipeline()
    pipe.build()
    (out,) = pipe.run()
    return np.stack([np.array(t) for t in out])


# (brightness, contrast, saturation, hue in radians): unchanged, grayscale, mixed, out of range (clamps), hue only
RGB_DRAWS = [(1.0, 1.0, 1.0, 0.0), (1.0, 1.0, 0.0, 0.0), (1.4, 0.5, 1.6, 1.1), (0.6, 1.7, 0.4, -1.2),
             (1.8, 1.8, 1.8, 0.5), (1.0, 1.0, 1.0, -0.9)]
GRAY_DRAWS = [(1.0, 1.0), (1.4, 0.5), (0.6, 1.7), (1.8, 1.8)]


@pytest.mark.parametrize("channels", [3, 1])
def test_color_map_equals_the_dali_graphs(channels):
    draws = RGB_DRAWS if channels == 3 else GRAY_DRAWS
    names = ("brightness", "contrast", "saturation", "hue")[:len(draws[0])]
    image = _image(channels)
    expected = _dali(np.stack([image] * len(draws)), map_colors, **dict(zip(names, zip(*draws))))
    peer = _peer(channels)
    changed = 0
    for draw, reference in zip(draws, expected):
        got = np.array(peer.map_colors(_pillow(image), *draw)).reshape(image.shape)
        assert got.dtype == np.uint8
        assert np.abs(got.astype(int) - reference.astype(int)).max() <= 1, draw  # both round to uint8 once
        changed += np.abs(got.astype(int) - image.astype(int)).max() > 20
    assert changed == len(draws) - 1  # every draw but the first did change the image
    if channels == 3:
        assert (expected[4] == 255).any() and (expected[4] == 0).any()  # the clamp was exercised


def test_draws_follow_the_config_as_the_dali_graph_draws():
    aug = AugmentConfig()
    peer = _peer(3)
    random.seed(0)
    draws = np.array([peer.draw_colors() for _ in range(20000)])
    jittered = draws[:, 0] != 1
    gray = draws[:, 2] == 0
    assert abs(jittered.mean() - aug.color_jitter_p) < 0.015 and abs(gray.mean() - aug.grayscale_p) < 0.015
    for column, strength in enumerate((aug.brightness, aug.contrast, aug.saturation)):
        values = draws[jittered & ~gray, column]
        assert max(0, 1 - strength) <= values.min() and values.max() <= 1 + strength
        assert abs(values.mean() - (max(0, 1 - strength) + 1 + strength) / 2) < 0.02  # uniform
    hue = draws[jittered, 3]
    assert np.abs(hue).max() <= 2 * math.pi * aug.hue and abs(np.abs(hue).mean() - math.pi * aug.hue) < 0.02
    assert (draws[~jittered] == [1, 1, 0, 0]).all(1).sum() + (draws[~jittered] == [1, 1, 1, 0]).all(1).sum() \
        == (~jittered).sum()  # without jitter: unchanged or gray
    gray_only = _peer(1, color_jitter_p=0.0)
    assert all(gray_only.draw_colors() == (1.0, 1.0, 1.0, 0.0) for _ in range(100))  # no grayscale for 1 channel


@pytest.mark.parametrize("channels", [3, 1])
def test_flip_and_normalize_equal_the_dali_graphs(channels):
    image = _image(channels)
    mean, std = MEAN[:channels], STD[:channels]

    def graph(x, mirror):
        return normalize(x, mean, std, fn.cast(mirror, dtype=types.INT32), "HWC")

    expected = _dali(np.stack([image] * 2), graph, mirror=[0, 1])
    peer = _peer(channels)
    for mirror, reference in zip((False, True), expected):
        got = peer.normalize(_pillow(image), mirror)
        assert got.dtype == torch.float32 and tuple(got.shape) == image.shape
        assert np.abs(got.numpy() - reference).max() < 1e-5


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_pillows_blur_is_close_to_the_dali_graphs(sigma):
    # The peer blurs as the torchvision recipe does (Pillow, radius = sigma); the graph's Gaussian reaches +-2 sigma
    # to be about as wide. Inside (the two treat borders differently: DALI reflects, Pillow repeats the edge) they
    # differ by far less than the blur changes the image.
    image = _image(3, size=96, blocks=32)
    (expected,) = _dali(image[None], lambda x: blur(x, 1.0, (sigma, sigma + 1e-6)))
    got = np.array(_pillow(image).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(float)
    inside = (slice(5, -5), slice(5, -5))
    difference = np.abs(got - expected)[inside]
    change = np.abs(expected - image)[inside].mean()
    assert difference.mean() < min(1, 0.1 * change) and difference.max() < 5, (difference.mean(), change)


@pytest.fixture
def pillow_is_the_peer(monkeypatch):
    """test_augment_stats's "pillow" provider becomes the fair peer."""
    monkeypatch.setattr(stats, "PillowTrainLoader", functools.partial(PillowTrainLoader, ops="dali"))


def test_the_peers_crops_flips_blur_and_solarize_follow_the_graphs_statistics(pillow_is_the_peer, coordinate_shards,
                                                                              noise_shards):
    # The statistics tests' own checks, with the peer in place of the torchvision recipe.
    stats.test_crop_sizes_scales_and_aspects_dali_vs_pillow(coordinate_shards)
    stats.test_flip_and_grayscale_rates(coordinate_shards, "pillow")
    stats.test_blur_rate_and_sigma_range(noise_shards, "pillow")
    stats.test_solarize_rate_and_threshold(noise_shards, "pillow")


def test_the_peer_gives_the_dali_loaders_batches(shards):
    cfg = DataConfig(train_shards=shards["train"], crops=CROPS)
    peer = PillowTrainLoader(cfg, batch_size=20, num_workers=1, ops="dali")
    dali = build_train_loader(cfg, batch_size=20)
    assert (peer.crop_sizes, peer.steps_per_epoch) == (dali.crop_sizes, dali.steps_per_epoch)
    epoch = [next(peer) for _ in range(peer.steps_per_epoch)]
    reference = next(dali)
    for got, expected in zip(epoch[0]["crops"], reference["crops"]):
        assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
    low = min((0 - m) / s for m, s in zip(MEAN, STD))
    high = max((1 - m) / s for m, s in zip(MEAN, STD))
    crops = torch.cat([c.flatten() for batch in epoch for c in batch["crops"]])
    assert low - 1e-5 <= crops.min() and crops.max() <= high + 1e-5 and crops.std() > 0.3
    labels = torch.cat([batch["label"] for batch in epoch])
    assert Counter(labels.tolist()) == Counter({label: 10 for label in range(10)})  # every sample once
    peer.close()


def test_the_peer_in_process_gray_and_contiguous(shards):
    cfg = DataConfig(train_shards=shards["train"], crops=CROPS, channels=1, mean=(0.3,), std=(0.35,),
                     output_dtype="bfloat16")
    batch = next(PillowTrainLoader(cfg, batch_size=10, num_workers=0, channels_last=False, ops="dali"))
    assert [tuple(c.shape) for c in batch["crops"]] == [(10, 1, 32, 32)] * 2 + [(10, 1, 16, 16)] * 4
    assert all(c.dtype == torch.bfloat16 and c.is_contiguous() for c in batch["crops"])
    with pytest.raises(ValueError, match="ops='albumentations'"):
        PillowTrainLoader(cfg, batch_size=10, num_workers=0, ops="albumentations")


def test_data_benchmark_times_the_peer_beside_dali(shards, tmp_path, capsys):
    argv = [shards["train"], "--threads", "1", "--batch-size", "8", "--batches", "2", "--rounds", "2", "--warmup", "1",
            "--providers", "dali", "pillow_dali_ops", "--out", str(tmp_path / "data.json")]
    bench_data.main(argv)
    records = json.loads((tmp_path / "data.json").read_text())
    assert [r["provider"] for r in records] == ["dali", "pillow_dali_ops"]
    assert all(r["img_per_s"] > 0 and r["rounds"] == 2 and r["command"] == "seer bench data " + " ".join(argv)
               and 0 <= r["other_jobs_cpu_share"] <= 1 and r["cpus"] >= 1 for r in records)
    # DALI's CPU time is its own process's threads. The peer's also counts DataLoader workers, which a 2-batch run can
    # see end between two readings (seen once as a non-positive figure in a fresh-clone CI run): only its type here.
    assert records[0]["cpu_ms_per_image"] > 0 and isinstance(records[1]["cpu_ms_per_image"], float)
    ratio = records[0]["img_per_s"] / records[1]["img_per_s"]
    cpu_ratio = records[0]["cpu_ms_per_image"] / records[1]["cpu_ms_per_image"]
    assert f"dali / pillow_dali_ops: {ratio:.2f}x img/s, {cpu_ratio:.2f}x CPU" in capsys.readouterr().err


def test_cpu_time_counts_child_processes_live_and_ended():
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ninput()"
    start = bench_data.cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while bench_data.cpu_seconds() - start < 0.3 and time.monotonic() < deadline:  # live: counted while it runs
        time.sleep(0.05)
    assert bench_data.cpu_seconds() - start >= 0.3
    child.communicate(b"\n")  # ended and reaped: still counted
    assert bench_data.cpu_seconds() - start >= 0.3
