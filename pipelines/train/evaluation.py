"""Evaluation during training (reference sec. 5): held-out bits/dim (all three channels for the upsamplers) with
the EMA weights and, beside it, the raw ones; a sample grid with the EMA weights: colorizer samples for fixed
held-out gray images, the upsamplers' outputs from ground-truth inputs. Grids: one column per image, rows gray or
input | output | truth."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch

from coltran.optim import EMA
from coltran.sampling import sample_colorizer
from coltran.transforms import from_3bit, to_3bit, upsample_4x


@torch.no_grad()
def evaluate(model: torch.nn.Module, ema: EMA, batches: list[dict],
             autocast: Callable[[], AbstractContextManager]) -> dict:
    """Mean held-out metrics over `batches` with the EMA weights, keyed `eval/<metric>` (loss = bits/dim), and
    the raw weights' bits/dim as `eval/bits_per_dim_raw`, so a log shows which of the two is better so far."""
    with _eval_mode(model):
        raw = _mean_metrics(model, batches, autocast)
        with ema.swapped_into(model):
            averaged = _mean_metrics(model, batches, autocast)
    out = {f"eval/{key}": value for key, value in averaged.items()}
    out["eval/bits_per_dim"] = averaged["loss"]
    out["eval/bits_per_dim_raw"] = raw["loss"]
    return out


def _mean_metrics(model: torch.nn.Module, batches: list[dict],
                  autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
    """Example-weighted means of the model's loss metrics over `batches`, with its current weights."""
    sums: dict[str, float] = {}
    count, device = 0, next(model.parameters()).device
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast():
            _, metrics = model.loss(batch, random_channel=False)
        n = len(next(iter(batch.values())))
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        count += n
    return {key: value / count for key, value in sums.items()}


@torch.no_grad()
def sample_grid(model: torch.nn.Module, ema: EMA, batch: dict, num_images: int,
                autocast: Callable[[], AbstractContextManager]) -> np.ndarray:
    """(3 * S, num_images * S, 3) uint8 grid for the first `num_images` rows of `batch` (S = image side)."""
    device = next(model.parameters()).device
    rows = {key: value[:num_images].to(device) for key, value in batch.items()}
    stage = model.config.stage
    with ema.swapped_into(model), _eval_mode(model), autocast():
        if stage == "colorizer":
            gray, truth = rows["gray_64"], rows["rgb_64"]
            samples = sample_colorizer(model, gray, num_samples=1, mode="sample", seeds=list(range(len(gray))))
            top, middle = _gray_rgb(gray), from_3bit(samples.colors3.to(torch.uint8))
        elif stage == "color_upsampler":
            gray, truth = rows["gray_64"], rows["rgb_64"]
            coarse = to_3bit(truth)  # ground-truth 3-bit colours, as the colorizer would give
            top, middle = from_3bit(coarse), model.predict(gray, coarse, mode="argmax")
        else:
            gray, truth = rows["gray_256"], rows["rgb_256"]
            blocky = upsample_4x(rows["rgb_64"])  # (N, 256, 256, 3) ground-truth 64x64 colours blown up
            top, middle = blocky, model.predict(gray, blocky, mode="argmax")
    parts = [torch.cat(list(row.cpu().to(torch.uint8)), dim=1) for row in (top, middle, truth)]  # (S, N*S, 3)
    return torch.cat(parts, dim=0).numpy()


def _gray_rgb(gray: torch.Tensor) -> torch.Tensor:
    return gray.to(torch.uint8).unsqueeze(-1).expand(*gray.shape, 3)


class _eval_mode:  # noqa: N801 - used like torch's context managers
    """model.eval() inside, the previous mode restored after."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
