"""The train graph's colour jitter (`map_colors`: brightness, contrast, saturation, hue, grayscale as one affine
map per pixel) against torchvision's rules computed in numpy, and its hue against DALI's own fn.hsv."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types

from dataloading.augment import LUMA, map_colors

BATCH = 4


def _feed(values):
    """An external_source callback (no arguments: DALI reads one as an iteration index) giving one scalar each."""
    return lambda: [np.float32(v) for v in values]


def _run(images: np.ndarray, params: dict[str, np.ndarray], with_hsv_degrees: np.ndarray | None = None):
    """map_colors on the CPU with per-sample parameters fed as DALI inputs; optionally also fn.hsv."""

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def graph():
        x = fn.external_source(source=lambda: list(images), layout="HWC", dtype=types.UINT8, batch=True)
        fed = {name: fn.external_source(source=_feed(values), batch=True) for name, values in params.items()}
        outputs = [map_colors(x, **fed)]
        if with_hsv_degrees is not None:
            outputs.append(fn.hsv(x, hue=fn.external_source(source=_feed(with_hsv_degrees), batch=True)))
        return tuple(outputs)

    pipe = graph()
    pipe.build()
    return [np.stack([np.array(t) for t in out]) for out in pipe.run()]


def _luma(x: np.ndarray) -> np.ndarray:
    return x @ np.array(LUMA) if x.shape[-1] == 3 else x[..., 0]


def _torchvision(x: np.ndarray, order: str, b, c, s=None) -> np.ndarray:
    """torchvision's brightness, contrast, saturation (no clamping: the test images stay in range) in `order`."""
    out = x.astype(np.float64)
    for op in order:
        if op == "b":
            out = b * out
        elif op == "c":
            mean = _luma(out).mean()
            out = c * (out - mean) + mean
        elif op == "s" and s is not None:
            out = s * out + (1 - s) * _luma(out)[..., None]
    return out


def _images(channels: int) -> np.ndarray:
    # Mid-range pixels, so that the factors below never leave [0, 255] and no clamp is involved; for RGB, channel
    # means far apart, so that the contrast pivot (the mean luma, not the mean over channels) matters.
    pixels = np.random.default_rng(channels).integers(0, 32, (BATCH, 12, 10, channels))
    return (pixels + (np.array([130, 105, 100]) if channels == 3 else 112)).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_brightness_contrast_saturation_follow_torchvision_in_any_order(channels):
    rng = np.random.default_rng(7)
    b, c = rng.uniform(0.8, 1.25, BATCH), rng.uniform(0.6, 1.4, BATCH)
    params = dict(brightness=b, contrast=c)
    s = None
    if channels == 3:
        s = np.array([0.0, 0.5, 1.0, 1.4])  # 0: the grayscale image
        params.update(saturation=s)
    images = _images(channels)
    (mapped,) = _run(images, params)
    assert mapped.dtype == np.uint8 and mapped.shape == images.shape
    for i in range(BATCH):
        si = None if s is None else s[i]
        reference = _torchvision(images[i], "bcs", b[i], c[i], si)
        assert np.abs(reference - _torchvision(images[i], "scb", b[i], c[i], si)).max() < 1e-9  # they commute
        assert 0 < reference.min() and reference.max() < 255
        assert np.abs(mapped[i] - reference).max() <= 0.5 + 1e-3  # rounded once
    if channels == 3:
        gray = mapped[0].astype(int)
        assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_hue_matches_dali_hsv():
    degrees = np.array([-72.0, -20.0, 35.0, 72.0])
    images = _images(3)
    ones = np.ones(BATCH)
    mapped, hsv = _run(images, dict(brightness=ones, contrast=ones, saturation=ones, hue=np.radians(degrees)),
                       with_hsv_degrees=degrees)
    assert np.abs(mapped.astype(int) - hsv.astype(int)).max() <= 1  # both round to uint8
    assert np.abs(mapped.astype(int) - images.astype(int)).max() > 10  # the hue did change


def test_values_out_of_range_saturate():
    images = np.full((BATCH, 4, 4, 3), 200, dtype=np.uint8)
    images[:, :2] = 20
    brightness = np.array([1.8, 0.2, 1.0, 1.0])
    contrast = np.array([1.0, 1.0, 1.8, 0.2])
    (mapped,) = _run(images, dict(brightness=brightness, contrast=contrast, saturation=np.ones(BATCH)))
    assert (mapped[0, 2:] == 255).all() and (mapped[0, :2] == 36).all()  # 1.8 * 200 clamps, no wrap-around
    assert (mapped[1, 2:] == 40).all() and (mapped[1, :2] == 4).all()
    assert (mapped[2, 2:] == 255).all() and (mapped[2, :2] == 0).all()  # mean 110: 110 +- 1.8 * 90
    assert (mapped[3, 2:] == 128).all() and (mapped[3, :2] == 92).all()  # 110 +- 0.2 * 90


@pytest.mark.parametrize("strengths", [dict(brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0),
                                       dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.3),
                                       dict(brightness=0.0, contrast=0.5, saturation=0.5, hue=0.0)])
def test_any_strength_may_be_zero(shards, strengths):
    # A strength of 0 is no jitter of that kind (DALI's uniform refuses the empty range [1, 1]).
    from dataloading.config import AugmentConfig, CropGroup, DataConfig
    from dataloading.multicrop import build_train_loader

    augment = AugmentConfig(color_jitter_p=1.0, grayscale_p=0.0, blur_p=0.0, **strengths)
    cfg = DataConfig(train_shards=shards["train"], crops=[CropGroup(16, 2, (0.5, 1.0))], augment=augment)
    crops = next(build_train_loader(cfg, batch_size=8))["crops"]
    assert [tuple(c.shape) for c in crops] == [(8, 3, 16, 16)] * 2 and all(torch.isfinite(c).all() for c in crops)
