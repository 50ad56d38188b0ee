"""Byte streams for reading archives within limits: a window on a seekable file (an inner tar read by offset,
locally or by S3 range requests), the decompressed view of an archive that refuses oversized reads and stops at its
expansion budget, the next bytes of a forward-only stream, and bounded reads that hold one copy of a member."""

from __future__ import annotations

import io
from typing import Any, BinaryIO

READ_AHEAD = 1 << 20  # bytes fetched per read from the archive file (one S3 range request)


class LimitExceeded(Exception):
    """An archive asked for more than its limits allow; str() is "reason: message"."""


class _Reader(io.RawIOBase):
    """A raw stream defined by its read(): readinto for io's buffered wrappers."""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class _Positioned(_Reader):
    """A seekable reader that keeps its position in `pos`."""

    pos: int

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos


class Window(_Positioned):
    """Bytes [start, start + size) of a seekable file (a pyarrow file, local or S3), read ahead in READ_AHEAD
    pieces that never cross the window's end: an inner tar of a tar of tars is read by offset, and the bytes
    fetched are the window's bytes and no more."""

    def __init__(self, file: Any, start: int, size: int, read_ahead: int = READ_AHEAD) -> None:
        self.file, self.start, self.size, self.pos, self.read_ahead = file, start, size, 0, read_ahead
        self.buf, self.buf_at = b"", 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, min(self.size, (0, self.pos, self.size)[whence] + offset))
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        at = self.pos - self.buf_at
        if not 0 <= at < len(self.buf) or at + n > len(self.buf):
            fetch = max(n, min(self.read_ahead, self.size - self.pos))
            self.file.seek(self.start + self.pos)
            self.buf, self.buf_at, at = self.file.read(fetch), self.pos, 0
        data = self.buf[at:at + n]
        self.pos += len(data)
        return data


class Expansion(_Positioned):
    """The decompressed bytes of an archive as tarfile reads them, within its limits: one read may not ask for
    more than a member cap (tarfile reads a long-name or pax header whole), the position may not pass the budget,
    forward seeks read and discard (or seek, when nothing is decompressed), and the last bytes are kept for the
    one-byte step back tarfile takes between members."""

    def __init__(self, raw: BinaryIO, *, budget: int, max_read: int, seekable: bool) -> None:
        self.raw, self.budget, self.max_read, self.can_seek = raw, budget, max_read, seekable
        self.pos = self.raw_pos = 0
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.max_read:
            raise LimitExceeded(f"header_too_large: a read of {n} bytes at offset {self.pos}, more than the "
                                f"member cap of {self.max_read - 1:,}")
        if self.pos + n > self.budget:
            n = max(0, self.budget - self.pos) + 1  # reading one byte past the budget proves it is exceeded
        out = b""
        if self.pos < self.raw_pos:  # after a step back: serve from the tail
            out = self.tail[len(self.tail) - (self.raw_pos - self.pos):][:n]
            self.pos += len(out)
        while len(out) < n:  # tarfile takes a short read for the end of the archive
            data = self.raw.read(n - len(out))
            if not data:
                break
            self.raw_pos += len(data)
            self.pos = self.raw_pos
            self.tail = data[-512:] if len(data) >= 512 else (self.tail + data)[-512:]
            out += data
        if self.pos > self.budget:
            raise LimitExceeded(f"expansion_budget: the archive expands past its budget of {self.budget:,} bytes; "
                                "the rest of it is not read")
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        target = (0, self.pos)[whence] + offset if whence in (0, 1) else None
        if target is None or target < self.raw_pos - len(self.tail):
            raise io.UnsupportedOperation(f"seek to {offset} (whence {whence}) from {self.pos}: forward only")
        if target <= self.raw_pos:
            self.pos = target
        elif self.can_seek and target <= self.budget:
            self.raw.seek(target)
            self.pos = self.raw_pos = target
            self.tail = b""
        else:
            while self.pos < target:
                if not self.read(min(target - self.pos, READ_AHEAD, self.max_read)):
                    break
        return self.pos


class Prepend(_Reader):
    """`head` followed by the rest of `raw`: the magic bytes read back in front of a forward-only stream."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self.head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = (self.head, b"") if n is None or n < 0 or n >= len(self.head) else \
                (self.head[:n], self.head[n:])
            return out
        return self.raw.read(n)


class Sub(_Reader):
    """The next `size` bytes of a forward-only parent stream: an inner archive inside a compressed tar."""

    def __init__(self, parent: Expansion, size: int) -> None:
        self.parent, self.size, self.left = parent, size, size

    def seekable(self) -> bool:
        return isinstance(self.parent.raw, Window) and self.parent.can_seek

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.parent.read(min(n, self.parent.max_read - 1)) if n else b""
        self.left -= len(data)
        return data


def read_bounded(f: BinaryIO, limit: int) -> bytes:
    """Up to `limit` bytes of `f`, read in 1 MiB pieces into one growing buffer that becomes the result without a
    copy: a plain read(n) of a decompressed member holds two or three copies of it at once."""
    buf = io.BytesIO()
    while buf.tell() < limit and (chunk := f.read(min(READ_AHEAD, limit - buf.tell()))):
        buf.write(chunk)
    return buf.getvalue()
