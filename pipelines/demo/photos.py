"""Photos for the embedded default, generated on the spot: no download, no licence question.

Procedural outdoor scenes in an ImageNet-style folder tree (`train/<class>/*.jpg`) whose colours follow
consistent semantics (blue sky, green hills, yellow sun, white snow, orange dusk), so that small models trained
for a few minutes on a laptop learn colours a person can check by eye. Every file is recorded in
`PROVENANCE.json` with its generator, seed and licence (CC0: generated, no third-party content).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("meadow", "beach", "snowfield", "dusk")
_PALETTES = {  # sky top, sky horizon, ground near, ground far, sun
    "meadow": ((40, 90, 200), (150, 200, 240), (40, 140, 40), (90, 170, 70), (250, 230, 90)),
    "beach": ((30, 110, 210), (170, 215, 245), (225, 200, 140), (20, 120, 190), (255, 240, 150)),
    "snowfield": ((70, 120, 190), (200, 220, 240), (240, 240, 245), (200, 210, 225), (255, 255, 220)),
    "dusk": ((40, 30, 90), (250, 140, 60), (50, 40, 40), (120, 60, 50), (255, 200, 80)),
}


def _gradient(top, bottom, height, width) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    return (np.array(top) * (1 - t) + np.array(bottom) * t) * np.ones((1, width, 1))


def generate_scene(kind: str, seed: int, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    """One (H, W, 3) uint8 scene of class `kind`."""
    rng = np.random.default_rng(seed)
    height, width = size
    sky_top, horizon, near, far, sun = (np.array(c) + rng.integers(-15, 16, 3) for c in _PALETTES[kind])
    h0 = int(height * rng.uniform(0.4, 0.65))
    img = np.zeros((height, width, 3))
    img[:h0] = _gradient(sky_top, horizon, h0, width)
    img[h0:] = _gradient(far, near, height - h0, width)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    r = int(rng.uniform(0.05, 0.1) * width)
    cx, cy = int(rng.uniform(0.15, 0.85) * width), int(rng.uniform(0.15, 0.6) * h0)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in np.clip(sun, 0, 255)))
    for _ in range(rng.integers(2, 5)):  # hills or dunes on the horizon
        x = rng.uniform(-0.2, 1.2) * width
        w, h = rng.uniform(0.3, 0.7) * width, rng.uniform(0.05, 0.2) * height
        shade = np.clip(far * rng.uniform(0.7, 1.1), 0, 255).astype(int)
        draw.ellipse((x - w, h0 - h, x + w, h0 + h), fill=tuple(int(v) for v in shade))
    noise = rng.normal(0, 6, (height, width, 3))
    out = np.asarray(canvas.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float64) + noise
    return np.clip(out, 0, 255).astype(np.uint8)


def generate_dataset(directory: str | Path, per_class: int = 24, seed: int = 0) -> Path:
    """Write `per_class` JPEGs for each class under directory/train/<class>/ plus PROVENANCE.json."""
    directory = Path(directory)
    records = []
    for c, kind in enumerate(CLASSES):
        folder = directory / "train" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image_seed = seed * 100_000 + c * 1000 + k
            path = folder / f"{kind}_{k:03d}.jpg"
            Image.fromarray(generate_scene(kind, image_seed)).save(path, quality=92)
            records.append({"file": str(path.relative_to(directory)), "class": kind, "seed": image_seed})
    provenance = {"generator": "pipelines.demo.photos.generate_scene", "licence": "CC0-1.0 (generated; no "
                  "third-party content)", "images": records}
    (directory / "PROVENANCE.json").write_text(json.dumps(provenance, indent=1))
    return directory
