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


def draw_symbols(logits: torch.Tensor, uniforms: torch.Tensor, mode: str, temperature: float = 1.0):
    """logits (N, K), uniforms (N,) -> (symbols (N,) int64, probs (N, K) float32 at this temperature).

    'sample' takes the first class whose CDF exceeds u (inverse CDF); 'argmax' the most likely class.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if mode == "argmax":
        return logits.argmax(dim=-1), probs
    cdf = probs.cumsum(dim=-1)
    symbols = (cdf < uniforms[:, None].to(cdf) * cdf[:, -1:]).sum(dim=-1)
    return symbols.clamp_max(logits.shape[-1] - 1), probs
