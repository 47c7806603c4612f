"""Typed settings of the data path. The engine's config embeds these; the loaders take them as they are."""
from __future__ import annotations

from dataclasses import dataclass, field

OUTPUT_DTYPES = ("float32", "bfloat16")


@dataclass
class CropGroup:
    """`count` random-resized crops of `size` px, each covering a `scale` fraction of the source image's area.

    blur_p / solarize_p, when set, replace the augment section's probability for this group's crops (BYOL and DINO
    blur and solarize their views differently; SwAV/SEER use one setting for all crops).
    """

    size: int
    count: int
    scale: tuple[float, float]
    blur_p: float | None = None
    solarize_p: float | None = None


@dataclass
class AugmentConfig:
    """Photometric and geometric augmentation applied independently to every crop (SwAV/SEER recipe).

    Order per crop: random-resized crop, colour jitter, grayscale, Gaussian blur, solarize, flip, normalize.
    """

    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.8  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.8  # factor drawn from [1 - c, 1 + c]
    saturation: float = 0.8  # factor drawn from [1 - s, 1 + s]; ignored for 1-channel data
    hue: float = 0.2  # torchvision convention: fraction of the colour circle, so 0.2 = +-72 degrees
    grayscale_p: float = 0.2  # ignored for 1-channel data
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px of the output crop, drawn uniformly; kernel 2*ceil(2 sigma)+1
    solarize_p: float = 0.0  # SwAV/SEER do not solarize; BYOL/DINO: 0.2 on one view
    solarize_threshold: float = 0.5  # [0, 1] units: values at or above are inverted (0.5 ~ Pillow's 128)


@dataclass
class DataConfig:
    train_shards: str = ""  # folder written by `seer data pack` (shards + manifest.json)
    channels: int = 3  # 1 decodes to grayscale, 3 to RGB
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # per channel, in [0, 1] units
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crops: list[CropGroup] = field(
        default_factory=lambda: [CropGroup(224, 2, (0.14, 1.0)), CropGroup(96, 4, (0.05, 0.14))]
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_threads: int = 2  # DALI CPU worker threads per rank
    seed: int = 0
    output_dtype: str = "float32"  # dtype of the crops handed to the model: float32 or bfloat16


def check_data_config(cfg: DataConfig) -> None:
    """ValueError naming the data.* key whose value the loaders cannot use: every check of the data section."""
    if cfg.channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3, got {cfg.channels}")
    if len(cfg.mean) != cfg.channels or len(cfg.std) != cfg.channels:
        raise ValueError(f"data.mean and data.std need one value per channel (data.channels={cfg.channels}), got "
                         f"mean {tuple(cfg.mean)} and std {tuple(cfg.std)}")
    if not all(s > 0 for s in cfg.std):
        raise ValueError(f"data.std values must be > 0, got {tuple(cfg.std)}")
    for i, group in enumerate(cfg.crops):
        low, high = group.scale
        if group.size <= 0 or group.count <= 0:
            raise ValueError(f"data.crops[{i}] needs size > 0 and count > 0, got size {group.size} and count "
                             f"{group.count}")
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.crops[{i}].scale must satisfy 0 < low <= high <= 1, got {group.scale}")
    aug = cfg.augment
    probabilities = {f"augment.{name}": getattr(aug, name)
                     for name in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p", "solarize_p")}
    for i, group in enumerate(cfg.crops):
        probabilities.update({f"crops[{i}].blur_p": group.blur_p, f"crops[{i}].solarize_p": group.solarize_p})
    for key, p in probabilities.items():
        if p is not None and not 0 <= p <= 1:
            raise ValueError(f"data.{key} is a probability and must be in [0, 1], got {p}")
    for name in ("brightness", "contrast", "saturation"):
        if getattr(aug, name) < 0:
            raise ValueError(f"data.augment.{name} is a strength and must be >= 0, got {getattr(aug, name)}")
    if not 0 <= aug.hue <= 0.5:
        raise ValueError(f"data.augment.hue is a fraction of the colour circle and must be in [0, 0.5], got {aug.hue}")
    low, high = aug.blur_sigma
    if not 0 < low <= high:
        raise ValueError(f"data.augment.blur_sigma must satisfy 0 < low <= high (px), got {tuple(aug.blur_sigma)}")
    if not 0 <= aug.solarize_threshold <= 1:
        raise ValueError(f"data.augment.solarize_threshold must be in [0, 1], got {aug.solarize_threshold}")
    if cfg.output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"data.output_dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {cfg.output_dtype!r}")
