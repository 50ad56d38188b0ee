"""Official ColTran TF checkpoints -> this project's checkpoints (model, EMA, RMSprop state, step), and the
`coltran convert-tf` command. Needs no TensorFlow: tensors come from the tensor-bundle reader (or an .npz)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from coltran.checkpoint import CheckpointError, save_checkpoint
from coltran.configs import STAGE_NAMES, ConfigError, ModelConfig, resolve_config
from coltran.convert.tf_bundle import CheckpointFormatError
from coltran.convert.tf_keys import (
    ITERATION_KEYS,
    LEARNING_RATE_KEYS,
    LEGACY_HYPER,
    SortedKeys,
    align_auto_names,
    read_tf_variables,
    sort_keys,
)
from coltran.convert.tf_mapping import TFVariable, official_variables, to_torch_layout
from coltran.models import build_model
from coltran.optim import RMSPROP_ALPHA, make_optimizer

MAX_LISTED = 12


class ConversionError(ValueError):
    """A TF checkpoint does not fit the given config (missing, unexpected or mis-shaped tensors, or values the
    port cannot represent)."""


@dataclass
class ConvertedCheckpoint:
    """A TF checkpoint in PyTorch form, ready for `coltran.checkpoint.save_checkpoint`."""

    model: nn.Module
    ema_state: dict[str, torch.Tensor]
    optimizer: torch.optim.RMSprop | None
    step: int
    meta: dict


def _listing(what: str, items) -> str:
    items = sorted(items)
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {what} ({len(items)}): {items[:MAX_LISTED]}{more}"


def _compare(what: str, expected: dict[str, tuple], found: dict[str, np.ndarray]) -> list[str]:
    problems = []
    missing = set(expected) - set(found)
    extra = set(found) - set(expected)
    shapes = [f"{k}: {tuple(found[k].shape)} != expected {expected[k]}" for k in set(expected) & set(found)
              if tuple(found[k].shape) != expected[k]]
    if missing:
        problems.append(_listing(f"missing {what}", missing))
    if extra:
        problems.append(_listing(f"unexpected {what}", extra))
    if shapes:
        problems.append(_listing(f"mis-shaped {what}", shapes))
    return problems


def _slot_problems(keys: SortedKeys, trainable: list[TFVariable]) -> list[str]:
    layout = keys.layout
    if layout == "mixed":
        return ["  optimizer state mixes the tf_keras 2.x layout (optimizer/_variables/N) with the legacy one "
                "(.OPTIMIZER_SLOT / optimizer/iter); expected one of them"]
    if layout == "tf_keras" and keys.indexed_slots:
        expected = {str(n + 1): v.shape for n, v in enumerate(trainable)}
        found = {str(n): a for n, a in keys.indexed_slots.items()}
        return _compare("RMSprop slots optimizer/_variables/N", expected, found)
    if layout == "legacy" and keys.legacy_slots:
        return _compare("RMSprop rms slots", {v.name: v.shape for v in trainable}, keys.legacy_slots)
    return []


def _frozen_problems(keys: SortedKeys, variables: list[TFVariable]) -> list[str]:
    """The official cLN's inner LayerNorm is created untrainable (1 / 0); this port has no such parameters."""
    bad = []
    for v in variables:
        if v.layout in ("frozen_ones", "frozen_zeros") and v.name in keys.model:
            want = 1.0 if v.layout == "frozen_ones" else 0.0
            if not np.all(keys.model[v.name] == want):
                bad.append(f"{v.name} (expected all {want:g})")
    return [_listing("frozen cLN normalize weights that are not 1 / 0, which this port cannot represent",
                     bad)] if bad else []


def match_variables(keys: SortedKeys, cfg: ModelConfig, source: str) -> list[TFVariable]:
    """The official variables of `cfg`, named as in this checkpoint; raises ConversionError listing every
    missing, unexpected or mis-shaped tensor."""
    variables = align_auto_names(official_variables(cfg), list(keys.model) + list(keys.ema))
    trainable = [v for v in variables if v.trainable]
    problems = _compare("model variables", {v.name: v.shape for v in variables}, keys.model)
    problems += _compare("EMA shadows", {v.name: v.shape for v in trainable}, keys.ema)
    problems += _slot_problems(keys, trainable)
    if keys.unexpected:
        problems.append(_listing("unrecognised keys", keys.unexpected))
    if not problems:
        problems = _frozen_problems(keys, variables)
    if problems:
        raise ConversionError(f"TF checkpoint {source} does not match the {cfg.stage} config (hidden_size "
                              f"{cfg.hidden_size}, heads {cfg.num_heads}, resolution {list(cfg.resolution)}, "
                              "layer counts, conditioning switches):\n" + "\n".join(problems))
    return variables


def _tensor(array: np.ndarray, var: TFVariable) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(to_torch_layout(np.asarray(array), var.layout), np.float32))


def _optimizer(model: nn.Module, keys: SortedKeys, trainable: list[TFVariable], step: int):
    """RMSprop whose state holds the TF velocities as `square_avg` and the iteration count as `step`."""
    slots = (keys.indexed_slots if keys.layout == "tf_keras"
             else {n + 1: keys.legacy_slots[v.name] for n, v in enumerate(trainable)} if keys.legacy_slots else {})
    if not slots:
        return None
    lr = keys.scalar(LEARNING_RATE_KEYS)
    momentum = keys.scalar(("momentum",))
    if momentum:
        raise ConversionError(f"the checkpoint's RMSprop has momentum {momentum}; only momentum 0 (the official "
                              "setting) is supported")
    optimizer = make_optimizer(model.parameters(), **({} if lr is None else {"lr": float(lr)}))
    rho = keys.scalar(("rho",))
    optimizer.param_groups[0]["alpha"] = RMSPROP_ALPHA if rho is None else float(rho)
    params = dict(model.named_parameters())
    for n, var in enumerate(trainable):
        optimizer.state[params[var.torch_name]] = {
            "step": torch.tensor(float(step), dtype=torch.float32),
            "square_avg": _tensor(slots[n + 1], var),
        }
    return optimizer


def load_tf_checkpoint(path: str | Path, config: ModelConfig, weights_source: str = "auto") -> ConvertedCheckpoint:
    """Read and check a TF checkpoint of the stage `config` describes and build its PyTorch counterpart."""
    tensors, source = read_tf_variables(path, weights_source)
    keys = sort_keys(tensors)
    variables = match_variables(keys, config, source)
    model = build_model(config)
    mapped = [v for v in variables if v.torch_name is not None]
    model.load_state_dict({v.torch_name: _tensor(keys.model[v.name], v) for v in mapped}, strict=True)
    trainable = [v for v in variables if v.trainable]
    ema_state = {v.torch_name: _tensor(keys.ema[v.name], v) for v in trainable}
    iterations = keys.scalar(ITERATION_KEYS)
    step = 0 if iterations is None else int(iterations)
    optimizer = _optimizer(model, keys, trainable, step)
    meta = {"source": "convert-tf", "tf_checkpoint": source, "tf_optimizer_layout": keys.layout,
            "tf_iterations": iterations, "tf_learning_rate": keys.scalar(LEARNING_RATE_KEYS),
            "optimizer_state": optimizer is not None,
            **{f"tf_{k}": keys.scalar((k,)) for k in LEGACY_HYPER if k in keys.optimizer_scalars}}
    return ConvertedCheckpoint(model, ema_state, optimizer, step, meta)


def _config(stage: str, config: ModelConfig | str) -> ModelConfig:
    cfg = resolve_config(config, stage) if isinstance(config, str | Path) else config
    if cfg.stage != stage:
        raise ConfigError(f"config {config!r} is for stage {cfg.stage!r}, but the checkpoint is a {stage}")
    return cfg


def _save(converted: ConvertedCheckpoint, out_dir: str | Path) -> Path:
    return save_checkpoint(out_dir, converted.model, ema_state=converted.ema_state, optimizer=converted.optimizer,
                           step=converted.step, meta=converted.meta)


def convert_tf_checkpoint(path: str | Path, stage: str, config: ModelConfig | str, out_dir: str | Path,
                          weights_source: str = "auto") -> Path:
    """Convert one official TF checkpoint of `stage` into a checkpoint directory `out_dir`.

    `config`: a ModelConfig, a preset name (full | mid | test) or a YAML file. `weights_source`: 'tf' (tensor
    bundle: a directory with a `checkpoint` file, a prefix like .../model-1, or its .index), 'npz' (arrays keyed
    like `tf.train.list_variables`) or 'auto' (npz when the path ends in .npz).
    """
    if stage not in STAGE_NAMES:
        raise ValueError(f"stage must be one of {list(STAGE_NAMES)}, got {stage!r}")
    return _save(load_tf_checkpoint(path, _config(stage, config), weights_source), out_dir)


def convert_tf_models(out_dir: str | Path, *, colorizer=None, color_upsampler=None, spatial_upsampler=None,
                      config: ModelConfig | str = "full", configs: dict | None = None,
                      weights_source: str = "auto") -> dict[str, Path]:
    """Convert up to three stage checkpoints into a models directory `out_dir/<stage>/`.

    `config` is used for every stage unless `configs[stage]` gives one. All stages are read and checked before
    anything is written, so a bad checkpoint leaves `out_dir` untouched.
    """
    paths = {"colorizer": colorizer, "color_upsampler": color_upsampler, "spatial_upsampler": spatial_upsampler}
    paths = {stage: p for stage, p in paths.items() if p is not None}
    if not paths:
        raise ValueError("convert_tf_models needs at least one of colorizer, color_upsampler, spatial_upsampler")
    configs = configs or {}
    converted = {stage: load_tf_checkpoint(p, _config(stage, configs.get(stage, config)), weights_source)
                 for stage, p in paths.items()}
    return {stage: _save(c, Path(out_dir) / stage) for stage, c in converted.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `coltran convert-tf`."""
    parser.add_argument("checkpoint", nargs="?", metavar="TF_CHECKPOINT",
                        help="official TF checkpoint: a directory with a 'checkpoint' file, a prefix such as "
                             ".../model-1, its .index file, or an .npz of its variables (with --stage)")
    parser.add_argument("--stage", choices=STAGE_NAMES, help="stage of TF_CHECKPOINT")
    for stage in STAGE_NAMES:
        flag = stage.replace("_", "-")
        parser.add_argument(f"--{flag}", dest=f"{stage}_path", metavar="TF_CHECKPOINT",
                            help=f"{stage} checkpoint; with these flags --out is a models directory")
        parser.add_argument(f"--{flag}-config", dest=f"{stage}_config", metavar="CONFIG",
                            help=f"config of the {stage} (default: --config)")
    parser.add_argument("--config", default="full",
                        help="full | mid | test or a YAML model config file (default full)")
    parser.add_argument("--out", required=True, type=Path,
                        help="checkpoint directory (single stage) or models directory (per-stage flags)")


def run(args: argparse.Namespace) -> int:
    """Run `coltran convert-tf`; returns the exit status (errors go to stderr)."""
    per_stage = {s: getattr(args, f"{s}_path") for s in STAGE_NAMES if getattr(args, f"{s}_path")}
    configs = {s: getattr(args, f"{s}_config") for s in STAGE_NAMES if getattr(args, f"{s}_config")}
    try:
        if args.checkpoint is not None:
            if per_stage or args.stage is None:
                raise ValueError("give TF_CHECKPOINT with --stage, or the per-stage flags "
                                 "(--colorizer/--color-upsampler/--spatial-upsampler) without TF_CHECKPOINT")
            out = convert_tf_checkpoint(args.checkpoint, args.stage, configs.get(args.stage, args.config),
                                        args.out)
            print(f"wrote {args.stage} checkpoint {out}")
            return 0
        if not per_stage:
            raise ValueError("nothing to convert: give TF_CHECKPOINT --stage STAGE, or --colorizer / "
                             "--color-upsampler / --spatial-upsampler")
        written = convert_tf_models(args.out, config=args.config, configs=configs,
                                    **{f"{s}": p for s, p in per_stage.items()})
        for stage, out in written.items():
            print(f"wrote {stage} checkpoint {out}")
        return 0
    except (ConversionError, CheckpointFormatError, ConfigError, CheckpointError, ValueError, OSError) as err:
        print(f"coltran convert-tf: error: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coltran convert-tf", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
