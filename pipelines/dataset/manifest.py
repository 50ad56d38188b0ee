"""The manifest of a preprocessed dataset (DEST/manifest.json): counts per split read back from the written
Parquet footers, schema, classes, settings, version, split and crop rules, and the held-out keys."""

from __future__ import annotations

import collections
import datetime
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

import coltran
from pipelines.dataset.format import (
    CROP_RULE,
    FORMAT_NAME,
    FORMAT_VERSION,
    SPLIT_RULE,
    SPLITS,
    schema_description,
)


def split_counts(fs: pafs.FileSystem, dest: str, split: str, crops_per_image: int) -> tuple[dict[str, int], list[str]]:
    """({rows, images, files, crops_per_image}, sorted distinct keys) of DEST/<split> as written."""
    data = pads.dataset(f"{dest}/{split}", filesystem=fs, format="parquet")
    keys = data.to_table(columns=["key"]).column("key").to_pylist()
    if len(keys) % crops_per_image:
        raise RuntimeError(f"{dest}/{split} has {len(keys)} rows, not a multiple of {crops_per_image} crops per image")
    counts = {"rows": len(keys), "images": len(keys) // crops_per_image, "files": len(data.files),
              "crops_per_image": crops_per_image}
    return counts, sorted(set(keys))


def build_manifest(fs: pafs.FileSystem, dest: str, *, settings: dict[str, Any], classes: tuple[str, ...],
                   failures: pa.Table, seconds: float) -> dict[str, Any]:
    splits, heldout_keys = {}, []
    for split in SPLITS:
        crops = settings["train_crops"] if split == "train" else 1
        if fs.get_file_info(f"{dest}/{split}").type != pafs.FileType.Directory:  # skipped: fraction 0 or 1
            splits[split] = {"rows": 0, "images": 0, "files": 0, "crops_per_image": crops}
            continue
        splits[split], keys = split_counts(fs, dest, split, crops)
        if split == "heldout":
            heldout_keys = keys
    reasons = collections.Counter(failures.column("reason").to_pylist())
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "coltran_version": coltran.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "sources": list(settings["sources"]),
        "settings": settings,
        "inputs": sum(s["images"] for s in splits.values()) + failures.num_rows,
        "splits": splits,
        "failures": {"count": failures.num_rows, "by_reason": dict(sorted(reasons.items())),
                     "path": "failures.parquet"},
        "classes": list(classes),
        "schema": schema_description(),
        "tensor_format": "pyarrow canonical extension arrow.fixed_shape_tensor (uint8, row-major)",
        "split_rule": SPLIT_RULE,
        "crop_rule": CROP_RULE,
        "heldout_keys": heldout_keys,
    }
