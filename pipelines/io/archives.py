"""Archive members as data, never extracted: tar (stream mode, so .tar.gz/.bz2/.xz too) and zip (random access),
each member yielded as bytes or as an error naming why it is unsafe or unreadable ('..', absolute, link,
special file, duplicate, non-UTF-8 name, too large)."""

from __future__ import annotations

import io
import posixpath
import re
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow.fs as pafs

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (*TAR_SUFFIXES, ".zip")
MAX_MEMBER_BYTES = 1 << 30  # an inner ImageNet class tar is ~150 MB; anything past 1 GiB is refused, not read
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Member:
    """One archive member: `name` as stored (non-UTF-8 bytes shown as \\xNN), and bytes or `error`.

    `error` is "reason: message"; `name` is "" for an error about the archive as a whole.
    """

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


def list_member_names(fs: pafs.FileSystem, path: str) -> list[str]:
    """Member names (files only) of an archive, reading as little as the format allows: the zip central
    directory, plain tar headers by seeking over the data; compressed tars must be decompressed to list."""
    if path.lower().endswith(".zip"):
        with fs.open_input_file(path) as f, zipfile.ZipFile(f) as zf:
            return [i.filename for i in zf.infolist() if not i.is_dir()]
    if path.lower().endswith(".tar"):
        with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            return [m.name for m in tf if not m.isdir()]
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        return [m.name for m in tf if not m.isdir()]


def iter_archive(fs: pafs.FileSystem, path: str, keep: Callable[[str], bool] | None = None) -> Iterator[Member]:
    """Stream the members of the archive at `path`; `keep(name)` False skips a member without reading it."""
    try:
        if path.lower().endswith(".zip"):
            with fs.open_input_file(path) as f:
                yield from _iter_zip(f, keep)
        else:
            with fs.open_input_stream(path) as f:
                yield from _iter_tar(f, keep)
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, ValueError) as exc:
        yield Member("", error=f"unreadable_archive: {type(exc).__name__}: {exc}")


def iter_archive_bytes(data: bytes, name: str, keep: Callable[[str], bool] | None = None) -> Iterator[Member]:
    """Like `iter_archive` for an archive held in memory (an inner tar of ImageNet's tar of tars)."""
    try:
        if name.lower().endswith(".zip"):
            yield from _iter_zip(io.BytesIO(data), keep)
        else:
            yield from _iter_tar(io.BytesIO(data), keep)
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, ValueError) as exc:
        yield Member("", error=f"unreadable_archive: {type(exc).__name__}: {exc}")


def _tar_problem(info: tarfile.TarInfo) -> str | None:
    if info.issym() or info.islnk():
        return f"link: member is a {'symbolic' if info.issym() else 'hard'} link to {info.linkname!r}"
    if not info.isreg():
        return "special_file: member is a device, FIFO or other non-regular file"
    if info.size > MAX_MEMBER_BYTES:
        return f"member_too_large: {info.size} bytes, more than the {MAX_MEMBER_BYTES} allowed"
    return None


def _iter_tar(fileobj: BinaryIO, keep: Callable[[str], bool] | None) -> Iterator[Member]:
    seen: set[str] = set()
    with tarfile.open(fileobj=fileobj, mode="r|*", encoding="utf-8", errors="surrogateescape") as tf:
        for info in tf:
            if info.isdir():
                continue
            name = printable_name(info.name)
            problem = name_problem(info.name, seen) or _tar_problem(info)
            if keep is not None and archive_suffix(name) is None and not keep(name):
                continue
            if problem:
                yield Member(name, error=problem)
            else:
                yield Member(name, data=tf.extractfile(info).read())


def _zip_name(info: zipfile.ZipInfo) -> str:
    """The member name as UTF-8 if it is UTF-8 (flagged or not); otherwise with surrogate escapes."""
    if info.flag_bits & 0x800:
        return info.filename
    raw = info.filename.encode("cp437")  # zipfile decoded the unflagged raw bytes as cp437
    return raw.decode("utf-8", "surrogateescape")


def _zip_problem(info: zipfile.ZipInfo) -> str | None:
    if stat.S_ISLNK(info.external_attr >> 16):
        return "link: member is a symbolic link"
    if info.file_size > MAX_MEMBER_BYTES:
        return f"member_too_large: {info.file_size} bytes, more than the {MAX_MEMBER_BYTES} allowed"
    return None


def _iter_zip(fileobj: BinaryIO, keep: Callable[[str], bool] | None) -> Iterator[Member]:
    seen: set[str] = set()
    with zipfile.ZipFile(fileobj) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            raw_name = _zip_name(info)
            name = printable_name(raw_name)
            problem = name_problem(raw_name, seen) or _zip_problem(info)
            if keep is not None and archive_suffix(name) is None and not keep(name):
                continue
            if problem:
                yield Member(name, error=problem)
                continue
            try:
                yield Member(name, data=zf.read(info))
            except (RuntimeError, zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as exc:
                # encrypted, unsupported compression or a corrupt entry: this member only
                yield Member(name, error=f"unreadable_member: {type(exc).__name__}: {exc}")
