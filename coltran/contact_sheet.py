"""Contact sheet: one picture of a colorization run, a row per input with the gray input the model saw, its
colourings and the original colour photo where there is one, each scaled into the same square cell.

Plain image code (numpy + Pillow); the demo, `coltran colorize --contact-sheet` and the batch job write it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from coltran.chroma import luma

BACKGROUND = (255, 255, 255)
TEXT = (40, 40, 40)
LABEL_HEIGHT = 14
GAP = 4


@dataclass
class SheetRow:
    """One input: `gray` (H, W) or (H, W, 3) uint8, its colourings, and the original colour image if known."""

    name: str
    gray: np.ndarray
    samples: list[np.ndarray] = field(default_factory=list)
    original: np.ndarray | None = None


def is_colour(image: np.ndarray, tolerance: int = 2) -> bool:
    """Whether an RGB image carries colour (some pixel's channels differ by more than `tolerance`)."""
    image = np.asarray(image)
    if image.ndim == 2:
        return False
    spread = image.max(axis=-1).astype(np.int16) - image.min(axis=-1).astype(np.int16)
    return bool((spread > tolerance).any())


def row_from_images(name: str, source: np.ndarray, samples: list[np.ndarray]) -> SheetRow:
    """A row from the input as read (colour or gray) and its colourings: the gray is the input's BT.601 luma (what
    the model saw); the input itself is the original when it is a colour image."""
    gray = np.clip(np.rint(luma(source)), 0, 255).astype(np.uint8)
    return SheetRow(name, gray, list(samples), np.asarray(source) if is_colour(source) else None)


def _fit(image: np.ndarray, width: int, height: int) -> Image.Image:
    """`image` scaled (aspect kept) into a width x height box, centred on the background."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    scale = min(width / img.width, height / img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    canvas.paste(img, ((width - img.width) // 2, (height - img.height) // 2))
    return canvas


def cell_height(rows: list[SheetRow], cell: int) -> int:
    """Cells are `cell` wide and as tall as the tallest input needs, at most `cell` (landscape photos leave no
    empty bands)."""
    aspect = max(r.gray.shape[0] / r.gray.shape[1] for r in rows)
    return max(1, min(cell, round(cell * aspect)))


def compose(rows: list[SheetRow], cell: int = 160) -> np.ndarray:
    """(H, W, 3) uint8 sheet: columns `gray input`, `sample 1..N`, `original` (if any row has one); a label above
    each column and the input's name above each row; cells `cell` wide (cell_height tall). Rows with fewer
    samples leave their cells blank."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    if cell < 16:
        raise ValueError(f"cell must be at least 16 pixels, got {cell}")
    num_samples = max(len(r.samples) for r in rows)
    originals = any(r.original is not None for r in rows)
    titles = ["gray input", *(f"sample {k + 1}" for k in range(num_samples))] + (["original"] if originals else [])
    height = cell_height(rows, cell)
    pitch_x, pitch_y = cell + GAP, height + LABEL_HEIGHT + GAP
    sheet = Image.new("RGB", (GAP + pitch_x * len(titles), LABEL_HEIGHT + GAP + pitch_y * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((GAP + c * pitch_x, 1), title, fill=TEXT)
    for r, row in enumerate(rows):
        top = LABEL_HEIGHT + GAP + r * pitch_y
        draw.text((GAP, top), row.name[-(cell * len(titles) // 7):], fill=TEXT)  # the name's tail fits the row
        images = [row.gray, *row.samples, *([None] * (num_samples - len(row.samples)))]
        images += [row.original] if originals else []
        for c, image in enumerate(images):
            if image is not None:
                sheet.paste(_fit(image, cell, height), (GAP + c * pitch_x, top + LABEL_HEIGHT))
    return np.asarray(sheet)


def save_contact_sheet(rows: list[SheetRow], path: str | Path, cell: int = 160) -> Path:
    """Compose `rows` and write them as a PNG at `path` (folders created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(compose(rows, cell)).save(path, optimize=True)
    return path
