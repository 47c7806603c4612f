"""The multi-crop recipe of the DALI train loader with a PyTorch DataLoader and Pillow: the peers that `seer bench data`
measures DALI against. Not used for training.

It reads the same packed shards (each tar's members located once with tarfile, then read by offset), decodes each
image once with Pillow and cuts every crop from that image, in `num_workers` worker processes (default: the DALI
loader's num_threads), and returns the DALI TrainLoader's batch structure, so a trainer cannot tell them apart.

Per crop, as the DALI graph: random-resized crop (scale, aspect 3/4-4/3), colour jitter with probability p
(brightness, contrast, and for RGB saturation and hue), grayscale (RGB), Gaussian blur (Pillow, radius = sigma in
px), solarize, horizontal flip, normalize. Two ways of doing it (`ops`):
- "torchvision": torchvision's PIL transforms, as the SwAV code base: jitter in torchvision's random order, one pass
  over the pixels per colour op, CHW float tensors;
- "dali": the DALI graph's ops and colour maths (dataloading.augment): jitter and grayscale as one affine colour
  map per crop (one `Image.convert` matrix on uint8 HWC), hue as a rotation of YIQ's chroma plane, HWC float output.
"""
from __future__ import annotations

import io
import math
import random
import tarfile

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from dataloading.config import CropGroup, DataConfig, check_data_config


class ShardSamples(Dataset):
    """Samples of a packed shard folder by position, as (crops, label): label -1 for unlabelled shards."""

    def __init__(self, shards_dir, transform):
        from dataloading.shards import read_manifest  # not at module level: workers need not import DALI

        manifest, self.tars, _ = read_manifest(shards_dir)
        self.transform = transform
        self.entries: list[tuple[int, int, int]] = []  # (tar index, offset of the image bytes, size)
        self.labels: list[int] = []
        for tar_index, path in enumerate(self.tars):
            with tarfile.open(path) as tar:
                samples: dict[str, dict[str, tarfile.TarInfo]] = {}
                for member in tar:
                    key, _, ext = member.name.rpartition(".")
                    samples.setdefault(key, {})[ext] = member
                for key, members in samples.items():
                    if "jpg" not in members:
                        raise ValueError(f"{path}: sample {key} has no .jpg member")
                    image = members["jpg"]
                    self.entries.append((tar_index, image.offset_data, image.size))
                    cls = members.get("cls") if manifest["classes"] is not None else None
                    self.labels.append(int(tar.extractfile(cls).read()) if cls is not None else -1)
        self._files: dict[int, object] = {}  # open tar files of this process

    def __getstate__(self):  # worker processes open their own files
        return {**self.__dict__, "_files": {}}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        tar_index, offset, size = self.entries[index]
        if tar_index not in self._files:
            self._files[tar_index] = open(self.tars[tar_index], "rb")
        file = self._files[tar_index]
        file.seek(offset)
        return self.transform(file.read(size)), self.labels[index]


class _GaussianBlur:
    """Pillow's Gaussian blur (its radius is the standard deviation) with sigma uniform in sigma_range px."""

    def __init__(self, sigma_range: tuple[float, float]):
        self.sigma_range = sigma_range

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma_range)))


class TorchvisionMultiCropTransform:
    """Encoded image bytes -> the crops of every crop group (group-major), float C×size×size tensors, by
    torchvision's PIL transforms."""

    layout = "CHW"

    def __init__(self, cfg: DataConfig):
        from dataloading.augment import ASPECT_RATIO

        self.mode = "RGB" if cfg.channels == 3 else "L"
        self.groups = [(self._crop_transform(group, cfg, ASPECT_RATIO), group.count) for group in cfg.crops]

    @staticmethod
    def _crop_transform(group: CropGroup, cfg: DataConfig, aspect_ratio) -> T.Compose:
        aug, rgb = cfg.augment, cfg.channels == 3
        blur_p = aug.blur_p if group.blur_p is None else group.blur_p
        solarize_p = aug.solarize_p if group.solarize_p is None else group.solarize_p
        jitter = T.ColorJitter(brightness=aug.brightness, contrast=aug.contrast,
                               saturation=aug.saturation if rgb else 0, hue=aug.hue if rgb else 0)
        steps = [
            T.RandomResizedCrop(group.size, scale=tuple(group.scale), ratio=aspect_ratio),
            T.RandomApply([jitter], p=aug.color_jitter_p),
            T.RandomGrayscale(p=aug.grayscale_p if rgb else 0.0),
            T.RandomApply([_GaussianBlur(tuple(aug.blur_sigma))], p=blur_p),
            T.RandomSolarize(threshold=255 * aug.solarize_threshold, p=solarize_p),
            T.RandomHorizontalFlip(p=aug.flip_p),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
        return T.Compose(steps)

    def __call__(self, encoded: bytes) -> list[torch.Tensor]:
        image = Image.open(io.BytesIO(encoded)).convert(self.mode)  # decoded once, cropped count times per group
        return [transform(image) for transform, count in self.groups for _ in range(count)]


class DaliOpsMultiCropTransform:
    """Encoded image bytes -> the crops of every crop group (group-major), float size×size×C tensors, by the DALI
    train graph's ops and maths (dataloading.augment) in Pillow and numpy, each crop's parameters drawn as the graph
    draws them."""

    layout = "HWC"

    def __init__(self, cfg: DataConfig):
        # Numbers only: the worker processes get them pickled and never import DALI.
        from dataloading.augment import ASPECT_RATIO, CHROMA_PART, CHROMA_TURN, LUMA, LUMA_PART

        self.aspect_ratio, self.luma = ASPECT_RATIO, np.array(LUMA)
        self.luma_part, self.chroma_part, self.chroma_turn = LUMA_PART, CHROMA_PART, CHROMA_TURN
        self.mode = "RGB" if cfg.channels == 3 else "L"
        self.aug = cfg.augment
        self.groups = [(group, self.aug.blur_p if group.blur_p is None else group.blur_p,
                        self.aug.solarize_p if group.solarize_p is None else group.solarize_p) for group in cfg.crops]
        self.mean = torch.tensor([255 * m for m in cfg.mean])
        self.inv_std = torch.tensor([1 / (255 * s) for s in cfg.std])

    def draw_colors(self) -> tuple[float, float, float, float]:
        """Brightness, contrast, saturation and hue (radians) of one crop, drawn as augment.jitter_colors draws
        them: jitter with probability color_jitter_p, then grayscale (saturation 0) with probability grayscale_p;
        (1, 1, 1, 0) leaves the crop as it is."""
        aug, rgb = self.aug, self.mode == "RGB"
        brightness = contrast = saturation = 1.0
        hue = 0.0
        if random.random() < aug.color_jitter_p:
            brightness = random.uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness)
            contrast = random.uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast)
            if rgb:
                saturation = random.uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation)
                hue = random.uniform(-2 * math.pi * aug.hue, 2 * math.pi * aug.hue)
        if rgb and random.random() < aug.grayscale_p:
            saturation = 0.0
        return brightness, contrast, saturation, hue

    def map_colors(self, crop: Image.Image, brightness: float, contrast: float, saturation: float = 1.0,
                   hue: float = 0.0) -> Image.Image:
        """augment.map_colors on a uint8 Pillow image: x -> M x + t with M = b c (LUMA_PART + s cos h CHROMA_PART
        + s sin h CHROMA_TURN) and t = b (1 - c) m (m: the crop's mean luma), rounded and clamped once to uint8."""
        if brightness == contrast == saturation == 1 and hue == 0:
            return crop
        shift = 0.0
        if contrast != 1:
            # The mean luma from the histogram: exact, and cheaper than a pass over the pixels in numpy.
            counts = np.array(crop.histogram(), dtype=np.float64).reshape(-1, 256)
            channel_means = counts @ np.arange(256) / counts[0].sum()
            mean_luma = channel_means @ self.luma if self.mode == "RGB" else channel_means[0]
            shift = brightness * (1 - contrast) * mean_luma
        if self.mode == "L":
            levels = np.arange(256) * (brightness * contrast) + shift
            return crop.point(np.clip(np.rint(levels), 0, 255).astype(np.uint8).tolist())
        matrix = brightness * contrast * (self.luma_part + saturation * math.cos(hue) * self.chroma_part
                                          + saturation * math.sin(hue) * self.chroma_turn)
        return crop.convert("RGB", tuple(np.column_stack([matrix, np.full(3, shift)]).ravel().tolist()))

    def normalize(self, crop: Image.Image, mirror: bool) -> torch.Tensor:
        """augment.normalize with layout HWC: float (x - mean) / std, flipped horizontally when `mirror`."""
        if mirror:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # on uint8: a quarter of the bytes of float
        pixels = torch.from_numpy(np.array(crop)).view(crop.height, crop.width, len(self.mean))
        return pixels.float().sub_(self.mean).mul_(self.inv_std)

    def _crop(self, image: Image.Image, group: CropGroup, blur_p: float, solarize_p: float) -> torch.Tensor:
        top, left, height, width = T.RandomResizedCrop.get_params(image, list(group.scale), list(self.aspect_ratio))
        crop = image.resize((group.size, group.size), Image.Resampling.BILINEAR,
                            box=(left, top, left + width, top + height))
        crop = self.map_colors(crop, *self.draw_colors())
        if random.random() < blur_p:
            crop = crop.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.aug.blur_sigma)))
        if random.random() < solarize_p:
            crop = ImageOps.solarize(crop, threshold=255 * self.aug.solarize_threshold)
        return self.normalize(crop, mirror=random.random() < self.aug.flip_p)

    def __call__(self, encoded: bytes) -> list[torch.Tensor]:
        image = Image.open(io.BytesIO(encoded))
        image = image.convert(self.mode) if image.mode != self.mode else image  # no copy when decoded as wanted
        return [self._crop(image, group, blur_p, solarize_p)
                for group, blur_p, solarize_p in self.groups for _ in range(group.count)]


TRANSFORMS = {"torchvision": TorchvisionMultiCropTransform, "dali": DaliOpsMultiCropTransform}


class PillowTrainLoader:
    """Endless iterator of {"crops": [B×C×size×size per crop], "label": int64 (B,)}, like the DALI TrainLoader:
    crop-major crops in cfg.output_dtype (channels_last when asked), full batches, a new order every epoch.

    ops: "torchvision" (torchvision's PIL transforms) or "dali" (the DALI graph's ops and colour maths), see above.
    num_workers: worker processes (default cfg.num_threads; 0 = in this process). Workers are spawned, not forked:
    the calling process may already run DALI's threads. cfg.seed seeds the sample order; the augmentations draw from
    torch's and Python's generators, which the DataLoader seeds in each worker (in-process: the global ones).
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, channels_last: bool = True,
                 num_workers: int | None = None, ops: str = "torchvision"):
        check_data_config(cfg)
        if ops not in TRANSFORMS:
            raise ValueError(f"ops={ops!r}: expected one of {', '.join(map(repr, TRANSFORMS))}")
        transform = TRANSFORMS[ops](cfg)
        self.dataset = ShardSamples(cfg.train_shards, transform)
        self.hwc = transform.layout == "HWC"
        self.batch_size, self.channels_last = batch_size, channels_last
        self.dtype = getattr(torch, cfg.output_dtype)
        self.crop_sizes = [group.size for group in cfg.crops for _ in range(group.count)]
        self.samples_per_epoch = len(self.dataset)
        self.steps_per_epoch = self.samples_per_epoch // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.samples_per_epoch} samples of "
                             f"{cfg.train_shards}")
        workers = cfg.num_threads if num_workers is None else num_workers
        self._loader = DataLoader(
            self.dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
            generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=workers > 0,
            multiprocessing_context="spawn" if workers > 0 else None,
        )
        self._batches = iter(self._loader)
        self.epoch = 0  # epochs completed
        self.step = 0  # batches yielded in total

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:
            crops, labels = next(self._batches)
        except StopIteration:
            self.epoch += 1
            self._batches = iter(self._loader)
            crops, labels = next(self._batches)
        self.step += 1
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.hwc:
            crops = [c.permute(0, 3, 1, 2) for c in crops]  # NHWC memory seen as NCHW: channels_last, no copy
        return {"crops": [c.to(dtype=self.dtype, memory_format=memory_format) for c in crops], "label": labels}

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage collected)."""
        self._batches = None
        self._loader = None
