"""Typed run configuration: the defaults below, then a YAML delta file, then `section.key=value` overrides.

The defaults are SEER's recipe (RegNetY-256GF, arXiv 2103.01988; ../shared/SEER_RECIPE.md), every key with its unit.
A config file lists only what it changes (engine/configs/: `demo` for Fashion-MNIST on a CPU, `seer_regnety_256gf`
for a real data set); `--config NAME` finds those packaged files by name. Loading checks names and types strictly,
so a typo fails at start-up, not hours into a run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dataloading.config import DataConfig, check_data_config

CONFIGS = Path(__file__).parent / "configs"  # packaged delta files, found by name (`--config demo`)


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


@dataclass
class ModelConfig:
    backbone: str = "regnety_256gf"  # preset of engine.models.backbone.PRESETS or a timm RegNet name
    head_hidden_dims: list[int] = field(default_factory=lambda: [8192, 8192])  # SEER: feat -> 8192 -> 8192 -> 256
    head_batch_norm: bool = False  # SEER's head has no BN; SwAV RN50's has
    embedding_dim: int = 256
    num_prototypes: int | list[int] = 16000  # K; a list gives several prototype heads (VISSL: [3000, 3000, 3000])
    # NHWC activations: faster convolutions on CPU and on tensor cores; not applicable under ZeRO >= 1 (SEER's ZeRO-2)
    channels_last: bool = False
    init_weights: str = ""  # backbone weights to start from: timm-format .safetensors or backbone_*.pt; "" = random
    sync_bn_group_size: int = 64  # ranks sharing BatchNorm batch statistics (SEER: 64); 1 = per rank; capped at world
    activation_checkpointing: str = "block"  # none | block | stage: trunk modules that keep only their input


@dataclass
class SwAVConfig:
    temperature: float = 0.1
    epsilon: float = 0.05  # Sinkhorn entropy regularisation (SEER-10B: 0.03)
    sinkhorn_iterations: int = 10  # SwAV: 3
    crops_for_assign: list[int] = field(default_factory=lambda: [0, 1])  # indices in crop-major order
    freeze_prototypes_steps: int = 313  # prototypes get no update for this many first steps (SwAV: 1 epoch at 4096)
    # Past embeddings of the assigned crops that join each Sinkhorn batch, in total over ranks (each rank keeps
    # queue_length / world size); needed when the global assigned rows per step are fewer than the prototypes
    # (SwAV at batch 256: 3,840 with 3,000 prototypes). 0 = no queue.
    queue_length: int = 0
    queue_start_step: int = 0  # the queue fills from this step on and joins Sinkhorn once full (SwAV: epoch 15)
    backend: str = "auto"  # kernels backend: auto | torch | triton


@dataclass
class OptimConfig:
    name: str = "lars"  # lars (SGD + LARS, as SEER) | sgd (momentum SGD)
    lr: float = 0.3  # peak learning rate per 256 images of global batch
    final_lr_fraction: float = 0.001  # cosine decays to lr * this
    warmup_steps: int = 8000  # steps of linear warm-up from 0 to the peak
    momentum: float = 0.9
    weight_decay: float = 1e-5  # on every parameter, biases and normalisation parameters too (SEER)
    trust_coefficient: float = 0.001  # LARS eta
    # Biases and normalisation parameters without LARS or weight decay, at the plain lr (SimCLR/BYOL's habit; SwAV and
    # SEER apply LARC and weight decay to every parameter).
    exclude_bias_and_norm: bool = False
    gradient_clipping: float = 0.0  # global gradient-norm clip, 0 = off (SwAV/SEER: off; DeepSpeed's own default is 1)


@dataclass
class TrainConfig:
    steps: int = 122000  # SEER: one pass over 1B images at a global batch of 8,192
    batch_size: int = 16  # images per rank per step, each with every crop (SEER: 16 x 512 V100)
    precision: str = "bf16"  # fp32 | bf16 | fp16: autocast, fp32 weights (SEER's AMP); fp16 (GPU) with loss scaling
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    output_dir: str = "runs/pretrain"
    log_every: int = 50  # steps between metric records
    checkpoint_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # complete checkpoints kept; older ones are deleted once a newer one is complete
    resume: str = "auto"  # auto: continue from the newest complete checkpoint in output_dir if any | never | must
    seed: int = 0
    progress: bool = True  # progress bar on rank 0


@dataclass
class EvalConfig:
    train_shards: str = ""  # labelled shards the kNN memory bank is built from
    test_shards: str = ""  # labelled shards that are classified
    image_size: int = 224  # px; eval images are resized to this square
    knn_k: int = 20
    knn_k_large: int = 200  # a second kNN with this many neighbours (SwAV/DINO report k=20 and 200); 0 = off
    knn_temperature: float = 0.07
    feature_cache: bool = True  # keep extracted features in feature_cache/ beside the weights file
    batch_size: int = 256  # images per forward pass


@dataclass
class MonitorConfig:
    """Training monitors, evaluated at each metrics record (every train.log_every steps; engine/training/monitor.py)."""

    # A logged window counts as collapsed when its loss is within collapse_loss_band of ln K (|loss / ln K - 1| <=
    # band: the loss of uniform predictions, where a collapsed run sits), or when the histogram of its assigned
    # crops' nearest prototypes has an entropy below collapse_min_entropy * ln(min(K, assignments in the window)):
    # most crops share a few prototypes. Windows before collapse_check_from_step do not count: a healthy run starts
    # with its loss near ln K (the demo: ~1.0 ln K at step 100, 0.89-0.93 ln K at step 200). Measured entropies
    # (fraction of ln K): demo at init 0.55, step 500 0.74, step 1000 0.87; a tiny test run collapsed by
    # swav.epsilon=100, 0.05-0.22.
    collapse_check_from_step: int = 200  # steps
    collapse_loss_band: float = 0.05  # fraction of ln K
    collapse_min_entropy: float = 0.3  # fraction of ln(min(K, assignments per window))
    collapse_patience: int = 5  # consecutive collapsed windows before the warning
    # Online kNN top-1 (k, temperature, image size and batch size of the eval section), at the first metrics record
    # at or after every knn_every steps, on every rank; the model goes back to train mode untouched.
    knn_every: int = 0  # steps (0 = off)
    knn_train_shards: str = ""  # labelled shards of the kNN memory bank; "" = eval.train_shards
    knn_test_shards: str = ""  # labelled held-out shards that are classified; "" = eval.test_shards
    knn_max_samples: int = 5000  # per split: the first ~this many samples of the shards are used (0 = all)


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning of backbone + linear classifier (`seer finetune`); data.channels/mean/std/num_threads,
    model.backbone (for --weights random) and model.channels_last come from their own sections."""

    train_shards: str = ""  # labelled shards trained on
    test_shards: str = ""  # labelled shards top-1 is reported on (resized to image_size, no crop)
    image_size: int = 224  # px; train crops and test images are this square
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction (aspect 3/4-4/3), then flip
    steps: int = 1000
    batch_size: int = 64  # images per rank per step
    lr: float = 0.1  # peak, per 256 images of global batch; linear warm-up then cosine to 0
    momentum: float = 0.9
    weight_decay: float = 1e-4  # not applied to biases and normalisation parameters
    warmup_steps: int = 100
    label_smoothing: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 (autocast with fp32 master weights)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    output_dir: str = "runs/finetune"
    log_every: int = 10  # steps between metric records
    seed: int = 0
    progress: bool = True  # progress bar on rank 0


def prototype_heads(num_prototypes: int | list[int]) -> list[int]:
    """K of every prototype head from model.num_prototypes (one K, or a list of them)."""
    return [num_prototypes] if isinstance(num_prototypes, int) else list(num_prototypes)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def n_crops(self) -> int:
        return sum(group.count for group in self.data.crops)

    @property
    def prototype_heads(self) -> list[int]:
        """K of every prototype head."""
        return prototype_heads(self.model.num_prototypes)

    def to_dict(self) -> dict:
        """Plain lists and scalars (tuples become lists), ready for YAML or JSON."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def config_path(name_or_path: str | Path) -> Path:
    """A config file: a path, or the name of a packaged delta file (`demo` -> engine/configs/demo.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIGS / f"{name_or_path}.yaml"
    if path.suffix == "" and path.name == str(name_or_path) and packaged.is_file():
        return packaged
    names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path} (packaged configs, by name: {names})")


def read_delta(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """The keys a config file sets, over those of the file its `base:` names (a path or packaged name, relative
    paths from the file's folder), if any."""
    path = config_path(path)
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} names itself as a base, through {' -> '.join(map(str, seen))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base must name one config file, got {base!r}")
    relative = path.parent / base
    return _merged(read_delta(relative if relative.is_file() else base, (*seen, path.resolve())), raw)


def _merged(base: dict, delta: dict) -> dict:
    """`delta` over `base`, section by section (a list or scalar in `delta` replaces the base's)."""
    out = dict(base)
    for key, value in delta.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The defaults (SEER's recipe), then the YAML delta at `path` (a file or a packaged name; None: none), then
    `section.key=value` overrides."""
    raw = read_delta(path) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    cfg = _build(Config, raw, prefix="")
    _check(cfg)
    return cfg


def sinkhorn_rows(cfg: Config, world_size: int) -> int:
    """Samples Sinkhorn spreads over the prototypes per step: every assigned crop's rows over all ranks, and the
    queue's. Each assigned crop is balanced on its own, so a problem has half of these rows with SwAV's two assigned
    crops; counting both is the threshold SEER's recipe evidences (8,192 rows per crop against 16,000 prototypes
    trained well)."""
    return len(cfg.swav.crops_for_assign) * (world_size * cfg.train.batch_size + cfg.swav.queue_length)


def small_batch_advice(cfg: Config, world_size: int) -> str | None:
    """Why the equal-partition constraint is weak at this world size, and the queue length of SwAV's remedy; None
    when the Sinkhorn batch covers the prototypes."""
    rows, k = sinkhorn_rows(cfg, world_size), max(cfg.prototype_heads)
    if rows >= k:
        return None
    assign = len(cfg.swav.crops_for_assign)
    needed = -(-k // assign) - world_size * cfg.train.batch_size  # per assigned crop, in total over ranks
    needed = -(-needed // world_size) * world_size  # each rank keeps an equal share
    return (f"Sinkhorn spreads {rows:,} samples per step ({assign} assigned crops x ({world_size} rank(s) x "
            f"train.batch_size {cfg.train.batch_size} + swav.queue_length {cfg.swav.queue_length:,})) over {k:,} "
            f"prototypes: fewer samples than prototypes weaken the equal partition; SwAV's remedy is "
            f"swav.queue_length={needed} or more (a multiple of {world_size}), or use fewer model.num_prototypes "
            f"(on the demo at batch 32 the queue did not help: README, 'The SwAV objective')")


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {name!r} is not a section")
    node[leaf] = value


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; known keys here: {', '.join(fields)}")
    missing = [f.name for f in fields.values()
               if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config key {prefix + missing[0]!r} is required")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], raw[name], prefix + name) for name in raw}
    return cls(**values)


def _coerce(kind, value, key: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        if origin is tuple and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"config key {key!r} expects {len(args)} values, got {len(value)}")
        item_kinds = [args[0]] * len(value) if origin is list or args[-1] is Ellipsis else list(args)
        items = [_coerce(k, v, f"{key}[{i}]") for i, (k, v) in enumerate(zip(item_kinds, value))]
        return origin(items)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        for alternative in alternatives[:-1]:
            try:
                return _coerce(alternative, value, key)
            except ConfigError:
                pass
        return _coerce(alternatives[-1], value, key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads exponents without a dot (1e-6) as strings
            return float(value)
        except ValueError:
            pass
    if kind in (int, float, str, bool) and (type(value) is not kind):
        raise ConfigError(f"config key {key!r} expects {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check(cfg: Config) -> None:
    """Cross-field checks, each saying which key to change."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    data, model, swav, optim, train = cfg.data, cfg.model, cfg.swav, cfg.optim, cfg.train
    try:
        check_data_config(data)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    need(data.output_dtype == "float32" or train.precision != "fp32",
         f"data.output_dtype={data.output_dtype} needs train.precision=bf16 or fp16 (fp32 layers cannot take it)")
    need(cfg.n_crops >= 2, "data.crops must define at least 2 crops in total (each crop predicts another's codes)")
    need(len(swav.crops_for_assign) > 0 and len(set(swav.crops_for_assign)) == len(swav.crops_for_assign),
         f"swav.crops_for_assign must be distinct crop indices, got {swav.crops_for_assign}")
    need(all(0 <= c < cfg.n_crops for c in swav.crops_for_assign),
         f"swav.crops_for_assign {swav.crops_for_assign} must index the {cfg.n_crops} crops of data.crops")
    need(swav.temperature > 0 and swav.epsilon > 0 and swav.sinkhorn_iterations >= 1,
         "swav.temperature and swav.epsilon must be > 0 and swav.sinkhorn_iterations >= 1")
    need(swav.backend in ("auto", "torch", "triton"), f"swav.backend must be auto, torch or triton, got {swav.backend!r}")
    need(swav.freeze_prototypes_steps >= 0, "swav.freeze_prototypes_steps must be >= 0")
    need(model.sync_bn_group_size >= 1, f"model.sync_bn_group_size must be >= 1, got {model.sync_bn_group_size}")
    need(model.activation_checkpointing in ("none", "block", "stage"),
         f"model.activation_checkpointing must be none, block or stage, got {model.activation_checkpointing!r}")
    need(len(cfg.prototype_heads) >= 1 and all(k >= 2 for k in cfg.prototype_heads) and model.embedding_dim > 0,
         f"model.num_prototypes must be >= 2 (or a list of such, one per head) and model.embedding_dim > 0, got "
         f"{model.num_prototypes} and {model.embedding_dim}")
    need(swav.queue_length >= 0 and swav.queue_start_step >= 0,
         "swav.queue_length (0 = no queue) and swav.queue_start_step must be >= 0")
    need(optim.name in ("lars", "sgd"), f"optim.name must be lars or sgd, got {optim.name!r}")
    need(optim.lr > 0 and 0 <= optim.final_lr_fraction <= 1, "optim.lr must be > 0 and optim.final_lr_fraction in [0, 1]")
    need(optim.warmup_steps >= 0 and optim.weight_decay >= 0 and optim.gradient_clipping >= 0,
         "optim.warmup_steps, optim.weight_decay and optim.gradient_clipping must be >= 0")
    need(train.steps > 0 and train.batch_size > 0, "train.steps and train.batch_size must be > 0")
    need(train.precision in ("fp32", "bf16", "fp16"),
         f"train.precision must be fp32, bf16 or fp16, got {train.precision!r}")
    need(train.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3, got {train.zero_stage}")
    # DeepSpeed's per-group GradScaler steps would let ranks skip steps on their own partition's overflow.
    need(not (train.precision == "fp16" and train.zero_stage > 0),
         "train.precision=fp16 needs train.zero_stage=0 (its loss scaling is not synchronized over ZeRO partitions); "
         "use bf16 with ZeRO")
    need(train.log_every > 0 and train.checkpoint_every > 0, "train.log_every and train.checkpoint_every must be > 0")
    need(train.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {train.keep_checkpoints}")
    need(train.resume in ("auto", "never", "must"), f"train.resume must be auto, never or must, got {train.resume!r}")
    need(cfg.eval.knn_k > 0 and cfg.eval.knn_k_large >= 0,
         f"eval.knn_k must be > 0 and eval.knn_k_large >= 0 (0 = off), got {cfg.eval.knn_k} and {cfg.eval.knn_k_large}")
    need(math.isfinite(optim.lr), "optim.lr must be finite")
    mon = cfg.monitor
    need(mon.collapse_check_from_step >= 0 and mon.collapse_patience >= 1,
         "monitor.collapse_check_from_step must be >= 0 and monitor.collapse_patience >= 1")
    need(mon.collapse_loss_band >= 0 and 0 <= mon.collapse_min_entropy <= 1,
         "monitor.collapse_loss_band must be >= 0 and monitor.collapse_min_entropy in [0, 1]")
    need(mon.knn_every >= 0 and mon.knn_max_samples >= 0,
         "monitor.knn_every (0 = off) and monitor.knn_max_samples (0 = all) must be >= 0")
    need(mon.knn_every == 0 or ((mon.knn_train_shards or cfg.eval.train_shards)
                                and (mon.knn_test_shards or cfg.eval.test_shards)),
         "monitor.knn_every > 0 needs labelled shards: set monitor.knn_train_shards and monitor.knn_test_shards "
         "(or eval.train_shards and eval.test_shards)")
    ft = cfg.finetune
    need(ft.steps > 0 and ft.batch_size > 0 and ft.image_size > 0,
         "finetune.steps, finetune.batch_size and finetune.image_size must be > 0")
    need(0 < ft.crop_scale[0] <= ft.crop_scale[1] <= 1,
         f"finetune.crop_scale must satisfy 0 < low <= high <= 1, got {list(ft.crop_scale)}")
    need(0 < ft.lr < math.inf and 0 <= ft.momentum < 1, "finetune.lr must be > 0 and finetune.momentum in [0, 1)")
    need(ft.warmup_steps >= 0 and ft.weight_decay >= 0 and ft.log_every > 0,
         "finetune.warmup_steps and finetune.weight_decay must be >= 0, finetune.log_every > 0")
    need(0 <= ft.label_smoothing < 1, f"finetune.label_smoothing must be in [0, 1), got {ft.label_smoothing}")
    need(ft.precision in ("fp32", "bf16"), f"finetune.precision must be fp32 or bf16, got {ft.precision!r}")
    need(ft.zero_stage in (0, 1, 2, 3), f"finetune.zero_stage must be 0, 1, 2 or 3, got {ft.zero_stage}")
