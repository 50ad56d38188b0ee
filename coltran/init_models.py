"""`coltran init-models`: a models directory of untrained (randomly initialised) weights, clearly marked, so
users can check their plumbing end to end before any training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from coltran.checkpoint import save_checkpoint
from coltran.configs import STAGE_NAMES, resolve_config
from coltran.models import build_model


def init_models(directory: str | Path, preset: str = "test", seed: int = 0,
                stages: Sequence[str] = STAGE_NAMES) -> Path:
    """Write DIR/colorizer, DIR/color_upsampler, DIR/spatial_upsampler (or only `stages`) with TF-equivalent
    initial weights; a stage's weights depend on (seed, stage) only, not on which other stages are written."""
    directory = Path(directory)
    unknown = sorted(set(stages) - set(STAGE_NAMES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; expected some of {list(STAGE_NAMES)}")
    for stage in stages:
        torch.manual_seed(seed * 1000 + STAGE_NAMES.index(stage))
        model = build_model(resolve_config(preset, stage))
        ema = {n: p.detach().clone() for n, p in model.named_parameters()}
        save_checkpoint(directory / stage, model, ema_state=ema, step=0,
                        meta={"untrained": True, "source": "init-models", "preset": preset, "seed": seed})
    return directory
