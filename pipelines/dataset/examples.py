"""Raw input rows -> training examples: decode (coltran.imageio), crop and resize (coltran.transforms.
prepare_example) into the tensor row schema; inputs that cannot be used become failure records instead."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from coltran.imageio import ImageDecodeError, decode_image
from coltran.transforms import prepare_example
from pipelines.dataset.format import (
    FAILURE_SCHEMA,
    ROW_SCHEMA,
    SCALAR_FIELDS,
    TENSOR_SHAPES,
    crop_rng,
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


def examples_batch(batch: pa.Table, *, split: str, train_crops: int, seed: int, max_pixels: int, min_side: int,
                   failures_fs: pafs.FileSystem, failures_dir: str) -> pa.Table:
    """Ray Data `map_batches` function over source rows {key, bytes, label, error, source}.

    Returns the usable rows in ROW_SCHEMA; failures (one per unusable input, whatever went wrong) are written
    to `failures_dir` as a small Parquet file, so one bad item never stops the job."""
    rows, failures = [], []
    columns = (batch.column(c).to_pylist() for c in ("key", "bytes", "label", "error", "source"))
    for key, data, label, error, source in zip(*columns, strict=True):
        if error is not None:
            failures.append(_failure(key, source, *split_error(error)))
            continue
        try:
            examples = image_examples(key, data, split=split, train_crops=train_crops, seed=seed,
                                      max_pixels=max_pixels, min_side=min_side)
        except ImageDecodeError as exc:
            failures.append(_failure(key, source, exc.reason, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - any other error is this input's failure, not the job's
            failures.append(_failure(key, source, "transform_error", f"{type(exc).__name__}: {exc}"))
            continue
        rows.extend({"key": key, "label": label, "split": split, "source": source, **ex} for ex in examples)
    if failures:
        table = pa.Table.from_pylist(failures, schema=FAILURE_SCHEMA)
        pq.write_table(table, f"{failures_dir}/{uuid.uuid4().hex}.parquet", filesystem=failures_fs)
    return rows_to_table(rows)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows of plain values and uint8 arrays -> a table in ROW_SCHEMA."""
    arrays = [pa.array([r[name] for r in rows], type_) for name, type_ in SCALAR_FIELDS]
    arrays += [tensor_array([np.asarray(r[name], np.uint8) for r in rows], shape)
               for name, shape in TENSOR_SHAPES.items()]
    return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)
