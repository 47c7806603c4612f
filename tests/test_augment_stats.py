"""Augmentation statistics of the DALI train loader and the Pillow baseline, measured on synthetic images whose
pixels say where they came from: crop scale and aspect ratio, flip, grayscale, blur (and its sigma), solarize.

Each rate is checked against its probability with a tolerance of at least 3.5 binomial standard deviations.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dataloading.config import AugmentConfig, CropGroup, DataConfig
from dataloading.pack import pack
from dataloading.augment import BLUR_WINDOW_SIGMAS
from dataloading.multicrop import build_train_loader
from dataloading.torch_baseline import PillowTrainLoader

RGB = dict(channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
PLAIN = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
SIDE = 256  # coordinate images: red = column, green = row, so a crop's pixels tell its box in the source
GROUPS = [CropGroup(32, 2, (0.4, 1.0)), CropGroup(16, 4, (0.1, 0.4))]


def _pack_copies(folder, image: np.ndarray, copies: int):
    """Copies of one image as JPEG files that pack keeps byte for byte; a comment segment makes each file's bytes
    unique (pack skips duplicate files) without changing a pixel."""
    (folder / "images").mkdir(parents=True)
    for i in range(copies):
        Image.fromarray(image).save(folder / "images" / f"{i:03d}.jpg", quality=100, subsampling=0, comment=f"{i}")
    pack(folder / "images", folder / "shards", labels_from_folders=False, progress=False, workers=1)
    return folder / "shards"


@pytest.fixture(scope="module")
def coordinate_shards(tmp_path_factory):
    ramp = np.arange(SIDE, dtype=np.uint8)
    image = np.stack([np.tile(ramp, (SIDE, 1)), np.tile(ramp[:, None], (1, SIDE)), np.full((SIDE, SIDE), 128)], -1)
    return _pack_copies(tmp_path_factory.mktemp("coordinates"), image.astype(np.uint8), copies=32)


@pytest.fixture(scope="module")
def noise_shards(tmp_path_factory):
    """Copies of one 64×64 noise image: with scale (1, 1) every unaugmented crop is that image."""
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return _pack_copies(tmp_path_factory.mktemp("noise"), image, copies=16)


def loader(provider: str, shards, batch_size: int, crops=GROUPS, **augment):
    cfg = DataConfig(train_shards=str(shards), crops=crops, augment=AugmentConfig(**{**PLAIN, **augment}), **RGB)
    if provider == "dali":
        return build_train_loader(cfg, batch_size=batch_size)
    torch.manual_seed(0)  # in-process loading draws from the global generators
    random.seed(0)
    return PillowTrainLoader(cfg, batch_size=batch_size, num_workers=0)


def crops_by_group(provider, shards, batches: int, crops=GROUPS, **augment) -> list[torch.Tensor]:
    """All crops of each group over `batches` batches of 16, in pixel units (0-255), N×3×size×size."""
    source = loader(provider, shards, 16, crops, **augment)
    per_crop = [[] for _ in source.crop_sizes]
    for _ in range(batches):
        for i, crop in enumerate(next(source)["crops"]):
            per_crop[i].append(crop.float() * 0.25 * 255 + 0.5 * 255)
    out, start = [], 0
    for group in crops:
        out.append(torch.cat([torch.cat(per_crop[i]) for i in range(start, start + group.count)]))
        start += group.count
    return out


def boxes(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(area fraction, aspect ratio w/h, mirrored) of each coordinate crop's source box.

    Output pixel i samples the source at x0 + (i + 0.5) w / size, so columns 1 and size-2 lie (size-3) w / size apart;
    the outermost columns are skipped because resampling filters are clamped at the source border.
    """
    size = crops.shape[-1]
    red, green = crops[:, 0], crops[:, 1]
    span_x = red[:, :, -2].mean(1) - red[:, :, 1].mean(1)
    span_y = green[:, -2, :].mean(1) - green[:, 1, :].mean(1)
    width, height = span_x.abs() * size / (size - 3), span_y * size / (size - 3)
    return width * height / SIDE**2, width / height, span_x < 0


def check_crop_boxes(provider, shards) -> list[float]:
    """Check each group's crop sizes, areas and aspect ratios; return each group's mean area."""
    mean_areas = []
    for group, crops in zip(GROUPS, crops_by_group(provider, shards, 6)):
        assert tuple(crops.shape[1:]) == (3, group.size, group.size)
        area, aspect, mirrored = boxes(crops)
        low, high = group.scale
        assert not mirrored.any()
        # Bounds: the estimate is good to ~2% of the area; aspect ratios stay in 3/4..4/3 (or the whole image).
        assert low - 0.03 <= area.min() and area.max() <= high + 0.03, (provider, area.min(), area.max())
        assert area.min() < low + 0.1 * (high - low) and area.max() > high - 0.25 * (high - low)  # range is used
        assert 0.75 - 0.05 <= aspect.min() and aspect.max() <= 4 / 3 + 0.05
        mean_areas.append(area.mean().item())
    return mean_areas


def test_crop_sizes_scales_and_aspects_dali_vs_pillow(coordinate_shards):
    # The same sampling rule (area uniform in scale, log-aspect uniform, retry, fall back to the whole image):
    # mean areas agree within ~4 standard errors (0.04 at 192 and 384 crops per group).
    dali, pillow = (check_crop_boxes(provider, coordinate_shards) for provider in ("dali", "pillow"))
    assert np.allclose(dali, pillow, atol=0.04), (dali, pillow)


@pytest.mark.parametrize("provider", ["dali", "pillow"])
def test_flip_and_grayscale_rates(coordinate_shards, provider):
    groups = crops_by_group(provider, coordinate_shards, 6, flip_p=0.5, grayscale_p=0.2)
    # A gray crop's red channel is the luma, 0.299 red + 0.587 green + ...: still a ramp that shows a mirror.
    mirrored = torch.cat([boxes(group)[2] for group in groups])
    gray = torch.cat([(group[:, 0] - group[:, 1]).abs().amax((1, 2)) < 3 for group in groups])  # R = G only if gray
    assert abs(gray.float().mean() - 0.2) < 0.07, gray.float().mean()  # n = 576: sd 0.017
    assert abs(mirrored.float().mean() - 0.5) < 0.08, mirrored.float().mean()  # sd 0.021


def _reference(provider, noise_shards) -> torch.Tensor:
    (crops,) = crops_by_group(provider, noise_shards, 1, crops=[CropGroup(64, 1, (1.0, 1.0))])
    assert (crops - crops[0]).abs().max() == 0  # every copy gives the same unaugmented crop
    return crops[0]


def _gaussian_variance_ratio(sigma: np.ndarray) -> np.ndarray:
    """Variance left in white noise after a separable Gaussian blur with taps at -2 sigma..2 sigma (the DALI graph's
    window; Pillow's three box passes reach about as far)."""
    ratios = []
    for s in sigma:
        radius = int(np.ceil(BLUR_WINDOW_SIGMAS * s))
        taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * s * s))
        ratios.append((np.sum((taps / taps.sum()) ** 2)) ** 2)
    return np.array(ratios)


@pytest.mark.parametrize("provider", ["dali", "pillow"])
def test_blur_rate_and_sigma_range(noise_shards, provider):
    reference = _reference(provider, noise_shards)
    (crops,) = crops_by_group(provider, noise_shards, 2, crops=[CropGroup(64, 4, (1.0, 1.0))], blur_p=0.5,
                              blur_sigma=(1.0, 2.0))
    unchanged = (crops - reference).abs().amax((1, 2, 3)) < 1e-3
    assert abs(unchanged.float().mean() - 0.5) < 0.16  # n = 128: sd 0.044
    # Unblurred crops are the image itself (DALI: a 1-tap window, an exact no-op).
    assert torch.equal(crops[unchanged], reference.expand_as(crops[unchanged]))
    # Each blurred crop's sigma, from the noise variance it kept (interior pixels, away from border effects).
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    kept = (crops[~unchanged][inner].var((2, 3)) / reference[None][inner].var((2, 3))).mean(1).numpy()
    grid = np.linspace(0.3, 3.0, 271)
    sigma = grid[np.abs(_gaussian_variance_ratio(grid)[None] - kept[:, None]).argmin(1)]
    assert 0.8 <= sigma.min() < 1.3 and 1.7 < sigma.max() <= 2.3, (provider, sigma.min(), sigma.max())


@pytest.mark.parametrize("provider", ["dali", "pillow"])
def test_solarize_rate_and_threshold(noise_shards, provider):
    reference = _reference(provider, noise_shards)
    solarized = torch.where(reference >= 127.5, 255 - reference, reference)
    (crops,) = crops_by_group(provider, noise_shards, 2, crops=[CropGroup(64, 4, (1.0, 1.0))], solarize_p=0.5)
    plain = (crops - reference).abs().amax((1, 2, 3)) < 1e-3
    inverted = (crops - solarized).abs().amax((1, 2, 3)) < 1e-3
    assert (plain ^ inverted).all()  # each crop is one or the other
    assert abs(inverted.float().mean() - 0.5) < 0.16  # n = 128: sd 0.044


def test_a_crop_group_can_override_blur(noise_shards):
    reference = _reference("dali", noise_shards)
    groups = [CropGroup(64, 2, (1.0, 1.0), blur_p=1.0), CropGroup(64, 2, (1.0, 1.0), blur_p=0.0)]
    always, never = crops_by_group("dali", noise_shards, 1, groups, blur_p=0.5, blur_sigma=(1.0, 2.0))
    assert ((always - reference).abs().amax((1, 2, 3)) > 1).all()
    assert torch.equal(never, reference.expand_as(never))
