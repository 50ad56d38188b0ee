"""Archive members as data, never extracted: tar (plain, .gz, .bz2, .xz; the compression found from the first
bytes) and zip, each member yielded as bytes or as an error naming why it is unsafe, unreadable or over the
limits ('..', absolute, link, special file, duplicate, non-UTF-8 name, member cap, expansion budget). Limits are
checked from the headers before a member is read and enforced again while bytes are decompressed."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import posixpath
import re
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from pipelines.io.streams import Expansion, LimitExceeded, Prepend, Sub, Window, read_bounded

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (*TAR_SUFFIXES, ".zip")
MAX_MEMBER_BYTES = 128 << 20  # default image member cap: a 64 Mpx JPEG is ~30 MB, a 4k x 5k 16-bit PNG ~120 MB
EXPANSION_RATIO = 20.0  # default budget: tars of JPEGs/PNGs expand ~1x; zeros gzip ~1000x
_DRIVE = re.compile(r"^[A-Za-z]:")
_MAGIC = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))
_READ_ERRORS = (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, ValueError, lzma.LZMAError)
Keep = Callable[[str], bool]


@dataclass(frozen=True)
class ArchiveLimits:
    """What one archive may cost its reader: `member_bytes`, the largest member read (into memory, one at a time),
    and a total expansion budget: `expansion_ratio` x the archive's stored size plus one member cap, counted over
    everything decompressed (headers, members read and members skipped). A plain tar expands 1x, so only
    compressed archives (and zips, by their members' declared sizes) can run out of budget."""

    member_bytes: int = MAX_MEMBER_BYTES
    expansion_ratio: float = EXPANSION_RATIO

    def __post_init__(self) -> None:
        if self.member_bytes < 1 or self.expansion_ratio < 1:
            raise ValueError(f"archive limits need member_bytes >= 1 and expansion_ratio >= 1, got {self}")

    def budget(self, stored_bytes: int) -> int:
        return int(self.expansion_ratio * stored_bytes) + self.member_bytes


@dataclass(frozen=True)
class Member:
    """One archive member: `name` as stored (non-UTF-8 bytes shown as \\xNN), and bytes or `error`.

    `error` is "reason: message"; `name` is "" for an error about the archive as a whole. Members of an inner
    archive are named `<inner name without suffix>/<member>`."""

    name: str
    data: bytes | None = None
    error: str | None = None


def archive_suffix(name: str) -> str | None:
    """The archive suffix of `name` (case-insensitive), or None for anything else."""
    lower = name.lower()
    return next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), None)


def strip_archive_suffix(name: str) -> str:
    suffix = archive_suffix(name)
    return name[: -len(suffix)] if suffix else name


def printable_name(name: str) -> str:
    """`name` with undecodable bytes (surrogate escapes) written as \\xNN so it can be stored as UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_problem(name: str, seen: set[str]) -> str | None:
    """Why a member name is unsafe ("reason: message"), or None; records safe names in `seen`."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "non_utf8_name: member name is not valid UTF-8"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "unsafe_path: absolute member path"
    if ".." in re.split(r"[/\\]", name):
        return "unsafe_path: member path contains '..'"
    normal = posixpath.normpath(name)
    if normal in seen:
        return "duplicate_name: an earlier member has the same name; only the first is used"
    seen.add(normal)
    return None


def open_tar_stream(raw: BinaryIO, stored_bytes: int, limits: ArchiveLimits) -> Expansion:
    """`raw` (a seekable window or a forward-only stream, at its start) decompressed as its first bytes say."""
    head = raw.read(6)
    rest = Prepend(head, raw)
    for magic, opener in _MAGIC:
        if head.startswith(magic):
            return Expansion(opener(rest), budget=limits.budget(stored_bytes), max_read=limits.member_bytes + 1,
                             seekable=False)
    if raw.seekable():
        raw.seek(0)
        rest = raw
    return Expansion(rest, budget=limits.budget(stored_bytes), max_read=limits.member_bytes + 1,
                     seekable=raw.seekable())


def iter_archive(fs: pafs.FileSystem, path: str, keep: Keep | None = None,
                 limits: ArchiveLimits = ArchiveLimits(), depth: int = 0) -> Iterator[Member]:
    """Stream the members of the archive at `path` (and of the archives in it, one level down); `keep(name)`
    False skips a member without reading it. Errors about the archive itself come as a Member named ""."""
    try:
        size = fs.get_file_info(path).size
        with fs.open_input_file(path) as f:
            yield from iter_archive_window(Window(f, 0, size), path, keep, limits, depth)
    except _READ_ERRORS as exc:
        yield Member("", error=f"unreadable_archive: {type(exc).__name__}: {exc}")


def iter_archive_window(raw: Window, name: str, keep: Keep | None, limits: ArchiveLimits,
                        depth: int = 0) -> Iterator[Member]:
    """Members of the archive held in `raw` (a window or a forward-only stream of its stored bytes)."""
    try:
        if name.lower().endswith(".zip"):
            yield from _iter_zip(_seekable(raw, limits), keep, limits, depth)
        else:
            yield from _iter_tar(open_tar_stream(raw, raw.size, limits), keep, limits, depth)
    except LimitExceeded as exc:
        yield Member("", error=str(exc))
    except _READ_ERRORS as exc:
        yield Member("", error=f"unreadable_archive: {type(exc).__name__}: {exc}")


def _seekable(raw: Any, limits: ArchiveLimits) -> BinaryIO:
    """A zip needs random access: a window is; a stream (an inner zip inside a compressed tar) is read into
    memory, up to the member cap."""
    if raw.seekable():
        return raw
    data = raw.read(limits.member_bytes + 1)
    if len(data) > limits.member_bytes:
        raise LimitExceeded(f"member_too_large: an inner zip in a compressed archive is read into memory, and "
                            f"this one is over the member cap of {limits.member_bytes:,} bytes")
    return io.BytesIO(data)


def list_member_names(fs: pafs.FileSystem, path: str, limits: ArchiveLimits = ArchiveLimits()) -> list[str]:
    """Top-level member names (files only) of an archive, without reading member data: the zip central
    directory, tar headers (seeking over the data of a plain tar, decompressing within the budget otherwise)."""
    names: list[str] = []
    for member in iter_archive(fs, path, _recorder(names), limits, depth=1):  # depth 1: inner archives by name only
        if not member.name:
            break
    return names


@dataclass(frozen=True)
class TarEntry:
    """One member of a plain tar located from its header: data at `offset`, `size` bytes, or an `error`."""

    name: str
    offset: int = 0
    size: int = 0
    error: str | None = None

    @property
    def is_archive(self) -> bool:
        return self.error is None and archive_suffix(self.name) is not None


def index_tar(fs: pafs.FileSystem, path: str, limits: ArchiveLimits = ArchiveLimits()) -> list[TarEntry] | None:
    """The members of a plain (uncompressed) tar from its headers alone, seeking over the data (one small read per
    header, a range request on S3); None when the file is compressed or a zip. An entry named "" ends the list
    when the tar is damaged."""
    if path.lower().endswith(".zip"):
        return None
    entries, seen = [], set()
    size = fs.get_file_info(path).size
    with fs.open_input_file(path) as f:
        # 513 bytes: the byte before a header, which tarfile reads to check the previous member is whole, and the
        # header itself, in one read (one range request on S3); the data between headers is never fetched
        window = Window(f, 0, size, read_ahead=tarfile.BLOCKSIZE + 1)
        if any(window.read(6).startswith(magic) for magic, _ in _MAGIC):
            return None
        window.seek(0)
        stream = Expansion(window, budget=limits.budget(size), max_read=limits.member_bytes + 1, seekable=True)
        try:
            with tarfile.open(fileobj=stream, mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
                for info in tf:
                    tf.members.clear()
                    if not info.isdir():
                        problem = name_problem(info.name, seen) or _tar_problem(info, limits)
                        entries.append(TarEntry(printable_name(info.name), info.offset_data, info.size, problem))
        except LimitExceeded as exc:
            entries.append(TarEntry("", error=str(exc)))
        except _READ_ERRORS as exc:
            entries.append(TarEntry("", error=f"unreadable_archive: {type(exc).__name__}: {exc}"))
    return entries


def _recorder(names: list[str]) -> Keep:
    def keep(name: str) -> bool:
        names.append(name)
        return False
    return keep


def _tar_problem(info: tarfile.TarInfo, limits: ArchiveLimits) -> str | None:
    if info.issym() or info.islnk():
        return f"link: member is a {'symbolic' if info.issym() else 'hard'} link to {info.linkname!r}"
    if not info.isreg():
        return "special_file: member is a device, FIFO or other non-regular file"
    if info.size > limits.member_bytes and not archive_suffix(info.name):
        return f"member_too_large: {info.size:,} bytes, more than the member cap of {limits.member_bytes:,}"
    return None


def _iter_tar(stream: Expansion, keep: Keep | None, limits: ArchiveLimits, depth: int) -> Iterator[Member]:
    seen: set[str] = set()
    with tarfile.open(fileobj=stream, mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        for info in tf:
            tf.members.clear()  # tarfile keeps every header it read; a flat tar of 1M images would fill memory
            if info.isdir():
                continue
            name = printable_name(info.name)
            problem = name_problem(info.name, seen) or _tar_problem(info, limits)
            if info.offset_data + info.size > stream.budget:
                yield Member(name, error=problem or f"expansion_budget: the member ends at {info.offset_data + info.size:,} "
                             f"bytes expanded, past the archive's budget of {stream.budget:,}")
                raise LimitExceeded(f"expansion_budget: members up to {info.offset_data:,} bytes expanded were "
                                    f"read; the next ends past the budget of {stream.budget:,}; the rest is not read")
            inner = problem is None and archive_suffix(name)
            if keep is not None and not inner and not keep(name):
                continue
            if problem:
                yield Member(name, error=problem)
            elif inner:
                stream.seek(info.offset_data)
                yield from _inner(Sub(stream, info.size), name, keep, limits, depth)
            else:
                stream.seek(info.offset_data)
                yield Member(name, data=read_bounded(stream, info.size))


def _inner(sub: Sub, name: str, keep: Keep | None, limits: ArchiveLimits, depth: int) -> Iterator[Member]:
    """The members of an inner archive (ImageNet's per-class tars), named `<stem>/<member>`; one level only."""
    stem = strip_archive_suffix(name)
    if depth >= 1:
        if keep is None or keep(name):
            yield Member(name, error="nested_archive: archives nested more than two levels deep are not read")
        return
    if sub.seekable():  # a plain outer tar: read the inner one through a window by offset
        raw: Any = Window(sub.parent.raw.file, sub.parent.raw.start + sub.parent.pos, sub.size)
    else:
        raw = sub
    inner_keep = None if keep is None else (lambda n: keep(f"{stem}/{n}"))
    for member in iter_archive_window(raw, name, inner_keep, limits, depth + 1):
        if member.name or keep is None or keep(stem):
            yield Member(f"{stem}/{member.name}" if member.name else stem, member.data, member.error)


def _zip_name(info: zipfile.ZipInfo) -> str:
    """The member name as UTF-8 if it is UTF-8 (flagged or not); otherwise with surrogate escapes."""
    if info.flag_bits & 0x800:
        return info.filename
    raw = info.filename.encode("cp437")  # zipfile decoded the unflagged raw bytes as cp437
    return raw.decode("utf-8", "surrogateescape")


def _zip_problem(info: zipfile.ZipInfo, limits: ArchiveLimits) -> str | None:
    if stat.S_ISLNK(info.external_attr >> 16):
        return "link: member is a symbolic link"
    if info.file_size > limits.member_bytes and not archive_suffix(info.filename):
        return f"member_too_large: {info.file_size:,} bytes, more than the member cap of {limits.member_bytes:,}"
    return None


def _iter_zip(fileobj: BinaryIO, keep: Keep | None, limits: ArchiveLimits, depth: int) -> Iterator[Member]:
    seen: set[str] = set()
    fileobj.seek(0, 2)
    budget, expanded = limits.budget(fileobj.tell()), 0
    fileobj.seek(0)
    with zipfile.ZipFile(fileobj) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            raw_name = _zip_name(info)
            name = printable_name(raw_name)
            problem = name_problem(raw_name, seen) or _zip_problem(info, limits)
            inner = problem is None and archive_suffix(name)
            if keep is not None and not inner and not keep(name):
                continue
            if problem:
                yield Member(name, error=problem)
                continue
            expanded += info.file_size  # the declared size: zipfile never returns more than it
            if expanded > budget:
                yield Member(name, error=f"expansion_budget: members read so far expand to {expanded:,} bytes, "
                             f"past the archive's budget of {budget:,}")
                raise LimitExceeded(f"expansion_budget: the zip's members expand past its budget of {budget:,} "
                                    "bytes; the rest is not read")
            try:
                with zf.open(info) as f:
                    if inner:
                        yield from _inner_zip_member(f, info, name, keep, limits, depth)
                        continue
                    data = read_bounded(f, limits.member_bytes + 1)
                if len(data) > limits.member_bytes:
                    yield Member(name, error=f"member_too_large: over the member cap of {limits.member_bytes:,}")
                else:
                    yield Member(name, data=data)
            except (RuntimeError, zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as exc:
                # encrypted, unsupported compression or a corrupt entry: this member only
                yield Member(name, error=f"unreadable_member: {type(exc).__name__}: {exc}")


def _inner_zip_member(f: BinaryIO, info: zipfile.ZipInfo, name: str, keep: Keep | None, limits: ArchiveLimits,
                      depth: int) -> Iterator[Member]:
    stream = Expansion(f, budget=info.file_size, max_read=limits.member_bytes + 1, seekable=False)
    yield from _inner(Sub(stream, info.file_size), name, keep, limits, depth)
