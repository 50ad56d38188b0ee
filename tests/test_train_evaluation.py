"""Held-out evaluation during training: bits/dim with the EMA weights (`eval/bits_per_dim`, what the registered
models use) and with the raw weights beside it (`eval/bits_per_dim_raw`)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from coltran.configs import preset
from coltran.models import build_model
from coltran.optim import EMA
from coltran.transforms import rgb_to_gray
from pipelines.train.evaluation import evaluate


def _batch(seed: int, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (size, 64, 64, 3), generator=g, dtype=torch.uint8)
    return {"rgb_64": rgb, "gray_64": rgb_to_gray(rgb)}


def _mean_loss(model, batches) -> float:
    """Example-weighted mean of the model's held-out loss (bits/dim) with its current weights, in eval mode."""
    model.eval()
    with torch.no_grad():
        losses = [float(model.loss(b, random_channel=False)[1]["loss"]) * len(b["rgb_64"]) for b in batches]
    return sum(losses) / sum(len(b["rgb_64"]) for b in batches)


@pytest.mark.parametrize("stage", ["colorizer", "color_upsampler"])
def test_evaluate_reports_ema_and_raw_bits_per_dim(stage):
    torch.manual_seed(0)
    model = build_model(preset(stage, "test")).train()
    ema = EMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # raw weights move away from the EMA shadow
    raw_state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [_batch(1, 2), _batch(2, 1)]  # unequal sizes: the means weight every example alike
    metrics = evaluate(model, ema, batches, contextlib.nullcontext)
    assert model.training and all(torch.equal(raw_state[k], v) for k, v in model.state_dict().items())
    raw = _mean_loss(model, batches)
    with ema.swapped_into(model):
        averaged = _mean_loss(model, batches)
    assert metrics["eval/bits_per_dim_raw"] == pytest.approx(raw, rel=1e-6)
    assert metrics["eval/bits_per_dim"] == pytest.approx(averaged, rel=1e-6) and metrics["eval/loss"] == \
        metrics["eval/bits_per_dim"]
    assert abs(raw - averaged) > 0.01  # the weight sets are told apart: neither key can stand in for the other
    assert not any(key.endswith("_raw") for key in set(metrics) - {"eval/bits_per_dim_raw"})
