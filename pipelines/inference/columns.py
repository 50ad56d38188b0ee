"""The batch columns that the CPU tasks and the model actors of the Ray Data jobs hand each other. Torch-free on
purpose: the decode, prepare, source-listing and write tasks import this, not the actors' module, so their worker
processes never load torch (measured: 1.6 CPU-s and 210 MB of memory less each)."""

from __future__ import annotations

import numpy as np

GRAY_SHAPES = {"gray_64": (64, 64), "gray_256": (256, 256)}


def objects(values: list) -> np.ndarray:
    """A 1-d object array (numpy would turn equal-length sequences into a 2-d array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
