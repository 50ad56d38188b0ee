"""Typed model configs for the three ColTran stages, their presets, and strict YAML/dict I/O.

Field names follow the official `configs/*.py` (flattened: `model.encoder.*` and `model.decoder.*` live
side by side). Every switch of the official config that changes the network is a field here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

STAGE_NAMES = ("colorizer", "color_upsampler", "spatial_upsampler")
PRESET_SIZES = ("full", "mid", "test")


class ConfigError(ValueError):
    """A config file or override names an unknown key or carries a value of the wrong kind."""


@dataclass
class ColorizerConfig:
    """ColTran core: grayscale encoder, auxiliary parallel head, outer and inner decoders (64x64, 512 colours)."""

    stage: ClassVar[str] = "colorizer"

    resolution: tuple[int, int] = (64, 64)
    hidden_size: int = 512
    ff_size: int = 512
    num_heads: int = 4
    num_encoder_layers: int = 4
    num_outer_layers: int = 2
    num_inner_layers: int = 2
    dropout: float = 0.0
    # 'encoder_decoder' trains the auxiliary parallel head too; 'decoder' has no auxiliary head.
    model_stage: str = "encoder_decoder"
    skip: bool = True
    cond_ln: bool = True
    cond_ln_act: str = "identity"
    cond_ln_sp_ave: str = "learnable"  # learnable | mean
    cond_ln_seq: str = "sc"  # sc: spatial average then dense | cs: dense then spatial average
    cond_att_act: str = "identity"
    cond_att_q: bool = True
    cond_att_k: bool = True
    cond_att_v: bool = True
    cond_att_scale: bool = True
    cond_mlp: str = "affine"  # affine | shift
    cond_mlp_act: str = "identity"
    loss_factor: float = 0.99
    encoder_loss_factor: float = 0.01

    def validate(self) -> None:
        _check_common(self)
        _check_choice("model_stage", self.model_stage, ("encoder_decoder", "decoder"))
        _check_choice("cond_ln_sp_ave", self.cond_ln_sp_ave, ("learnable", "mean"))
        _check_choice("cond_ln_seq", self.cond_ln_seq, ("sc", "cs"))
        _check_choice("cond_mlp", self.cond_mlp, ("affine", "shift"))
        for name in ("cond_ln_act", "cond_att_act", "cond_mlp_act"):
            _check_choice(name, getattr(self, name), ACTIVATIONS)


@dataclass
class ColorUpsamplerConfig:
    """Colour upsampler: 3-bit 64x64 colours plus gray -> 8-bit 64x64 colours, one channel per pass."""

    stage: ClassVar[str] = "color_upsampler"

    resolution: tuple[int, int] = (64, 64)
    hidden_size: int = 512
    ff_size: int = 512
    num_heads: int = 4
    num_encoder_layers: int = 4
    dropout: float = 0.0

    def validate(self) -> None:
        _check_common(self)


@dataclass
class SpatialUpsamplerConfig:
    """Spatial upsampler: blocky 64->256 colours plus 256x256 gray -> 8-bit 256x256 colours, per channel."""

    stage: ClassVar[str] = "spatial_upsampler"

    resolution: tuple[int, int] = (256, 256)
    hidden_size: int = 512
    ff_size: int = 512
    num_heads: int = 4
    num_encoder_layers: int = 3
    dropout: float = 0.0

    def validate(self) -> None:
        _check_common(self)


ModelConfig = ColorizerConfig | ColorUpsamplerConfig | SpatialUpsamplerConfig
CONFIG_CLASSES: dict[str, type] = {
    "colorizer": ColorizerConfig,
    "color_upsampler": ColorUpsamplerConfig,
    "spatial_upsampler": SpatialUpsamplerConfig,
}
ACTIVATIONS = ("identity", "relu", "sigmoid", "tanh")

_MID = {"hidden_size": 128, "ff_size": 128, "num_heads": 4}
_TEST = {"hidden_size": 32, "ff_size": 32, "num_heads": 1}
_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("colorizer", "full"): {},
    ("colorizer", "mid"): {**_MID, "num_encoder_layers": 2, "num_outer_layers": 1, "num_inner_layers": 1},
    ("colorizer", "test"): {**_TEST, "num_encoder_layers": 1, "num_outer_layers": 1, "num_inner_layers": 1},
    ("color_upsampler", "full"): {},
    ("color_upsampler", "mid"): {**_MID, "num_encoder_layers": 2},
    ("color_upsampler", "test"): {**_TEST, "num_encoder_layers": 1},
    ("spatial_upsampler", "full"): {},
    ("spatial_upsampler", "mid"): {**_MID, "num_encoder_layers": 2},
    ("spatial_upsampler", "test"): {**_TEST, "num_encoder_layers": 1},
}


def preset(stage: str, size: str) -> ModelConfig:
    """The config of `stage` (colorizer | color_upsampler | spatial_upsampler) at `size` (full | mid | test).

    full = the paper's configs/, test = the official test_configs/, mid = full with width 128, 4 heads and
    fewer layers (colorizer 2 encoder + 1 outer + 1 inner, upsamplers 2) for CPU-sized runs.
    """
    _check_choice("stage", stage, STAGE_NAMES)
    _check_choice("size", size, PRESET_SIZES)
    cfg = CONFIG_CLASSES[stage](**_PRESETS[(stage, size)])
    cfg.validate()
    return cfg


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Plain dict (YAML/JSON safe) including the stage name."""
    out: dict[str, Any] = {"stage": cfg.stage}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(data: dict[str, Any], stage: str | None = None, base: ModelConfig | None = None) -> ModelConfig:
    """Strictly rebuild a config; unknown keys or wrong types raise ConfigError listing the valid keys.

    `base` (e.g. a preset) supplies the values that `data` leaves out.
    """
    data = dict(data)
    named = data.pop("stage", None)
    if named is not None and stage is not None and named != stage:
        raise ConfigError(f"config is for stage {named!r}, expected {stage!r}")
    stage = named or stage or (base.stage if base is not None else None)
    if stage is None:
        raise ConfigError("config has no 'stage'; expected one of " + ", ".join(STAGE_NAMES))
    _check_choice("stage", stage, STAGE_NAMES)
    if "preset" in data:
        base = preset(stage, data.pop("preset"))
    cls = CONFIG_CLASSES[stage]
    if base is not None and base.stage != stage:
        raise ConfigError(f"base config is for stage {base.stage!r}, not {stage!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {stage} config key(s) {unknown}; valid keys: {sorted(fields)}")
    values = {name: getattr(base, name) for name in fields} if base is not None else {}
    for name, value in data.items():
        values[name] = _coerce(stage, name, value, getattr(cls(), name))
    cfg = cls(**values)
    cfg.validate()
    return cfg


def apply_overrides(cfg: ModelConfig, overrides: list[str] | dict[str, Any]) -> ModelConfig:
    """`key=value` strings (values parsed as YAML) or a dict, applied on top of `cfg`."""
    if isinstance(overrides, dict):
        pairs = overrides
    else:
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            pairs[key.strip()] = yaml.safe_load(value)
    return config_from_dict(pairs, stage=cfg.stage, base=cfg)


def save_config(cfg: ModelConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def load_config(path: str | Path, stage: str | None = None) -> ModelConfig:
    """Load a YAML model config. A file may say `preset: mid` and override single fields."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return config_from_dict(data, stage=stage)


def resolve_config(spec: str, stage: str) -> ModelConfig:
    """A preset size name (full | mid | test) or the path of a YAML config file."""
    if spec in PRESET_SIZES:
        return preset(stage, spec)
    return load_config(spec, stage=stage)


def _coerce(stage: str, name: str, value: Any, default: Any) -> Any:
    if isinstance(default, tuple):
        if (not isinstance(value, list | tuple) or len(value) != len(default)
                or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
            raise ConfigError(f"{stage}.{name} must be a list of {len(default)} ints, got {value!r}")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{stage}.{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{stage}.{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{stage}.{name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{stage}.{name} must be a string, got {value!r}")
    return value


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_common(cfg: Any) -> None:
    for name in ("hidden_size", "ff_size", "num_heads"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(cfg, name)}")
    for name in [f.name for f in dataclasses.fields(cfg) if f.name.endswith("_layers")]:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    if any(r <= 0 for r in cfg.resolution):
        raise ConfigError(f"resolution must be positive, got {cfg.resolution}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")


__all__ = [
    "ColorizerConfig",
    "ColorUpsamplerConfig",
    "SpatialUpsamplerConfig",
    "ModelConfig",
    "ConfigError",
    "STAGE_NAMES",
    "PRESET_SIZES",
    "preset",
    "config_to_dict",
    "config_from_dict",
    "apply_overrides",
    "save_config",
    "load_config",
    "resolve_config",
]
