"""Per-pixel draws from one seeded uniform stream per (image, sample).

Both samplers (cached and naive) consume the same stream by inverse-CDF sampling, so they can be compared
pixel for pixel, and an image's colouring depends only on its own seed, never on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MODES = ("sample", "argmax")


def make_uniforms(seeds: Sequence[int], num_samples: int, num_pixels: int,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """(len(seeds) * num_samples, num_pixels) float32 in [0, 1), image-major (image 0's samples first).

    Sample s of an image with seed k reads the stream of numpy's SeedSequence([k, s]).
    """
    rows = []
    for seed in seeds:
        if int(seed) < 0:
            raise ValueError(f"seeds must be non-negative integers, got {seed}")
        for s in range(num_samples):
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), s])))
            rows.append(rng.random(num_pixels, dtype=np.float32))
    return torch.from_numpy(np.stack(rows)).to(device)


def check_mode(mode: str, temperature: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def draw_symbols(logits: torch.Tensor, uniforms: torch.Tensor, mode: str | torch.Tensor,
                 temperature: float | torch.Tensor = 1.0):
    """logits (N, K), uniforms (N,) -> (symbols (N,) int64, probs (N, K) float32 at this temperature).

    'sample' takes the first class whose CDF exceeds u * total (inverse CDF; a class of probability zero is
    never drawn, not even at u = 0); 'argmax' the most likely class. `mode` may instead be a bool tensor (True:
    argmax), which a compiled step reads without recompiling per mode. Float32 whatever the logits' dtype.
    """
    greedy = mode == "argmax" if isinstance(mode, str) else mode
    logits = logits.float()
    probs = torch.softmax(logits / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]  # (N, 1)
    sampled = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(logits.shape[-1] - 1)
    return torch.where(torch.as_tensor(greedy, device=logits.device), logits.argmax(dim=-1), sampled), probs
