"""The multi-crop recipe of the DALI train loader with a PyTorch DataLoader, Pillow and torchvision's PIL transforms:
the baseline that `seer bench data` measures DALI against (what the SwAV code base does). Not used for training.

It reads the same packed shards (each tar's members located once with tarfile, then read by offset), decodes each
image once with Pillow and cuts every crop from that image, in `num_workers` worker processes (default: the DALI
loader's num_threads), and returns the DALI TrainLoader's batch structure, so a trainer cannot tell them apart.

Per crop, as the DALI graph: random-resized crop (scale, aspect 3/4-4/3), colour jitter with probability p
(brightness, contrast, and for RGB saturation and hue, in torchvision's random order), grayscale (RGB), Gaussian
blur (Pillow, radius = sigma in px), solarize, horizontal flip, normalize.
"""
from __future__ import annotations

import io
import random
import tarfile

import torch
from PIL import Image, ImageFilter
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


class MultiCropTransform:
    """Encoded image bytes -> the crops of every crop group (group-major), float C×size×size tensors."""

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


class PillowTrainLoader:
    """Endless iterator of {"crops": [B×C×size×size per crop], "label": int64 (B,)}, like the DALI TrainLoader:
    crop-major crops in cfg.output_dtype (channels_last when asked), full batches, a new order every epoch.

    num_workers: worker processes (default cfg.num_threads; 0 = in this process). Workers are spawned, not forked:
    the calling process may already run DALI's threads. cfg.seed seeds the sample order; the augmentations draw from
    torch's and Python's generators, which the DataLoader seeds in each worker (in-process: the global ones).
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, channels_last: bool = True,
                 num_workers: int | None = None):
        check_data_config(cfg)
        self.dataset = ShardSamples(cfg.train_shards, MultiCropTransform(cfg))
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
        return {"crops": [c.to(dtype=self.dtype, memory_format=memory_format) for c in crops], "label": labels}

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage collected)."""
        self._batches = None
        self._loader = None
