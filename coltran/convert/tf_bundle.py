"""Pure-Python reader of TensorFlow tensor-bundle checkpoints (`<prefix>.index` + `<prefix>.data-*`).

No TensorFlow or protobuf needed; every index block and every tensor is checked against its crc32c.
"""

from __future__ import annotations

import codecs
import glob
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from coltran.convert._sstable import (
    CheckpointFormatError,
    crc32c,
    mask_crc,
    proto_fields,
    read_table,
    to_int64,
    varint,
)

__all__ = ["CheckpointFormatError", "TFCheckpointReader", "list_variables", "resolve_checkpoint_prefix"]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_DTYPES = {1: ("float32", "f4"), 2: ("float64", "f8"), 3: ("int32", "i4"), 4: ("uint8", "u1"),
           5: ("int16", "i2"), 6: ("int8", "i1"), 7: ("string", None), 8: ("complex64", "c8"),
           9: ("int64", "i8"), 10: ("bool", "?"), 14: ("bfloat16", "u2"), 17: ("uint16", "u2"),
           18: ("complex128", "c16"), 19: ("float16", "f2"), 22: ("uint32", "u4"), 23: ("uint64", "u8")}
_OTHER_DTYPES = {0: "invalid", 20: "resource", 21: "variant"}
_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
_STATE_LINE = re.compile(r'^\s*model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', re.MULTILINE)


@dataclass(frozen=True)
class _Entry:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int
    sliced: bool

    @property
    def dtype_name(self) -> str:
        if self.dtype in _DTYPES:
            return _DTYPES[self.dtype][0]
        return _OTHER_DTYPES.get(self.dtype, f"DataType enum {self.dtype}")


def _parse_entry(value: bytes, key: str) -> _Entry:
    """BundleEntryProto: dtype 1, shape 2 (dim 2 -> size 1; unknown_rank 3), shard 3, offset 4, size 5,
    crc32c 6 (fixed32, masked), slices 7."""
    what = f"entry of tensor {key!r}"
    f = proto_fields(value, what)
    shape_fields = proto_fields(f.get(2, [b""])[-1], what)
    shape = tuple(to_int64(proto_fields(d, what).get(1, [0])[-1]) for d in shape_fields.get(2, []))
    if shape_fields.get(3, [0])[-1] or any(d < 0 for d in shape):
        raise CheckpointFormatError(f"{what} has an unknown shape {shape}; a saved tensor needs a full one")
    return _Entry(dtype=f.get(1, [0])[-1], shape=shape, shard=f.get(3, [0])[-1],
                  offset=to_int64(f.get(4, [0])[-1]), size=to_int64(f.get(5, [0])[-1]),
                  crc=f.get(6, [0])[-1], sliced=bool(f.get(7)))


def _decode_strings(raw: bytes, count: int, key: str, order: str) -> tuple[list[bytes], int]:
    """String tensors: varint64 lengths, the masked crc of the lengths, then the bytes. -> (values, crc)."""
    pos, lengths, crc = 0, [], 0
    for _ in range(count):
        length, pos = varint(raw, pos, f"string lengths of tensor {key!r}")
        lengths.append(length)
        crc = crc32c(length.to_bytes(4 if length < 1 << 32 else 8, order), crc)  # as integers, not varints
    stored = raw[pos:pos + 4]
    if len(stored) < 4 or mask_crc(crc) != int.from_bytes(stored, order):
        raise CheckpointFormatError(f"string tensor {key!r}: crc32c of its element lengths does not match")
    start = pos + 4
    if start + sum(lengths) != len(raw):
        raise CheckpointFormatError(f"string tensor {key!r}: its lengths add up to {start + sum(lengths)} "
                                    f"bytes, the index entry says {len(raw)}")
    bounds = np.cumsum([start, *lengths]).tolist()
    values = [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return values, crc32c(raw[start:], crc32c(stored, crc))


class TFCheckpointReader:
    """Keys, shapes, dtypes and values of one checkpoint; `with TFCheckpointReader(path) as r:` closes files.

    dtype names are TensorFlow's ("float32", "int64", "string", ...); string tensors come back as numpy
    object arrays of `bytes`, bfloat16 is widened exactly to float32; partitioned variables are refused.
    """

    def __init__(self, prefix_or_dir):
        self.prefix = resolve_checkpoint_prefix(prefix_or_dir)
        index_path = self.prefix + ".index"
        with open(index_path, "rb") as fh:
            table = read_table(fh.read(), index_path)
        if not table or table[0][0] != b"":
            raise CheckpointFormatError(f"{index_path}: the first key is not the bundle header (empty key)")
        self._parse_header(table[0][1], index_path)
        self._entries = {}
        for raw_key, value in table[1:]:
            key = raw_key.decode("utf-8", errors="backslashreplace")
            self._entries[key] = entry = _parse_entry(value, key)
            if not 0 <= entry.shard < self._num_shards:
                raise CheckpointFormatError(f"tensor {key!r} is in shard {entry.shard}; the header says "
                                            f"there are {self._num_shards}")
        self._shards = [f"{self.prefix}.data-{i:05d}-of-{self._num_shards:05d}"
                        for i in range(self._num_shards)]
        missing = [p for p in self._shards if not os.path.isfile(p)]
        if missing:
            raise CheckpointFormatError(f"checkpoint {self.prefix!r}: data file(s) missing: {missing}")
        self._files: dict[int, object] = {}

    def _parse_header(self, value: bytes, path: str) -> None:
        """BundleHeaderProto: num_shards 1, endianness 2 (0 little, 1 big), version 3 (VersionDef)."""
        f = proto_fields(value, f"bundle header of {path}")
        self._num_shards = f.get(1, [0])[-1]
        endianness = f.get(2, [0])[-1]
        if endianness not in (0, 1):
            raise CheckpointFormatError(f"{path}: unknown endianness {endianness} (expected 0 or 1)")
        self._order = "big" if endianness else "little"
        version = proto_fields(f.get(3, [b""])[-1], f"bundle version of {path}")
        if version.get(2, [0])[-1] > 1 or 1 in version.get(3, []):
            raise CheckpointFormatError(f"{path}: bundle format version {version} is newer than this "
                                        "reader (format version 1)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def _entry(self, key: str) -> _Entry:
        if key not in self._entries:
            raise KeyError(f"{key!r} is not a tensor in checkpoint {self.prefix!r} "
                           f"({len(self._entries)} keys)")
        return self._entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> str:
        return self._entry(key).dtype_name

    def _read_bytes(self, key: str, entry: _Entry) -> bytearray:
        if entry.shard not in self._files:
            self._files[entry.shard] = open(self._shards[entry.shard], "rb")
        fh = self._files[entry.shard]
        fh.seek(entry.offset)
        raw = bytearray(entry.size)
        got = fh.readinto(raw)
        if got != entry.size:
            size = os.fstat(fh.fileno()).st_size
            raise CheckpointFormatError(
                f"{self._shards[entry.shard]} is truncated: tensor {key!r} needs bytes "
                f"[{entry.offset}, {entry.offset + entry.size}) but the file has only {size} bytes")
        return raw

    def read(self, key: str) -> np.ndarray:
        entry = self._entry(key)
        if entry.sliced:
            raise CheckpointFormatError(f"tensor {key!r} is a partitioned variable (saved in slices); "
                                        "not supported")
        if entry.dtype not in _DTYPES:
            raise CheckpointFormatError(f"tensor {key!r} has dtype {entry.dtype_name}; supported: "
                                        f"{sorted(name for name, _ in _DTYPES.values())}")
        raw, count = self._read_bytes(key, entry), math.prod(entry.shape)
        name, code = _DTYPES[entry.dtype]
        if code is None:
            values, crc = _decode_strings(bytes(raw), count, key, self._order)
            array = np.empty(count, dtype=object)
            array[:] = values
        else:
            dtype = np.dtype(code).newbyteorder("<" if self._order == "little" else ">")
            if entry.size != count * dtype.itemsize:
                raise CheckpointFormatError(f"tensor {key!r}: {entry.size} bytes stored, {entry.shape} x "
                                            f"{name} needs {count * dtype.itemsize}")
            crc = crc32c(raw)
            array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
            if name == "bfloat16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
        if mask_crc(crc) != entry.crc:
            raise CheckpointFormatError(f"tensor {key!r}: crc32c mismatch in {self._shards[entry.shard]} "
                                        f"(stored {entry.crc:#010x}, computed {mask_crc(crc):#010x}); "
                                        "the data file is corrupt")
        return array.reshape(entry.shape)

    def read_all(self, skip=(OBJECT_GRAPH_KEY,)) -> dict[str, np.ndarray]:
        """Every tensor whose key contains none of the substrings in `skip`."""
        return {k: self.read(k) for k in self._entries if not any(s in k for s in skip)}

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def __enter__(self) -> TFCheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_variables(path) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype name) of every tensor, sorted by key, like `tf.train.list_variables`."""
    with TFCheckpointReader(path) as reader:
        return [(k, reader.shape(k), reader.dtype(k)) for k in reader.keys()]


def _prefix_from_dir(directory: str) -> str:
    state = os.path.join(directory, "checkpoint")
    if not os.path.isfile(state):
        indexes = sorted(glob.glob(os.path.join(glob.escape(directory), "*.index")))
        if len(indexes) == 1:
            return indexes[0][: -len(".index")]
        raise CheckpointFormatError(f"directory {directory!r} has no 'checkpoint' state file and "
                                    f"{len(indexes)} *.index files (expected 1)")
    with open(state, encoding="utf-8") as fh:
        match = _STATE_LINE.search(fh.read())
    if match is None:
        raise CheckpointFormatError(f"{state} has no model_checkpoint_path line")
    name = codecs.escape_decode(match.group(1).encode("utf-8"))[0].decode("utf-8")
    prefix = os.path.join(directory, name)  # an absolute name stays as it is
    local = os.path.join(directory, os.path.basename(name))
    if not os.path.isfile(prefix + ".index") and os.path.isfile(local + ".index"):
        prefix = local  # state file written on another machine or before the directory moved
    if not os.path.isfile(prefix + ".index"):
        raise CheckpointFormatError(f"{state} points to {name!r}, but {prefix}.index does not exist")
    return prefix


def resolve_checkpoint_prefix(path) -> str:
    """Checkpoint prefix (`.../model-1`) from a directory with a `checkpoint` file, a prefix, or a file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _prefix_from_dir(path)
    prefix = path[: -len(".index")] if path.endswith(".index") else _DATA_SUFFIX.sub("", path)
    if not os.path.isfile(prefix + ".index"):
        raise CheckpointFormatError(f"no TensorFlow checkpoint at {path!r}: {prefix}.index does not exist "
                                    "(give a prefix like .../model-1, its .index file, or the directory)")
    return prefix
