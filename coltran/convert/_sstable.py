"""Low-level pieces of the TensorFlow checkpoint format: crc32c, protobuf wire decoding, the SSTable index.

Written from the format descriptions (LevelDB table format, TensorFlow's lib/io); used by `tf_bundle`.
"""

from __future__ import annotations

import math

import numpy as np


class CheckpointFormatError(ValueError):
    """The checkpoint is missing, truncated, corrupted or written in a form this reader does not support."""


# ---- crc32c (Castagnoli), as TensorFlow masks it ------------------------------------------------------
def _make_table() -> list[int]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ (0x82F63B78 if n & 1 else 0)
        table.append(n)
    return table


_TABLE = _make_table()
_TABLE_NP = np.array(_TABLE, dtype=np.uint32)
_LANES_FROM = 1 << 14  # inputs at least this long use the vectorised lane algorithm
_BASIS = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))


def _crc_serial(reg: int, data) -> int:
    table = _TABLE
    for byte in data:
        reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


def _crc_lanes(reg: int, data) -> int:
    """Run sqrt(n) equal slices side by side in numpy, then fold them with the linear 'append zeros' map."""
    lanes = math.isqrt(len(data))
    length = len(data) // lanes
    cols = np.zeros((length, lanes + 32), dtype=np.uint8)
    cols[:, :lanes] = np.frombuffer(data, np.uint8, count=lanes * length).reshape(lanes, length).T
    regs = np.zeros(lanes + 32, dtype=np.uint32)
    regs[0], regs[lanes:] = reg, _BASIS  # 32 extra lanes feed zeros to the basis: the shift matrix
    for col in cols:
        regs = _TABLE_NP[(regs ^ col) & 0xFF] ^ (regs >> 8)
    image, values = regs[lanes:], np.arange(256)
    shift = [np.bitwise_xor.reduce(np.where(((values[:, None] >> np.arange(8)) & 1) == 1,
                                            image[8 * p:8 * p + 8], np.uint32(0)), axis=1).tolist()
             for p in range(4)]
    t0, t1, t2, t3 = shift
    acc = 0
    for lane_reg in regs[:lanes].tolist():
        acc = t0[acc & 0xFF] ^ t1[(acc >> 8) & 0xFF] ^ t2[(acc >> 16) & 0xFF] ^ t3[acc >> 24] ^ lane_reg
    return _crc_serial(acc, memoryview(data)[lanes * length:])


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of `data` (bytes-like), continuing from the crc `value` (0 to start)."""
    reg = value ^ 0xFFFFFFFF
    reg = _crc_lanes(reg, data) if len(data) >= _LANES_FROM else _crc_serial(reg, data)
    return reg ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """TensorFlow/LevelDB's stored form of a crc: rotated right by 15 bits plus a constant."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- protobuf wire format ---------------------------------------------------------------------------
def varint(buf, pos: int, what: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointFormatError(f"truncated varint in {what}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise CheckpointFormatError(f"varint longer than 10 bytes in {what}")


def proto_fields(buf: bytes, what: str) -> dict[int, list]:
    """Decode one protobuf message into {field number: [values]} (ints, or bytes for length-delimited)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = varint(buf, pos, what)
        wire = tag & 7
        if wire == 0:
            value, pos = varint(buf, pos, what)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == 2:
            size, pos = varint(buf, pos, what)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise CheckpointFormatError(f"unsupported protobuf wire type {wire} in {what}")
        if pos > len(buf):
            raise CheckpointFormatError(f"truncated protobuf field {tag >> 3} in {what}")
        out.setdefault(tag >> 3, []).append(value)
    return out


def to_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# ---- LevelDB-style table (the .index file) ----------------------------------------------------------
_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48


def _block(data: bytes, handle, path: str, what: str) -> bytes:
    offset, pos = varint(handle, 0, f"{what} handle of {path}")
    size, _ = varint(handle, pos, f"{what} handle of {path}")
    if offset + size + 5 > len(data) - _FOOTER:
        raise CheckpointFormatError(f"{path}: {what} [{offset}, {offset + size + 5}) runs past the table "
                                    f"end ({len(data) - _FOOTER}); the index file is truncated or corrupt")
    contents, kind = data[offset:offset + size], data[offset + size]
    if mask_crc(crc32c(data[offset:offset + size + 1])) != int.from_bytes(
            data[offset + size + 1:offset + size + 5], "little"):
        raise CheckpointFormatError(f"{path}: {what} at offset {offset} fails its crc32c check (corrupt)")
    if kind == 1:
        raise CheckpointFormatError(f"{path}: {what} is snappy-compressed; only uncompressed tables "
                                    "(what TensorFlow writes) are supported")
    if kind != 0:
        raise CheckpointFormatError(f"{path}: {what} has unknown compression type {kind} (expected 0)")
    return contents


def _block_entries(block: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """Undo the prefix compression of one block; the restart array is only needed for seeking."""
    count = int.from_bytes(block[-4:], "little") if len(block) >= 4 else 0
    limit = len(block) - 4 - 4 * count
    if count < 1 or limit < 0:
        raise CheckpointFormatError(f"{what}: bad restart array ({count} restarts, {len(block)} bytes)")
    entries, key, pos = [], b"", 0
    while pos < limit:
        shared, pos = varint(block, pos, what)
        unshared, pos = varint(block, pos, what)
        size, pos = varint(block, pos, what)
        if shared > len(key) or pos + unshared + size > limit:
            raise CheckpointFormatError(f"{what}: entry at byte {pos} overruns the block")
        key = key[:shared] + block[pos:pos + unshared]
        entries.append((key, block[pos + unshared:pos + unshared + size]))
        pos += unshared + size
    return entries


def read_table(data: bytes, path: str) -> list[tuple[bytes, bytes]]:
    if len(data) < _FOOTER or int.from_bytes(data[-8:], "little") != _MAGIC:
        raise CheckpointFormatError(f"{path}: no SSTable magic number in the last 8 of {len(data)} bytes; "
                                    "the index file is truncated or not a TensorFlow checkpoint index")
    footer = data[-_FOOTER:]
    _, pos = varint(footer, 0, f"footer of {path}")
    _, pos = varint(footer, pos, f"footer of {path}")
    _block(data, footer, path, "metaindex block")  # checked, unused: TensorFlow writes no filter block
    entries = []
    for _, handle in _block_entries(_block(data, footer[pos:], path, "index block"), f"index of {path}"):
        entries += _block_entries(_block(data, handle, path, "data block"), f"data block of {path}")
    if any(a[0] >= b[0] for a, b in zip(entries, entries[1:], strict=False)):
        raise CheckpointFormatError(f"{path}: keys are not strictly increasing; the index is corrupt")
    return entries
