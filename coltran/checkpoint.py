"""One stage's checkpoint: a directory that every front end rebuilds its model from, loudly checked.

Layout of `DIR/`:
  config.yaml          the stage's model config (the only place architecture flags live)
  model.safetensors    raw weights
  ema.safetensors      Polyak (EMA) weights, the ones evaluation and sampling use
  optimizer.pt         optimizer state (optional; lets training continue)
  trainer_state.pt     trainer extras such as data position and RNG state (optional)
  meta.json            format, stage, step, provenance, `untrained` flag
A directory is written beside its destination and renamed into place, so a reader never sees half of one.
The official code silently sampled from random weights when a checkpoint was missing; here a missing,
truncated or mismatched file is always an error.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from coltran import __version__
from coltran.configs import ConfigError, ModelConfig, config_to_dict, load_config, save_config
from coltran.models import build_model

FORMAT = "coltran-checkpoint"
FORMAT_VERSION = 1
WEIGHT_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, truncated, or does not match the model it should build."""


@dataclass
class Checkpoint:
    model: nn.Module
    config: ModelConfig
    step: int
    meta: dict
    weights: str
    ema_state: dict[str, torch.Tensor] | None = None
    optimizer_state: dict | None = None
    trainer_state: dict = field(default_factory=dict)


def save_checkpoint(directory: str | Path, model: nn.Module, *, ema_state: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None, step: int = 0,
                    trainer_state: dict | None = None, meta: dict | None = None) -> Path:
    """Write a checkpoint atomically to `directory` (replacing an older one there)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_config(model.config, tmp / "config.yaml")
        save_file(_contiguous(model.state_dict()), str(tmp / WEIGHT_FILES["model"]))
        if ema_state is not None:
            save_file(_contiguous(ema_state), str(tmp / WEIGHT_FILES["ema"]))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if trainer_state:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        info = {
            "format": FORMAT, "version": FORMAT_VERSION, "stage": model.config.stage, "step": int(step),
            "untrained": False, "coltran_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **(meta or {}),
        }
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str | Path, *, weights: str = "ema", device: str | torch.device = "cpu",
                    expected_config: ModelConfig | None = None, stage: str | None = None,
                    with_training_state: bool = False) -> Checkpoint:
    """Rebuild the model from `directory` with its `weights` ('ema' or 'model').

    Raises CheckpointError naming what is wrong: a missing file, a truncated tensor file, a config that differs
    from `expected_config`, a stage other than `stage`, or missing / unexpected / mis-shaped tensors.
    """
    directory = Path(directory)
    if weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    meta = _read_meta(directory)
    try:
        config = load_config(directory / "config.yaml")
    except ConfigError as err:
        raise CheckpointError(f"{directory}/config.yaml: {err}") from err
    if stage is not None and config.stage != stage:
        raise CheckpointError(f"{directory} holds a {config.stage} checkpoint, expected {stage}")
    if expected_config is not None:
        _check_same_config(directory, config, expected_config)
    model = build_model(config)
    state = _read_tensors(directory / WEIGHT_FILES[weights])
    if weights == "ema":  # the EMA file holds trainable parameters only; the rest comes from the raw weights,
        # never a trainable one: a gap in the EMA file is reported, not filled silently with raw weights
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        raw = _read_tensors(directory / WEIGHT_FILES["model"])
        state = {**{k: v for k, v in raw.items() if k not in trainable}, **state}
    check_state_dict(model, state, source=str(directory / WEIGHT_FILES[weights]))
    model.load_state_dict(state)
    model.to(device).eval()
    ckpt = Checkpoint(model=model, config=config, step=int(meta.get("step", 0)), meta=meta, weights=weights)
    if with_training_state:
        ema_file = directory / WEIGHT_FILES["ema"]
        ckpt.ema_state = _read_tensors(ema_file) if ema_file.exists() else None
        ckpt.optimizer_state = _torch_load(directory / "optimizer.pt")
        ckpt.trainer_state = _torch_load(directory / "trainer_state.pt") or {}
    return ckpt


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(state[k].shape)} != expected {tuple(expected[k].shape)}"
        for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the {model.config.stage} model:"]
        parts += [f"  missing: {missing}"] if missing else []
        parts += [f"  unexpected: {unexpected}"] if unexpected else []
        parts += [f"  wrong shape: {shapes}"] if shapes else []
        raise CheckpointError("\n".join(parts))


def _read_meta(directory: Path) -> dict:
    path = directory / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {directory} is not a ColTran checkpoint") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {meta.get('format')!r} version {meta.get('version')!r}, "
                              f"expected {FORMAT!r} version {FORMAT_VERSION}")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read (truncated or corrupt?): {err}") from None


def _torch_load(path: Path):
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged pickles
        raise CheckpointError(f"{path} cannot be read (truncated or corrupt?): {err}") from None


def _check_same_config(directory: Path, found: ModelConfig, expected: ModelConfig) -> None:
    a, b = config_to_dict(found), config_to_dict(expected)
    diffs = [f"{k}: checkpoint {a.get(k)!r} != expected {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    if diffs:
        raise CheckpointError(f"{directory} was saved with a different config: " + "; ".join(diffs))


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Rename `tmp` to `directory`; an existing `directory` is moved aside first and then removed."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
