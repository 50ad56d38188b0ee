"""The on-disk format of a preprocessed dataset: row schema with pyarrow's canonical fixed-shape tensor columns,
the held-out rule (a stable hash of the key), per-crop random seeds, the failures table and the manifest."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

FORMAT_NAME = "coltran-preprocessed"
FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
HASH_BUCKETS = 1_000_000
TENSOR_SHAPES = {"gray_64": (64, 64), "gray_256": (256, 256), "rgb_64": (64, 64, 3), "rgb_256": (256, 256, 3),
                 "rgb3bit_64": (64, 64, 3)}
SCALAR_FIELDS = [("key", pa.string()), ("label", pa.int64()), ("split", pa.string()), ("crop_index", pa.int32()),
                 ("orig_height", pa.int32()), ("orig_width", pa.int32()), ("crop_top", pa.int32()),
                 ("crop_left", pa.int32()), ("crop_size", pa.int32()), ("was_grayscale", pa.bool_()),
                 ("source", pa.string())]
ROW_SCHEMA = pa.schema(SCALAR_FIELDS + [(name, pa.fixed_shape_tensor(pa.uint8(), list(shape)))
                                        for name, shape in TENSOR_SHAPES.items()])
FAILURE_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                            ("message", pa.string())])
SPLIT_RULE = (f"heldout iff int.from_bytes(sha1(key.encode('utf-8')).digest()[:8], 'big') % {HASH_BUCKETS} "
              f"< round(heldout_fraction * {HASH_BUCKETS}); independent of the seed")
CROP_RULE = ("train: train_crops square crops of side min(H, W) at uniform random positions, crop i drawn by "
             "np.random.default_rng([seed, i, *sha1(b'crop:' + key) as 5 uint32]); heldout: one centre crop")


def key_bucket(key: str) -> int:
    """Stable bucket 0..HASH_BUCKETS-1 of a key (the same on every machine, run and Python version)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % HASH_BUCKETS


def split_of(key: str, heldout_fraction: float) -> str:
    return "heldout" if key_bucket(key) < round(heldout_fraction * HASH_BUCKETS) else "train"


def key_in_split(key: str, *, split: str, heldout_fraction: float) -> bool:
    """Key filter for one split (picklable through functools.partial)."""
    return split_of(key, heldout_fraction) == split


def crop_rng(seed: int, key: str, crop_index: int) -> np.random.Generator:
    """The generator that places training crop `crop_index` of `key`: reproducible, independent per image."""
    words = np.frombuffer(hashlib.sha1(b"crop:" + key.encode("utf-8")).digest(), dtype=">u4")
    return np.random.default_rng([seed, crop_index, *(int(w) for w in words)])


def tensor_array(arrays: list[np.ndarray], shape: tuple[int, ...]) -> pa.ExtensionArray:
    """[N, *shape] uint8 as a canonical `arrow.fixed_shape_tensor` column (row-major, no nulls)."""
    stacked = np.stack(arrays) if arrays else np.zeros((0, *shape), np.uint8)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(stacked.reshape(-1), pa.uint8()), int(np.prod(shape)))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.uint8(), list(shape)), storage)


def read_tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """[N, *shape] numpy array of a tensor column, for readers with plain pyarrow (no Ray).

    Accepts the canonical fixed-shape tensor type, Ray's tensor extension types, and the bare fixed-size-list
    storage with the shape in the field's `ARROW:extension:metadata` (what a reader that does not know the
    extension sees)."""
    if name not in table.column_names:
        raise KeyError(f"no column {name!r}; columns are {table.column_names}")
    column, field = table.column(name), table.schema.field(name)
    if isinstance(column.type, pa.FixedShapeTensorType):
        shape = tuple(column.type.shape)
        storage = [chunk.storage for chunk in column.chunks]
    elif isinstance(column.type, pa.ExtensionType) and hasattr(column.type, "shape"):  # Ray's tensor types
        return np.concatenate([chunk.to_numpy() for chunk in column.chunks]) if column.num_chunks else \
            np.zeros((0, *column.type.shape), column.type.storage_type.value_type.to_pandas_dtype())
    elif field.metadata and b"ARROW:extension:metadata" in field.metadata:
        shape = tuple(json.loads(field.metadata[b"ARROW:extension:metadata"])["shape"])
        storage = list(column.chunks)
    else:
        raise TypeError(f"column {name!r} has type {column.type}, not a fixed-shape tensor")
    if column.null_count:
        raise ValueError(f"tensor column {name!r} has {column.null_count} null rows; expected none")
    flat = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in storage]
    values = np.concatenate(flat) if flat else np.zeros(0, np.uint8)
    return values.reshape(-1, *shape)


def schema_description(schema: pa.Schema = ROW_SCHEMA) -> dict[str, dict[str, Any]]:
    """{column: {"dtype", "shape"}} for the manifest; scalars have shape []."""
    out = {}
    for field in schema:
        if isinstance(field.type, pa.FixedShapeTensorType):
            out[field.name] = {"dtype": str(field.type.value_type), "shape": list(field.type.shape),
                               "arrow_type": "arrow.fixed_shape_tensor"}
        else:
            out[field.name] = {"dtype": str(field.type), "shape": []}
    return out


def write_json(fs: pafs.FileSystem, path: str, data: dict[str, Any]) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(data, indent=1, sort_keys=False).encode("utf-8"))


def read_manifest(fs: pafs.FileSystem, dest: str) -> dict[str, Any]:
    with fs.open_input_stream(f"{dest}/manifest.json") as f:
        manifest = json.loads(f.read().decode("utf-8"))
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{dest}/manifest.json is not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    return manifest
