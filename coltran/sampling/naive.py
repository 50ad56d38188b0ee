"""The naive reference sampler: the full teacher-forced decoder re-run for every pixel.

O(H*W) full decoder passes: the oracle that the cached sampler is tested against and the baseline of
`benchmarks/sampling.py`, not a user path. The encoder runs once (z does not depend on colours).
"""

from __future__ import annotations

import torch

from coltran.sampling.cached import ColorizerSamples
from coltran.sampling.draw import check_mode, draw_symbols
from coltran.transforms import symbols_to_colors


@torch.no_grad()
def naive_sample_colorizer(model, gray: torch.Tensor, uniforms: torch.Tensor, *, mode: str = "sample",
                           temperature: float = 1.0, num_pixels: int | None = None,
                           return_probs: bool = False) -> ColorizerSamples:
    """gray (N, H, W), uniforms (N, H*W). `num_pixels` stops after that many raster positions (benchmarks
    extrapolate from a prefix); the rest of the image stays symbol 0."""
    check_mode(mode, temperature)
    height, width = model.config.resolution
    device = next(model.parameters()).device
    gray = gray.to(device).long()
    n = gray.shape[0]
    total = height * width if num_pixels is None else min(num_pixels, height * width)
    z = model.encode(gray)
    symbols = torch.zeros(n, height, width, dtype=torch.long, device=device)
    log_probs = torch.zeros(n, height, width, device=device)
    probs_out = torch.zeros(n, height, width, 512, device=device) if return_probs else None
    for p in range(total):
        i, j = divmod(p, width)
        logits = model.decode(symbols, z)[:, i, j, 0]
        chosen, probs = draw_symbols(logits, uniforms[:, p].to(device), mode, temperature)
        symbols[:, i, j] = chosen
        log_probs[:, i, j] = torch.log_softmax(logits.float(), -1).gather(-1, chosen[:, None])[:, 0]
        if probs_out is not None:
            probs_out[:, i, j] = probs
    return ColorizerSamples(symbols, symbols_to_colors(symbols).to(torch.uint8), log_probs, probs_out, None)
