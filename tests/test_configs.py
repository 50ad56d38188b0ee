"""Model configs: preset values (coltran-reference.md section 5 and issue 3's "mid"), strict YAML and
key=value I/O, and errors that name the bad key or value."""

from __future__ import annotations

import dataclasses

import pytest

from coltran.configs import (
    PRESET_SIZES,
    STAGE_NAMES,
    ColorizerConfig,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    preset,
    resolve_config,
    save_config,
)

FULL = {"hidden_size": 512, "ff_size": 512, "num_heads": 4}
MID = {"hidden_size": 128, "ff_size": 128, "num_heads": 4}
TEST = {"hidden_size": 32, "ff_size": 32, "num_heads": 1}
LAYERS = {
    "colorizer": {"full": (4, 2, 2), "mid": (2, 1, 1), "test": (1, 1, 1)},
    "color_upsampler": {"full": (4,), "mid": (2,), "test": (1,)},
    "spatial_upsampler": {"full": (3,), "mid": (2,), "test": (1,)},
}
RESOLUTION = {"colorizer": (64, 64), "color_upsampler": (64, 64), "spatial_upsampler": (256, 256)}


@pytest.mark.parametrize("stage", STAGE_NAMES)
@pytest.mark.parametrize("size", PRESET_SIZES)
def test_preset_values(stage, size):
    cfg = preset(stage, size)
    assert cfg.stage == stage and cfg.resolution == RESOLUTION[stage] and cfg.dropout == 0.0
    widths = {"full": FULL, "mid": MID, "test": TEST}[size]
    assert {k: getattr(cfg, k) for k in widths} == widths
    names = ("num_encoder_layers", "num_outer_layers", "num_inner_layers")[: len(LAYERS[stage][size])]
    assert tuple(getattr(cfg, n) for n in names) == LAYERS[stage][size]


def test_colorizer_shipped_switches():
    cfg = preset("colorizer", "full")
    assert (cfg.model_stage, cfg.skip, cfg.cond_ln, cfg.cond_mlp) == ("encoder_decoder", True, True, "affine")
    assert cfg.cond_att_q and cfg.cond_att_k and cfg.cond_att_v and cfg.cond_att_scale
    assert (cfg.cond_ln_sp_ave, cfg.cond_ln_seq) == ("learnable", "sc")
    assert (cfg.loss_factor, cfg.encoder_loss_factor) == (0.99, 0.01)
    fields = {f.name for f in dataclasses.fields(ColorizerConfig)}
    assert {"cond_ln", "cond_att_q", "cond_att_k", "cond_att_v", "cond_att_scale", "cond_mlp", "skip",
            "model_stage"} <= fields


def test_unknown_preset_names():
    with pytest.raises(ConfigError, match=r"size must be one of \['full', 'mid', 'test'\], got 'huge'"):
        preset("colorizer", "huge")
    with pytest.raises(ConfigError, match="stage must be one of"):
        preset("upsampler", "test")


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_yaml_round_trip(stage, tmp_path):
    cfg = apply_overrides(preset(stage, "mid"), ["resolution=[16, 24]", "dropout=0.1"])
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg and type(back) is type(cfg) and back.resolution == (16, 24)
    assert config_to_dict(back)["stage"] == stage and config_to_dict(back)["resolution"] == [16, 24]


def test_yaml_preset_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: colorizer\npreset: mid\nnum_outer_layers: 3\ncond_mlp: shift\n")
    cfg = load_config(path)
    assert cfg == dataclasses.replace(preset("colorizer", "mid"), num_outer_layers=3, cond_mlp="shift")
    assert resolve_config(str(path), "colorizer") == cfg
    assert resolve_config("test", "color_upsampler") == preset("color_upsampler", "test")
    with pytest.raises(ConfigError, match="stage 'colorizer', expected 'spatial_upsampler'"):
        resolve_config(str(path), "spatial_upsampler")


def test_apply_overrides():
    base = preset("colorizer", "test")
    cfg = apply_overrides(base, ["num_heads=2", "skip=false", "loss_factor=0.5", "resolution=[8, 8]",
                                 "cond_ln_act = tanh"])
    assert (cfg.num_heads, cfg.skip, cfg.loss_factor, cfg.resolution, cfg.cond_ln_act) == (
        2, False, 0.5, (8, 8), "tanh")
    assert base.num_heads == 1  # the original is untouched
    assert apply_overrides(base, {"ff_size": 64}).ff_size == 64
    assert apply_overrides(base, ["loss_factor=1"]).loss_factor == 1.0
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides(base, ["num_heads"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        apply_overrides(preset("color_upsampler", "test"), ["num_layers=3"])
    msg = str(err.value)
    assert "num_layers" in msg and "valid keys" in msg
    assert all(name in msg for name in ("hidden_size", "num_encoder_layers", "resolution", "dropout"))
    assert "num_outer_layers" not in msg  # only this stage's keys


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "big"), ("hidden_size", 32.0), ("hidden_size", True), ("skip", "yes"), ("skip", 1),
    ("loss_factor", "high"), ("loss_factor", True), ("cond_mlp", 3), ("resolution", [8]),
    ("resolution", "64"), ("resolution", [8.5, 8]), ("resolution", [True, 8]),
])
def test_wrong_types_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({key: value}, stage="colorizer")


@pytest.mark.parametrize("overrides, match", [
    ({"hidden_size": 30, "num_heads": 4}, "hidden_size 30 is not divisible by num_heads 4"),
    ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
    ({"num_inner_layers": -1}, "num_inner_layers must be >= 0"),
    ({"resolution": [0, 8]}, "resolution must be positive"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"cond_mlp": "mul"}, r"cond_mlp must be one of \['affine', 'shift'\], got 'mul'"),
    ({"model_stage": "encoder"}, "model_stage must be one of"),
    ({"cond_att_act": "gelu"}, "cond_att_act must be one of"),
])
def test_invalid_values_rejected(overrides, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(preset("colorizer", "test"), overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("stage: colorizer\nhidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "nostage.yaml").write_text("hidden_size: 32\n")
    with pytest.raises(ConfigError, match="no 'stage'"):
        load_config(tmp_path / "nostage.yaml")
    assert load_config(tmp_path / "nostage.yaml", stage="color_upsampler").hidden_size == 32
