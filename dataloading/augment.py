"""DALI image ops of the loaders' graphs: decode, random-resized crop, the photometric augmentations of the SwAV/SEER
recipe (colour jitter and grayscale as one colour map, Gaussian blur, solarize) and the final flip + normalize.

Each op takes and returns DataNodes of a graph being defined; the same ops run on CPU or GPU images.
"""
from __future__ import annotations

import math

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

from dataloading.config import AugmentConfig

ASPECT_RATIO = (3 / 4, 4 / 3)  # of random-resized crops (torchvision's default)
BLUR_WINDOW_SIGMAS = 2  # blur taps reach +-2 sigma (see blur)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights: Pillow's "L" image, torchvision's grayscale, DALI's hsv
# I and Q rounded so that each row sums to 0: a gray pixel has no chroma, so s = 0 gives exactly the luma.
_RGB_TO_YIQ = np.array([LUMA, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)])


def _in_rgb(yiq_map: np.ndarray) -> np.ndarray:
    """A linear map of YIQ colours written as the same map of RGB colours."""
    return (np.linalg.inv(_RGB_TO_YIQ) @ yiq_map @ _RGB_TO_YIQ).astype(np.float32)


# Hue and saturation act on the chroma plane (I, Q) of YIQ and keep the luma Y, as DALI's fn.hsv (the same sense of
# rotation): x -> LUMA_PART x + s cos(h) CHROMA_PART x + s sin(h) CHROMA_TURN x.
LUMA_PART = _in_rgb(np.diag([1.0, 0.0, 0.0]))
CHROMA_PART = _in_rgb(np.diag([0.0, 1.0, 1.0]))
CHROMA_TURN = _in_rgb(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]))


def _coin(p: float):
    """Per-sample 1.0 with probability p, else 0.0: parameters become `neutral + coin * (random - neutral)`,
    which applies an op to some samples only without blending images."""
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _factor(strength: float, on):
    """torchvision's jitter factor: uniform in [max(0, 1 - strength), 1 + strength] where `on`, else 1; the number 1
    for strength 0 or `on` None (no jitter of that kind)."""
    if strength == 0 or on is None:
        return 1.0
    return 1 + on * (fn.random.uniform(range=[max(0.0, 1 - strength), 1 + strength]) - 1)


def _on_device_of(images, *scalars):
    """Per-sample CPU scalars join GPU arithmetic as GPU tensors."""
    return [s.gpu() for s in scalars] if images.device == "gpu" else list(scalars)


def _mean_luma(images, channels: int):
    """Per-sample mean luma: the pivot of torchvision's contrast (the mean of the grayscale image)."""
    if channels == 1:
        return fn.reductions.mean(images, dtype=types.FLOAT)
    means = fn.reductions.mean(images, axes=[0, 1], dtype=types.FLOAT)
    return LUMA[0] * means[0] + LUMA[1] * means[1] + LUMA[2] * means[2]


def jitter_colors(images, aug: AugmentConfig, channels: int):
    """torchvision-style ColorJitter with probability color_jitter_p, then RandomGrayscale (3 channels only), in
    one pass (`map_colors`): DALI's CPU colour ops cost several ns per value each, and with brightness_contrast
    then hsv, colour was a third of the graph's time. torchvision's hue (a fraction of the colour circle) is
    drawn in radians; grayscale is saturation 0."""
    rgb = channels == 3
    jitter = aug.color_jitter_p > 0 and any((aug.brightness, aug.contrast) + ((aug.saturation, aug.hue) if rgb else ()))
    grayscale_p = aug.grayscale_p if rgb else 0.0
    if not jitter and grayscale_p == 0:
        return images
    on = _coin(aug.color_jitter_p) if jitter else None
    brightness, contrast = _factor(aug.brightness, on), _factor(aug.contrast, on)
    if not rgb:
        return map_colors(images, brightness, contrast)
    saturation = _factor(aug.saturation, on)
    if grayscale_p > 0:
        saturation = saturation * (1 - _coin(grayscale_p))
    hue = on * fn.random.uniform(range=[-2 * math.pi * aug.hue, 2 * math.pi * aug.hue]) if jitter and aug.hue else None
    return map_colors(images, brightness, contrast, saturation, hue)


def map_colors(images, brightness, contrast, saturation=None, hue=None):
    """Brightness b, contrast c and (RGB) saturation s, hue h (radians) as one per-pixel affine map x -> M x + t
    (fn.coord_transform), clamped to [0, 255]. Each parameter: a per-sample DataNode or a number.

    torchvision's rules: b scales; c pivots on the mean luma m; s blends with the luma. Hue rotates the chroma
    plane of YIQ as DALI's fn.hsv (torchvision shifts HSV hue). So M = b c (LUMA_PART + s cos h CHROMA_PART +
    s sin h CHROMA_TURN) and t = b (1 - c) m. Saturation and hue keep the luma, so before clamping the four
    commute and torchvision's random order changes nothing; torchvision clamps after each step, this once.
    """
    matrix = brightness * contrast
    if saturation is not None:
        chroma = matrix * saturation
        cos, sin = (1.0, 0.0) if hue is None else (dmath.cos(hue), dmath.sin(hue))
        matrix = (matrix * types.Constant(LUMA_PART) + chroma * cos * types.Constant(CHROMA_PART)
                  + chroma * sin * types.Constant(CHROMA_TURN))
    pivots = isinstance(contrast, DataNode)  # t != 0
    channels = 1 if saturation is None else 3
    if images.device == "cpu":
        shift = brightness * (1 - contrast) * _mean_luma(images, channels) if pivots else 0.0
        return fn.coord_transform(images, M=matrix, T=shift, dtype=types.UINT8)  # integer output: rounds, clamps
    # On a GPU the map's arguments (M, T) come from the CPU but the mean luma is on the GPU: t is added there.
    mapped = fn.coord_transform(images, M=matrix, dtype=types.FLOAT)
    if pivots:
        (weight,) = _on_device_of(images, brightness * (1 - contrast))
        mapped = mapped + weight * _mean_luma(images, channels)
    return dmath.clamp(mapped, 0.0, 255.0)


def blur(images, p: float, sigma_range: tuple[float, float]):
    """Gaussian blur with probability p, sigma uniform in sigma_range (px), as float (no rounding to uint8).

    Window 2 * ceil(2 sigma) + 1, not DALI's default 2 * ceil(3 sigma) + 1: the SwAV recipe blurs with Pillow, whose
    Gaussian is three box passes reaching about +-2 sigma, and fewer taps make the op cheaper. Samples not drawn
    get a 1-tap window, an exact copy: one graph for every sample without DALI conditionals, whose split and merge
    cost as much as the blur they would skip (measured on CPU).
    """
    if p == 0:
        return images
    on = _coin(p)
    sigma = on * fn.random.uniform(range=list(sigma_range)) + (1 - on)  # 1-tap windows: [1] whatever the sigma
    window = fn.cast(on * 2 * dmath.ceil(BLUR_WINDOW_SIGMAS * sigma) + 1, dtype=types.INT32)
    return fn.gaussian_blur(images, sigma=sigma, window_size=window, dtype=types.FLOAT)


def solarize(images, p: float, threshold: float):
    """With probability p, invert the values at or above `threshold` ([0, 1] units): x -> 255 - x."""
    if p == 0:
        return images
    x = fn.cast(images, dtype=types.FLOAT)
    (on,) = _on_device_of(x, _coin(p))
    return x + on * (x >= 255 * threshold) * (255 - 2 * x)



def decode(jpegs, channels: int, device: str):
    """JPEG bytes -> HWC uint8 images with `channels` (1: gray, 3: RGB), decoded on the CPU or ("cuda") by nvJPEG."""
    return fn.decoders.image(
        jpegs, device="mixed" if device == "cuda" else "cpu", output_type=types.GRAY if channels == 1 else types.RGB
    )


def random_resized_crop(images, size: int, scale: tuple[float, float]):
    """size×size crops covering a `scale` fraction of the image area, aspect ratio in ASPECT_RATIO."""
    return fn.random_resized_crop(images, size=[size, size], random_area=list(scale),
                                  random_aspect_ratio=list(ASPECT_RATIO))


def normalize(images, mean, std, mirror=None, layout: str = "CHW"):
    """Float (x - mean) / std in `layout` (CHW or HWC), with mean and std given in [0, 1] units; flipped
    horizontally where `mirror` (a per-sample coin flip) is 1."""
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout=layout,
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
        mirror=0 if mirror is None else mirror,
    )


def random_flip(p: float):
    """Per-sample `mirror` flag for normalize: 1 with probability p; None (never flipped) for p = 0."""
    return fn.random.coin_flip(probability=p) if p > 0 else None
