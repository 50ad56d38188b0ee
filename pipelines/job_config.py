"""Strict job files shared by every job (training, preprocessing, batch, evaluation): a dataclass of defaults <- the
YAML file <- `data` <- `--set dotted.key=value` overrides (values parsed as YAML). An unknown key or a value of the
wrong type is a ConfigError naming the key and listing the valid ones."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from coltran.configs import ConfigError

T = TypeVar("T")


def load_strict(defaults: T, path: str | Path | None = None, data: dict[str, Any] | None = None,
                overrides: list[str] | None = None) -> T:
    """`defaults` (a dataclass instance) <- the YAML at `path` <- `data` <- `overrides`; not validated here."""
    merged = {**(read_job_file(path) if path is not None else {}), **(data or {})}
    cfg = merge(defaults, merged, "")
    for key, value in parse_overrides(overrides or []).items():
        cfg = merge(cfg, _nested(key, value), "")
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form dotted.key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (MLflow params)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_job_file(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"job file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"job file {path} is not valid YAML: {err}") from None
    if data is None:  # an empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"job file {path} must hold a mapping, got {type(data).__name__}")
    return data


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def merge(base: Any, data: Any, where: str) -> Any:
    """A copy of dataclass `base` with `data` (a nested dict) laid over it, every key and type checked."""
    name = where or "the job file"
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(base))
    valid = [f.name for f in dataclasses.fields(base)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {name}; valid keys: {valid}")
    values = {}
    for key in valid:
        current = getattr(base, key)
        path = f"{where}.{key}" if where else key
        values[key] = _field_value(hints[key], data[key], current, path) if key in data else current
    return type(base)(**values)


def _field_value(hint: Any, value: Any, current: Any, path: str) -> Any:
    if dataclasses.is_dataclass(current):
        return merge(current, value, path)
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path} must not be null")
    kind = next(a for a in args if a is not type(None)) if optional else hint
    if typing.get_origin(kind) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return {**current, **value}
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `3e-4` as a string; YAML 1.2 says it is a number
            value = _float_text(value, path)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{path} must be a string, got {value!r}")
    return value


def _float_text(text: str, path: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{path} must be a number, got {text!r}") from None
