"""Colourfulness of Hasler & Suesstrunk (2003), "Measuring colourfulness in natural images": the paper's
metric M = sigma_rgyb + 0.3 * mu_rgyb over the opponent channels rg = R - G and yb = (R + G) / 2 - B."""

from __future__ import annotations

import numpy as np


def colourfulness(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB -> (N,) float64 colourfulness per image (0 for gray images; about
    15 is "slightly", 33 "moderately", 59 "quite" and 82+ "extremely" colourful in the paper's scale)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"colourfulness expects uint8 RGB pixels, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"colourfulness expects (N, H, W, 3) or (H, W, 3) RGB, got shape {images.shape}")
    rgb = images.astype(np.float64)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    axes = (1, 2)
    sigma = np.sqrt(rg.var(axis=axes) + yb.var(axis=axes))
    mu = np.sqrt(rg.mean(axis=axes) ** 2 + yb.mean(axis=axes) ** 2)
    return sigma + 0.3 * mu
