"""Typed settings of the data path. The engine's config embeds these; the loaders take them as they are."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CropGroup:
    """`count` random-resized crops of `size` px, each covering a `scale` fraction of the source image's area."""

    size: int
    count: int
    scale: tuple[float, float]


@dataclass
class AugmentConfig:
    """Photometric and geometric augmentation applied independently to every crop (SwAV/SEER recipe)."""

    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.8  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.8  # factor drawn from [1 - c, 1 + c]
    saturation: float = 0.8  # factor drawn from [1 - s, 1 + s]; ignored for 1-channel data
    hue: float = 0.2  # torchvision convention: fraction of the colour circle, so 0.2 = +-72 degrees
    grayscale_p: float = 0.2  # ignored for 1-channel data


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
