"""Raw input rows -> training examples: decode (coltran.imageio), crop and resize (coltran.transforms.
prepare_example) into the tensor row schema of the split each key belongs to; inputs that cannot be used become
failure records instead."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from coltran.imageio import ImageDecodeError, decode_image
from coltran.transforms import prepare_example
from pipelines.dataset.format import (
    FAILURE_SCHEMA,
    ROW_SCHEMA,
    SCALAR_FIELDS,
    SPLITS,
    TENSOR_SHAPES,
    crop_rng,
    split_of,
    tensor_array,
)
from pipelines.io.sources import split_error


def image_examples(key: str, data: bytes, *, split: str, train_crops: int, seed: int, max_pixels: int,
                   min_side: int) -> list[dict[str, Any]]:
    """The rows of one image: `train_crops` random crops for train, one centre crop for heldout.
    Raises ImageDecodeError (or any transform error) when the image cannot be used."""
    image = decode_image(data, max_pixels=max_pixels, min_side=min_side)
    if split == "train":
        crops = [(i, "random", crop_rng(seed, key, i)) for i in range(train_crops)]
    else:
        crops = [(0, "center", None)]
    rows = []
    for index, mode, rng in crops:
        ex = prepare_example(image.rgb, mode, rng)
        top, left, size = ex["crop_box"]
        rows.append({"crop_index": index, "orig_height": image.size[0], "orig_width": image.size[1],
                     "crop_top": top, "crop_left": left, "crop_size": size, "was_grayscale": image.was_grayscale,
                     **{name: ex[name] for name in TENSOR_SHAPES}})
    return rows


def _failure(key: str, source: str, reason: str, message: str) -> dict[str, str]:
    return {"key": key, "source": source, "reason": reason, "message": message}


def split_examples(sources: list[dict[str, Any]], *, heldout_fraction: float, train_crops: int, seed: int,
                   max_pixels: int, min_side: int) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, str]]]:
    """Source rows {key, bytes, label, error, source} -> ({split: example rows}, failures): each image decoded once
    and routed to the split its key hashes to (format.split_of); one failure record per unusable input, whatever
    went wrong, so one bad item never stops the job."""
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    failures = []
    for src in sources:
        key, source = src["key"], src["source"]
        if src["error"] is not None:
            failures.append(_failure(key, source, *split_error(src["error"])))
            continue
        split = split_of(key, heldout_fraction)
        try:
            examples = image_examples(key, src["bytes"], split=split, train_crops=train_crops, seed=seed,
                                      max_pixels=max_pixels, min_side=min_side)
        except ImageDecodeError as exc:
            failures.append(_failure(key, source, exc.reason, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - any other error is this input's failure, not the job's
            failures.append(_failure(key, source, "transform_error", f"{type(exc).__name__}: {exc}"))
            continue
        rows[split].extend({"key": key, "label": src["label"], "split": split, "source": source, **ex}
                           for ex in examples)
    return rows, failures


def failures_table(failures: list[dict[str, str]]) -> pa.Table:
    return pa.Table.from_pylist(failures, schema=FAILURE_SCHEMA)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows of plain values and uint8 arrays -> a table in ROW_SCHEMA."""
    arrays = [pa.array([r[name] for r in rows], type_) for name, type_ in SCALAR_FIELDS]
    arrays += [tensor_array([np.asarray(r[name], np.uint8) for r in rows], shape)
               for name, shape in TENSOR_SHAPES.items()]
    return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)
