import pytest

from engine.config import DEMO_CONFIG, Config, ConfigError, load_config


def test_demo_config_loads_and_lists_every_key():
    cfg = load_config()
    assert cfg.model.backbone == "regnety_tiny" and cfg.n_crops == 6
    assert cfg.data.crops[1].scale == (0.1, 0.4) and isinstance(cfg.data.crops[1].scale, tuple)
    import yaml

    listed = yaml.safe_load(DEMO_CONFIG.read_text())
    for section, values in Config().to_dict().items():
        assert set(listed[section]) == set(values), f"demo.yaml section {section} does not list every key"


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
        (["data.channels=3"], "data.mean and data.std need one value per channel"),
        (["train.precision=fp8"], "train.precision must be fp32, bf16 or fp16"),
        (["train.precision=fp16", "train.zero_stage=2"], "train.precision=fp16 needs train.zero_stage=0"),
        (["data.output_dtype=bfloat16"], "data.output_dtype=bfloat16 needs train.precision=bf16 or fp16"),
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


def test_shipped_configs_load():
    for path in DEMO_CONFIG.parent.glob("*.yaml"):
        cfg = load_config(path)
        assert cfg.n_crops >= 2, path
    seer = load_config(DEMO_CONFIG.parent / "seer_regnety_256gf.yaml")
    assert seer.model.backbone == "regnety_256gf" and seer.model.num_prototypes == 16000 and seer.n_crops == 6
