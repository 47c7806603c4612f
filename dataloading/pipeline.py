"""DALI loaders over packed webdataset shards: the multi-crop SwAV/SEER train loader and a plain eval loader.

The same graph runs on CPU (device="cpu": CPU decode and ops, CPU torch tensors) or on a GPU (device="cuda":
"mixed" decode, GPU ops, CUDA tensors). Graphs are defined by `define_*_pipeline` without building or running
them, so a GPU graph can be checked (`pipe.serialize()`, with guard=False) on a machine without one.

Bad samples: DALI's decoder cannot skip a broken file. A truncated JPEG raises, non-image bytes or a garbled
header can crash the process (seen: segfaults at batch 32). `pack` validates every image it writes, but shards from
other tools are not validated; so the loaders check each sample's bytes before decoding (`jpeg_problem`, a walk over
the segment headers) and replace a bad sample by a gray image, log its file name and count it (`bad_samples`).
"""
from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from PIL import Image

from dataloading.config import AugmentConfig, CropGroup, DataConfig, check_data_config
from dataloading.jpeg import JPEG_CHECK, jpeg_problem
from dataloading.pack import KEY_DIGITS, MANIFEST

READER = "reader"
LABEL_WIDTH = 9  # .cls entries hold an ASCII class index; padded to fixed width so a batch is one dense tensor
_KEY_SUFFIX = len(".jpg")
ASPECT_RATIO = (3 / 4, 4 / 3)
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- shards
def read_manifest(shards_dir: str | os.PathLike) -> tuple[dict, list[str], list[str]]:
    """The manifest of a packed folder and the paths of its tar and index files; clear errors when unusable."""
    folder = Path(shards_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {folder} is not a packed shard folder (create one with dataloading.pack.pack)"
        )
    manifest = json.loads(path.read_text())
    if not manifest.get("shards") or manifest.get("kept", 0) == 0:
        raise ValueError(f"{path} lists no samples: nothing was packed into {folder} (see its 'skipped')")
    tars = [str(folder / s["tar"]) for s in manifest["shards"]]
    idxs = [str(folder / s["idx"]) for s in manifest["shards"]]
    missing = [p for p in tars + idxs if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{path} lists files that are missing: {missing[:3]}")
    return manifest, tars, idxs


def class_names(manifest: dict, shards_dir: str | os.PathLike, key: str) -> list[str]:
    """The class names in the manifest of packed folder `shards_dir`; one error naming config key `key` when it was
    packed without labels."""
    classes = manifest["classes"]
    if not classes:
        raise ValueError(f"{key}={shards_dir} holds unlabelled images (packed with --no-labels or from a flat "
                         "folder): this needs class labels")
    return classes


def matching_class_names(train_shards, test_shards, train_key: str, test_key: str) -> list[str]:
    """The class names shared by a train and a test folder; one error when either is unlabelled or they differ."""
    classes = class_names(read_manifest(train_shards)[0], train_shards, train_key)
    test_classes = class_names(read_manifest(test_shards)[0], test_shards, test_key)
    if test_classes != classes:
        raise ValueError(f"{test_key} has {len(test_classes)} classes ({', '.join(test_classes[:3])}, ...) but "
                         f"{train_key} has {len(classes)} ({', '.join(classes[:3])}, ...): pack both with the same "
                         "class folders")
    return classes


def _read_samples(tars, idxs, labelled: bool, **reader_args):
    """Encoded images and (when labelled) their raw .cls bytes."""
    outputs = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=["jpg", "cls"] if labelled else ["jpg"],
        missing_component_behavior="error",
        name=READER,
        **reader_args,
    )
    return (outputs[0], outputs[1]) if labelled else (outputs, None)


def _decode(jpegs, channels: int, device: str):
    return fn.decoders.image(
        jpegs, device="mixed" if device == "cuda" else "cpu", output_type=types.GRAY if channels == 1 else types.RGB
    )


def _normalize(images, mean, std, mirror=None, layout: str = "CHW"):
    """Float (x - mean) / std in `layout` (CHW or HWC), with mean and std given in [0, 1] units."""
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout=layout,
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
        mirror=0 if mirror is None else mirror,
    )


def _meta_outputs(labels, jpegs, with_index: bool, device: str) -> tuple[list, list[str]]:
    """Label bytes and (optionally) sample-key bytes as extra outputs; they are parsed to int64 in torch."""
    outputs, names = [], []
    if labels is not None:
        outputs.append(fn.pad(labels, shape=[LABEL_WIDTH], fill_value=0))
        names.append("label")
    if with_index:
        # source_info is "<tar>:<offset>:<key>.jpg"; the key is the KEY_DIGITS characters before ".jpg".
        info = fn.get_property(jpegs, key="source_info")
        start = fn.cast(info.shape() - (KEY_DIGITS + _KEY_SUFFIX), dtype=types.INT32)
        outputs.append(fn.slice(info, start=start, shape=[KEY_DIGITS], axes=[0]))
        names.append("index")
    if device == "cuda":
        outputs = [o.gpu() for o in outputs]
    return outputs, names


def _ascii_to_int(chars: torch.Tensor) -> torch.Tensor:
    """(B, W) uint8 ASCII digits padded with non-digits -> int64 (B,)."""
    digits = chars.long() - ord("0")
    is_digit = (digits >= 0) & (digits <= 9)
    value = torch.zeros(chars.shape[0], dtype=torch.int64, device=chars.device)
    for column in range(chars.shape[1]):
        value = torch.where(is_digit[:, column], value * 10 + digits[:, column], value)
    return value


# ------------------------------------------------------------------------------------------------------ guard
@functools.cache
def _gray_jpeg() -> np.ndarray:
    """The stand-in for a bad sample: mid-gray, so its crops carry no content (one of VISSL's two choices)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, "JPEG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def needs_guard(manifest: dict) -> bool:
    """Whether the loaders must check every sample of the packed folder with this manifest: not when `seer data
    pack` already checked them all with the same jpeg_problem, which saves a Python pass over every sample (42 us
    per image in benchmarks/results/data_cpu.json)."""
    return manifest.get("jpeg_check") != JPEG_CHECK


def _guard_batch(encoded: list[np.ndarray], sources: list[np.ndarray]) -> tuple[list, list]:
    """DALI python_function: the batch with each bad sample replaced by the gray JPEG, and a 0/1 flag per sample."""
    safe, replaced = [], []
    for data, source in zip(encoded, sources):
        problem = jpeg_problem(data)
        if problem is not None:
            _log.warning("replaced a bad sample by a gray image (%s): %s", problem, source.tobytes().decode())
        safe.append(data if problem is None else _gray_jpeg())
        replaced.append(np.array(problem is not None, dtype=np.uint8))
    return safe, replaced


def _guarded(jpegs, manifest: dict, guard: bool | None) -> tuple:
    """(encoded images safe to decode, extra outputs, their names) for a graph reading the packed folder with this
    manifest. guard: check every sample and replace bad ones, adding the output "replaced" (uint8 per sample: 1
    where a bad sample was replaced; it stays on the CPU, so counting it never waits for a GPU); None: unless pack
    checked them (needs_guard).

    The check is a Python operator: it runs on the CPU side of CPU and GPU graphs alike, but DALI cannot serialize
    it.
    """
    if not (needs_guard(manifest) if guard is None else guard):
        return jpegs, [], []
    sources = fn.get_property(jpegs, key="source_info")
    safe, replaced = fn.python_function(jpegs, sources, function=_guard_batch, num_outputs=2, batch_processing=True)
    return safe, [replaced], ["replaced"]


# ----------------------------------------------------------------------------------------------- augmentation
BLUR_WINDOW_SIGMAS = 2  # blur taps reach +-2 sigma (see _blur)
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


def _jitter_colors(images, aug: AugmentConfig, channels: int):
    """torchvision-style ColorJitter with probability color_jitter_p, then RandomGrayscale (3 channels only), in
    one pass (`_map_colors`): DALI's CPU colour ops cost several ns per value each, and with brightness_contrast
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
        return _map_colors(images, brightness, contrast)
    saturation = _factor(aug.saturation, on)
    if grayscale_p > 0:
        saturation = saturation * (1 - _coin(grayscale_p))
    hue = on * fn.random.uniform(range=[-2 * math.pi * aug.hue, 2 * math.pi * aug.hue]) if jitter and aug.hue else None
    return _map_colors(images, brightness, contrast, saturation, hue)


def _map_colors(images, brightness, contrast, saturation=None, hue=None):
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


def _blur(images, p: float, sigma_range: tuple[float, float]):
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


def _solarize(images, p: float, threshold: float):
    """With probability p, invert the values at or above `threshold` ([0, 1] units): x -> 255 - x."""
    if p == 0:
        return images
    x = fn.cast(images, dtype=types.FLOAT)
    (on,) = _on_device_of(x, _coin(p))
    return x + on * (x >= 255 * threshold) * (255 - 2 * x)


def _crop(image, group: CropGroup, cfg: DataConfig, layout: str):
    aug = cfg.augment
    crop = fn.random_resized_crop(
        image, size=[group.size, group.size], random_area=list(group.scale), random_aspect_ratio=list(ASPECT_RATIO)
    )
    crop = _jitter_colors(crop, aug, cfg.channels)
    crop = _blur(crop, aug.blur_p if group.blur_p is None else group.blur_p, aug.blur_sigma)
    crop = _solarize(crop, aug.solarize_p if group.solarize_p is None else group.solarize_p, aug.solarize_threshold)
    mirror = fn.random.coin_flip(probability=aug.flip_p) if aug.flip_p > 0 else None
    return _normalize(crop, cfg.mean, cfg.std, mirror, layout)


def _check_channels(channels: int, mean, std) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel ({channels})")


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def _device_id(device: str, device_id: int | None) -> int | None:
    """The GPU a loader's graph runs on: `device_id`, else $LOCAL_RANK (else 0); None for a CPU graph."""
    _check_device(device)
    if device != "cuda":
        return None
    return int(os.environ.get("LOCAL_RANK", 0)) if device_id is None else device_id


def _rank_seed(seed: int, shard_id: int) -> int:
    """Different random streams per rank, reproducible for a (seed, rank) pair."""
    return (seed * 10_000 + shard_id) % 2**31


# ----------------------------------------------------------------------------------------------------- train
def define_train_pipeline(
    cfg: DataConfig,
    *,
    batch_size: int,
    shard_id: int = 0,
    num_shards: int = 1,
    device: str = "cpu",
    device_id: int | None = None,
    with_index: bool = False,
    channels_last: bool = True,
    guard: bool | None = None,
    checkpoint: bytes | None = None,
) -> tuple[Pipeline, list[str]]:
    """The multi-crop train graph (not built) and the names of its outputs.

    channels_last: crops leave DALI as HWC (TrainLoader views them as NCHW tensors in channels_last memory).
    guard: check and replace bad samples (adds the "replaced" output); None: unless pack checked them
    (needs_guard); False also to serialize the graph.
    """
    _check_device(device)
    _check_channels(cfg.channels, cfg.mean, cfg.std)
    check_data_config(cfg)
    manifest, tars, idxs = read_manifest(cfg.train_shards)
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=cfg.num_threads,
        device_id=device_id,
        seed=_rank_seed(cfg.seed, shard_id),
        enable_checkpointing=True,
        checkpoint=checkpoint,
    )
    with pipe:
        jpegs, labels = _read_samples(
            tars,
            idxs,
            manifest["classes"] is not None,
            random_shuffle=True,
            # Each epoch visits the tar files in a new order, the same on every rank (same seed), so the
            # ranks' shards stay disjoint; the shuffle buffer then mixes samples within a rank.
            shuffle_after_epoch=True,
            shuffle_after_epoch_seed=cfg.seed,
            shard_id=shard_id,
            num_shards=num_shards,
        )
        encoded, flags, flag_names = _guarded(jpegs, manifest, guard)
        image = _decode(encoded, cfg.channels, device)  # once; every crop is cut from this decoded image
        layout = "HWC" if channels_last else "CHW"
        crops = [_crop(image, group, cfg, layout) for group in cfg.crops for _ in range(group.count)]
        meta, meta_names = _meta_outputs(labels, jpegs, with_index, device)
        pipe.set_outputs(*crops, *flags, *meta)
    return pipe, [f"crop{i}" for i in range(len(crops))] + flag_names + meta_names


class EpochIterator:
    """Endless iteration over the epochs of a train graph: full batches only, counting epochs, steps and the samples
    the guard replaced (`bad_samples`)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches yielded in total
    bad_samples: int = 0  # samples replaced by a gray image so far (their file names are logged as warnings)

    def __iter__(self):
        return self

    def _start(self, pipe: Pipeline, names: list[str], shard: str) -> None:
        """Iterate `pipe` (outputs `names`); `shard` names this rank's shard in the error when it is too small."""
        self._iterator = DALIGenericIterator(
            pipe, names, reader_name=READER, last_batch_policy=LastBatchPolicy.DROP, auto_reset=True,
            prepare_first_batch=False,
        )
        self.samples_per_epoch = self._iterator.size  # samples of this rank's shard per epoch
        self.steps_per_epoch = len(self._iterator)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {pipe.max_batch_size} exceeds the {self.samples_per_epoch} samples of {shard}")

    def _next_batch(self) -> dict:
        try:
            (batch,) = next(self._iterator)
        except StopIteration:  # end of an epoch; auto_reset has already rewound the iterator
            self.epoch += 1
            (batch,) = next(self._iterator)
        self.step += 1
        if "replaced" in batch:
            self.bad_samples += int(batch["replaced"].sum())
        return batch


class TrainLoader(EpochIterator):
    """Endless iterator of multi-crop batches: {"crops": [B×C×size×size per crop], "label": int64 (B,)}.

    Crops are crop-major (group 0 copy 0, group 0 copy 1, ..., group 1 copy 0, ...), in cfg.output_dtype, on the
    loader's device, in channels_last memory when asked; label is -1 for unlabelled shards. Each epoch yields
    floor(samples_per_epoch / batch_size) full batches, then the next epoch starts. Bad samples are replaced by a
    gray image and counted in `bad_samples`.
    Resume: DALI's own checkpointing (reader position, shuffle state and every random generator), see state_dict.
    """

    def __init__(self, cfg: DataConfig, *, batch_size, shard_id=0, num_shards=1, device="cpu", device_id=None,
                 with_index=False, channels_last=True, guard=None):
        self.cfg, self.batch_size, self.shard_id, self.num_shards = cfg, batch_size, shard_id, num_shards
        self.device, self.device_id, self.with_index = device, device_id, with_index
        self.channels_last, self.dtype, self.guard = channels_last, getattr(torch, cfg.output_dtype), guard
        self.crop_sizes = [group.size for group in cfg.crops for _ in range(group.count)]
        self._build(checkpoint=None)

    def _build(self, checkpoint: bytes | None) -> None:
        pipe, self._names = define_train_pipeline(
            self.cfg, batch_size=self.batch_size, shard_id=self.shard_id, num_shards=self.num_shards,
            device=self.device, device_id=self.device_id, with_index=self.with_index,
            channels_last=self.channels_last, guard=self.guard, checkpoint=checkpoint,
        )
        self._start(pipe, self._names, f"shard {self.shard_id}/{self.num_shards} in {self.cfg.train_shards}")

    def __next__(self) -> dict:
        batch = self._next_batch()
        crops = [self._model_input(batch[f"crop{i}"]) for i in range(len(self.crop_sizes))]
        out = {"crops": crops, "label": self._labels(batch, crops[0])}
        if self.with_index:
            out["index"] = _ascii_to_int(batch["index"])
        return out

    def _model_input(self, crop: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            crop = crop.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: torch's channels_last layout, no copy
        return crop if crop.dtype == self.dtype else crop.to(self.dtype)  # DALI has no bf16 output

    @staticmethod
    def _labels(batch, like: torch.Tensor) -> torch.Tensor:
        if "label" in batch:
            return _ascii_to_int(batch["label"])
        return torch.full((like.shape[0],), -1, dtype=torch.int64, device=like.device)

    def state_dict(self) -> dict:
        """Position after the batches yielded so far. The DALI checkpoint is bytes: save with torch.save/pickle."""
        return {
            "dali_checkpoint": self._iterator.checkpoints()[0],
            "epoch": self.epoch,
            "step": self.step,
            "bad_samples": self.bad_samples,
            "seed": self.cfg.seed,
            "shard_id": self.shard_id,
            "num_shards": self.num_shards,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that produced `state` was (same config, rank and world size)."""
        for key in ("seed", "shard_id", "num_shards", "batch_size"):
            mine = self.cfg.seed if key == "seed" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]} but this loader has {key}={mine}; "
                    "a DALI checkpoint only resumes the same rank layout, seed and batch size"
                )
        del self._iterator  # release the old pipeline's threads and buffers before building the new one
        self._build(checkpoint=state["dali_checkpoint"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.bad_samples = state.get("bad_samples", 0)  # states saved before the guard existed count from 0


def build_train_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    shard_id: int = 0,
    num_shards: int = 1,
    device: str = "cpu",
    device_id: int | None = None,
    with_index: bool = False,
    channels_last: bool = True,
    guard: bool | None = None,
) -> TrainLoader:
    """Multi-crop loader over the shards in cfg.train_shards for rank `shard_id` of `num_shards`.

    device="cuda" runs the graph on GPU `device_id` (default: $LOCAL_RANK, else 0). with_index adds
    "index": the packed sample key (int64), for checks of sharding and coverage. channels_last gives crops in
    torch.channels_last memory (what the model wants with model.channels_last); else contiguous NCHW.
    guard: check every sample before decoding (None: unless `seer data pack` wrote the shards, see needs_guard).
    """
    return TrainLoader(cfg, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, device=device,
                       device_id=_device_id(device, device_id), with_index=with_index,
                       channels_last=channels_last, guard=guard)


# ------------------------------------------------------------------------------------------------------ eval
def define_eval_pipeline(
    shards_dir, *, size, channels, mean, std, batch_size, num_threads=2, shard_id=0, num_shards=1, device="cpu",
    device_id=None, with_index=False, guard=None,
) -> tuple[Pipeline, list[str]]:
    """The eval graph (not built): every sample once, in stored order, resized to size×size, normalized.

    guard: check and replace bad samples (adds the "replaced" output); None: unless pack checked them
    (needs_guard); False also to serialize the graph.
    """
    _check_device(device)
    _check_channels(channels, mean, std)
    manifest, tars, idxs = read_manifest(shards_dir)
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0)
    with pipe:
        jpegs, labels = _read_samples(
            tars, idxs, manifest["classes"] is not None, random_shuffle=False,
            # pad_last_batch lets the iterator tell padding from data (it drops the padding);
            # stick_to_shard keeps every pass on the same samples.
            pad_last_batch=True, stick_to_shard=True, shard_id=shard_id, num_shards=num_shards,
        )
        encoded, flags, flag_names = _guarded(jpegs, manifest, guard)
        image = fn.resize(_decode(encoded, channels, device), size=[size, size])
        meta, meta_names = _meta_outputs(labels, jpegs, with_index, device)
        pipe.set_outputs(_normalize(image, mean, std), *flags, *meta)
    return pipe, ["image"] + flag_names + meta_names


class EvalLoader:
    """Re-iterable: each `for` is one pass yielding {"image": B×C×size×size, "label": int64 (B,)}; every sample of
    this rank's shard exactly once, the last batch possibly smaller. Bad samples are replaced by a gray image and
    counted in `bad_samples` (over all passes)."""

    def __init__(self, pipe: Pipeline, names: list[str], with_index: bool):
        self._iterator = DALIGenericIterator(
            pipe, names, reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True,
            prepare_first_batch=False,
        )
        self.with_index = with_index
        self.samples = self._iterator.size
        self.bad_samples = 0
        self._mid_pass = False

    def __len__(self) -> int:
        return len(self._iterator)

    def __iter__(self):
        if self._mid_pass:  # an earlier pass stopped early; DALI only rewinds at the end of a pass
            for _ in self._iterator:
                pass
        self._mid_pass = True
        for (batch,) in self._iterator:
            if "replaced" in batch:
                self.bad_samples += int(batch["replaced"].sum())
            out = {"image": batch["image"], "label": TrainLoader._labels(batch, batch["image"])}
            if self.with_index:
                out["index"] = _ascii_to_int(batch["index"])
            yield out
        self._mid_pass = False


def build_eval_loader(
    shards_dir, *, size, channels, mean, std, batch_size, num_threads=2, shard_id=0, num_shards=1, device="cpu",
    device_id=None, with_index=False,
) -> EvalLoader:
    pipe, names = define_eval_pipeline(
        shards_dir, size=size, channels=channels, mean=mean, std=std, batch_size=batch_size,
        num_threads=num_threads, shard_id=shard_id, num_shards=num_shards, device=device,
        device_id=_device_id(device, device_id), with_index=with_index,
    )
    return EvalLoader(pipe, names, with_index)


# ----------------------------------------------------------------------------------------------------- files
def image_file_batches(paths, *, size, channels, mean, std, batch_size=64, num_threads=2, jpeg_quality=95):
    """Image files -> float batches B×C×size×size (CPU), in the order given, preprocessed as `seer data pack`
    then the eval loader would: each file is decoded by Pillow to validate it and, unless it is already a plain
    JPEG, re-encoded at `jpeg_quality` (pack's default) exactly as pack stores it; DALI then decodes, resizes
    and normalizes with the eval graph's ops. A file Pillow cannot decode is a ValueError naming it."""
    from dataloading.pack import _prepare_file

    _check_channels(channels, mean, std)
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=None, seed=0, prefetch_queue_depth=1)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        pipe.set_outputs(_normalize(fn.resize(_decode(encoded, channels, "cpu"), size=[size, size]), mean, std))
    pipe.build()
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            data, reason = _prepare_file(str(path), jpeg_quality, None)[:2]  # (JPEG bytes, skip reason, ...)
            if data is None:
                raise ValueError(f"{path} is not a usable image file: {reason.replace('_', ' ')}")
            batch.append(np.frombuffer(data, dtype=np.uint8))
        pipe.feed_input("encoded", batch)
        (images,) = pipe.run()
        yield torch.from_numpy(np.array(images.as_tensor()))
