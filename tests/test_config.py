import dataclasses

import pytest
import yaml

from engine.config import CONFIGS, Config, ConfigError, load_config, sinkhorn_rows, small_batch_advice


def test_defaults_are_seers_recipe():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.model.backbone, cfg.model.head_hidden_dims, cfg.model.embedding_dim, cfg.model.num_prototypes) == (
        "regnety_256gf", [8192, 8192], 256, 16000)
    assert [(g.size, g.count, g.scale) for g in cfg.data.crops] == [(224, 2, (0.14, 1.0)), (96, 4, (0.05, 0.14))]
    assert (cfg.swav.temperature, cfg.swav.epsilon, cfg.swav.sinkhorn_iterations) == (0.1, 0.05, 10)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == ("lars", 0.3, 1e-5, 8000)
    assert (cfg.train.batch_size, cfg.train.precision, cfg.train.zero_stage) == (16, "bf16", 2)
    assert (cfg.model.sync_bn_group_size, cfg.model.activation_checkpointing) == (64, "block")


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_configs_are_true_deltas(path):
    """Every key a packaged file sets differs from the default: the file says what the experiment changes."""
    delta = yaml.safe_load(path.read_text())
    loaded = load_config(path.stem)  # found by name, as `--config demo`
    assert loaded == load_config(path)
    base = delta.pop("base", None)
    defaults = (load_config(base) if base else Config()).to_dict()
    for key, _ in _leaves(delta):
        section, *rest = key.split(".")
        default, value = defaults[section], loaded.to_dict()[section]
        for name in rest:
            default, value = default[name], value[name]
        assert value != default, f"{path.name}: {key} restates the default {default!r}"


def test_demo_config():
    cfg = load_config("demo")
    assert cfg.model.backbone == "regnety_tiny" and cfg.n_crops == 6 and cfg.data.channels == 1
    assert cfg.data.crops[1].scale == (0.1, 0.4) and isinstance(cfg.data.crops[1].scale, tuple)
    assert cfg.data.augment.brightness == 0.8 and cfg.data.augment.saturation == 0.0  # a section merges key by key
    seer = load_config("seer_regnety_256gf")
    assert dataclasses.replace(seer, data=Config().data, train=Config().train) == Config()
    assert seer.data.output_dtype == "bfloat16"


def test_overrides_win_and_are_typed():
    cfg = load_config(None, ["train.steps=7", "optim.lr=2", "data.crops=[{size: 8, count: 2, scale: [0.5, 1]}]",
                             "swav.crops_for_assign=[1]"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)
    assert cfg.n_crops == 2 and cfg.swav.crops_for_assign == [1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["nosection.x=1"], "unknown config key 'nosection'"),
        (["train.steps=abc"], "config key 'train.steps' expects int, got str"),
        (["train.progress=1"], "config key 'train.progress' expects bool"),
        (["data.crops[0]=1"], "unknown config key 'data.crops[0]'"),
        (["data.crops=[{size: 8, count: 2}]"], "data.crops[0]"),
        (["data.crops=[{size: 8, count: 2, scale: [0.5]}]"], "'data.crops[0].scale' expects 2 values"),
        (["train.zero_stage=4"], "train.zero_stage must be 0, 1, 2 or 3"),
        (["swav.crops_for_assign=[0, 6]"], "swav.crops_for_assign [0, 6] must index the 6 crops"),
        (["data.channels=1"], "data.mean and data.std need one value per channel"),
        (["data.channels=2"], "data.channels must be 1 or 3"),
        (["data.std=[0.2, 0, 0.2]"], "data.std values must be > 0"),
        (["data.crops=[{size: 8, count: 1, scale: [0.5, 1]}]"], "data.crops must define at least 2 crops"),
        (["train.precision=fp8"], "train.precision must be fp32, bf16 or fp16"),
        (["train.precision=fp16", "train.zero_stage=2"], "train.precision=fp16 needs train.zero_stage=0"),
        (["train.precision=fp32", "data.output_dtype=bfloat16"], "data.output_dtype=bfloat16 needs train.precision=bf16 or fp16"),
        (["data.augment.blur_p=2"], "data.augment.blur_p is a probability"),
        (["data.augment.hue=0.7"], "data.augment.hue is a fraction of the colour circle"),
        (["data.augment.contrast=-1"], "data.augment.contrast is a strength"),
        (["steps"], "override 'steps' must look like section.key=value"),
    ],
)
def test_bad_values_give_one_clear_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="config file not found: nope .packaged configs, by name: demo, demo_small_batch, seer_"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    partial = tmp_path / "partial.yaml"
    partial.write_text("train:\n  steps: 3\n")
    cfg = load_config(partial)
    assert cfg.train.steps == 3 and cfg.model.num_prototypes == 16000  # unspecified keys keep the SEER defaults


def test_resolved_config_round_trips_through_yaml(tmp_path):
    import yaml

    cfg = load_config(None, ["train.steps=11"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(saved) == cfg


def test_exponent_without_a_dot_is_a_float():
    assert load_config(None, ["optim.weight_decay=1e-3"]).optim.weight_decay == 0.001  # YAML 1.1 says: a string
    with pytest.raises(ConfigError, match="optim.weight_decay"):
        load_config(None, ["optim.weight_decay=small"])


def test_a_delta_can_build_on_another(tmp_path):
    one_node = load_config("seer_regnety_256gf_1node")
    assert one_node.data.train_shards == load_config("seer_regnety_256gf").data.train_shards  # from its base
    assert (one_node.train.batch_size, one_node.swav.queue_length) == (64, 7680)
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {steps: 5}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="names itself as a base"):
        load_config(tmp_path / "a.yaml")


def test_small_batch_guard():
    """SEER's 16,000 prototypes need SEER's batch: 8 ranks x 64 images are told the queue length that fixes it."""
    seer = load_config("seer_regnety_256gf", ["train.batch_size=64"])
    assert sinkhorn_rows(seer, 8) == 2 * 8 * 64 and sinkhorn_rows(seer, 512) == 2 * 512 * 64
    advice = small_batch_advice(seer, 8)
    assert "1,024 samples" in advice and "16,000 prototypes" in advice and "swav.queue_length=7488" in advice
    assert small_batch_advice(seer, 512) is None
    fixed = load_config("seer_regnety_256gf", ["train.batch_size=64", "swav.queue_length=7488"])
    assert sinkhorn_rows(fixed, 8) >= 16000 and small_batch_advice(fixed, 8) is None
    assert small_batch_advice(load_config("seer_regnety_256gf_1node"), 8) is None
    assert small_batch_advice(load_config("demo"), 1) is None  # 2 x 256 rows over 300 prototypes


def test_several_prototype_heads_and_the_queue_keys():
    cfg = load_config("demo", ["model.num_prototypes=[30, 40]", "swav.queue_length=64"])
    assert cfg.prototype_heads == [30, 40] and load_config("demo").prototype_heads == [300]
    with pytest.raises(ConfigError, match="model.num_prototypes must be >= 2"):
        load_config("demo", ["model.num_prototypes=[30, 1]"])
    with pytest.raises(ConfigError, match="swav.queue_length"):
        load_config("demo", ["swav.queue_length=-1"])
