"""The one reader layer: image files, folder trees and archives (tar, ImageNet's tar of tars, .tar.gz, zip) on
any pyarrow filesystem -> a Ray Dataset {key, bytes, label, error, source}, one row per input; unsafe or
unreadable archive members are rows with `error` and no bytes. Keys and labels: docs/preprocessing.md."""

from __future__ import annotations

import collections
import hashlib
import json
import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from pipelines.io.archives import (
    MAX_MEMBER_BYTES,
    ArchiveLimits,
    Member,
    TarEntry,
    Window,
    archive_suffix,
    index_tar,
    iter_archive,
    iter_archive_window,
    list_member_names,
    name_problem,
    read_bounded,
    strip_archive_suffix,
)
from pipelines.io.labels import Labeling, build_labeling
from pipelines.io.s3 import resolve_path

SOURCE_SCHEMA = pa.schema([("key", pa.string()), ("bytes", pa.binary()), ("label", pa.int64()),
                           ("error", pa.string()), ("source", pa.string())])
KeyFilter = Callable[[str], bool]


def split_error(error: str) -> tuple[str, str]:
    """("reason", "message") of an `error` value written as "reason: message"."""
    reason, _, message = error.partition(": ")
    return reason, message


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


@dataclass
class SourcePlan:
    """What the driver found by listing the sources: loose files and archives, grouped by filesystem. A plain tar
    is indexed from its headers (`index`), so its members and inner archives can be read by offset in many tasks."""

    filesystems: list[pafs.FileSystem] = field(default_factory=list)
    roots: list[list[tuple[str, str, bool]]] = field(default_factory=list)  # per fs: (root, source, is a file)
    files: list[list[tuple[str, str]]] = field(default_factory=list)  # per fs: (path, key)
    archives: list[list[dict[str, Any]]] = field(default_factory=list)  # per fs: path, prefix, key, source, index
    labeling: Labeling = field(default_factory=Labeling)
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)

    @property
    def num_files(self) -> int:
        return sum(len(f) for f in self.files)

    @property
    def num_archives(self) -> int:
        return sum(len(a) for a in self.archives)

    def work_items(self, rows_per_block: int = 32, key_filter: KeyFilter | None = None,
                   files: bool = True) -> list[dict[str, Any]]:
        """The sources cut into independent pieces of work, each with a stable `id` (the same plan gives the same
        items): blocks of `rows_per_block` loose files, blocks of a plain tar's members, one item per inner archive
        of a plain tar (read by offset), and one per compressed tar or zip (a compressed stream cannot be split).
        Loose files and a plain tar's members are filtered on the listing, before anything is read."""
        if rows_per_block < 1:
            raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
        items: list[dict[str, Any]] = []
        for fs_index, (file_list, archives) in enumerate(zip(self.files, self.archives, strict=True)):
            paths = [p for p, key in file_list if key_filter is None or key_filter(key)] if files else []
            items += [{"kind": "files", "fs": fs_index, "paths": paths[i:i + rows_per_block]}
                      for i in range(0, len(paths), rows_per_block)]
            for archive in archives:
                items += _archive_items(fs_index, archive, rows_per_block, key_filter)
        for item in items:
            item["id"] = f"{item['kind']}-{hashlib.sha1(json.dumps(item, sort_keys=True).encode()).hexdigest()[:16]}"
        return items

    def to_dataset(self, key_filter: KeyFilter | None = None, rows_per_block: int = 32,
                   task_args: dict | None = None) -> ray.data.Dataset:
        """The rows of every source whose key passes `key_filter` (a picklable function of the key); `task_args`
        (e.g. a label_selector) place the reading tasks.

        Loose files are filtered on the listing, before they are read, and read inside the task that consumes
        them, `rows_per_block` files to a block (so a consumer that writes one file per block gets files of that
        size and fuses with the read); archives are read as work items (`work_items`), one task each."""
        if rows_per_block < 1:
            raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
        parts = []
        for fs, roots, files in zip(self.filesystems, self.roots, self.files, strict=True):
            paths = [p for p, key in files if key_filter is None or key_filter(key)]
            if paths:
                listing = pa.table({"path": paths})
                ds = ray.data.from_arrow([listing.slice(i, rows_per_block)
                                          for i in range(0, len(paths), rows_per_block)])
                parts.append(ds.map_batches(_file_rows, batch_format="pyarrow", batch_size=None, **(task_args or {}),
                                            fn_kwargs={"filesystem": fs, "roots": roots, "labeling": self.labeling,
                                                       "limit": self.limits.member_bytes}))
        items = self.work_items(rows_per_block, key_filter, files=False)
        if items:
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.flat_map(_item_rows, **(task_args or {}),
                             fn_kwargs={"plan": self.for_tasks(), "key_filter": key_filter})
            parts.append(ds.map_batches(_conform, batch_format="pyarrow", batch_size=None, **(task_args or {}),
                                        fn_kwargs={"labeling": self.labeling}))
        if not parts:
            return ray.data.from_arrow(SOURCE_SCHEMA.empty_table())
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    def for_tasks(self) -> SourcePlan:
        """This plan without its listings (work items carry their own part), to ship to every task."""
        return SourcePlan(self.filesystems, self.roots, [[] for _ in self.files], [[] for _ in self.archives],
                          self.labeling, self.limits)

    def item_rows(self, item: dict[str, Any], key_filter: KeyFilter | None = None) -> Iterator[dict[str, Any]]:
        """The source rows {key, bytes, label, error, source} of one work item, read where this runs."""
        fs = self.filesystems[item["fs"]]
        if item["kind"] == "files":
            for path in item["paths"]:
                key, source = _key_of(path, self.roots[item["fs"]])
                data, error = read_file_bytes(fs, path, self.limits.member_bytes)
                yield _row(key, source, data, error, self.labeling)
            return
        prefix, source = item["prefix"], item["source"]
        keep = None if key_filter is None else (lambda name: key_filter(join_key(prefix, name)))
        for member in _item_members(fs, item, keep, self.limits):
            if member.name or key_filter is None or key_filter(item["key"]):
                key = join_key(prefix, member.name) if member.name else item["key"]  # "": the archive itself
                yield _row(key, source, member.data, member.error, self.labeling)


def _archive_items(fs_index: int, archive: dict[str, Any], rows_per_block: int,
                   key_filter: KeyFilter | None) -> list[dict[str, Any]]:
    base = {"fs": fs_index, **{k: archive[k] for k in ("path", "prefix", "key", "source")}}
    index: list[TarEntry] | None = archive.get("index")
    if index is None:
        return [{"kind": "archive", **base}]
    items, members = [], []
    for entry in index:
        if entry.is_archive:
            items.append({"kind": "inner", **base, "entry": [entry.name, entry.offset, entry.size]})
        elif key_filter is None or key_filter(join_key(base["prefix"], entry.name) if entry.name else base["key"]):
            members.append([entry.name, entry.offset, entry.size, entry.error])
    items += [{"kind": "members", **base, "entries": members[i:i + rows_per_block]}
              for i in range(0, len(members), rows_per_block)]
    return items


def _item_members(fs: pafs.FileSystem, item: dict[str, Any], keep: Callable[[str], bool] | None,
                  limits: ArchiveLimits) -> Iterator[Member]:
    """Members of an archive work item: the whole archive streamed, one inner archive read through a window by
    offset, or a run of a plain tar's members read by offset (through one window over their span). An archive
    that cannot be opened or read any more (gone, cut, a failing store) gives error rows, never a failed task."""
    if item["kind"] == "archive":
        yield from iter_archive(fs, item["path"], keep, limits)
        return
    names = [strip_archive_suffix(item["entry"][0])] if item["kind"] == "inner" else [e[0] for e in item["entries"]]
    done = 0
    try:
        with fs.open_input_file(item["path"]) as f:
            for member in _window_members(f, item, keep, limits):
                done += member.name in names
                yield member
    except OSError as exc:
        for name in names[done:]:
            yield Member(name, error=f"unreadable_archive: {type(exc).__name__}: {exc}")


def _window_members(f: Any, item: dict[str, Any], keep: Callable[[str], bool] | None,
                    limits: ArchiveLimits) -> Iterator[Member]:
    if item["kind"] == "inner":
        name, offset, size = item["entry"]
        stem = strip_archive_suffix(name)
        inner_keep = None if keep is None else (lambda n: keep(f"{stem}/{n}"))
        for member in iter_archive_window(Window(f, offset, size), name, inner_keep, limits, depth=1):
            if member.name or keep is None or keep(stem):
                yield Member(f"{stem}/{member.name}" if member.name else stem, member.data, member.error)
        return
    readable = [(o, n) for _, o, n, e in item["entries"] if e is None]
    start = min((o for o, _ in readable), default=0)
    window = Window(f, start, max((o + n for o, n in readable), default=start) - start)
    for name, offset, size, error in item["entries"]:
        if error is not None:
            yield Member(name, error=error)
        else:
            window.seek(offset - start)
            yield Member(name, data=read_bounded(window, size))


def plan_sources(srcs: list[str], *, filesystem: pafs.FileSystem | None = None, labels_file: str | None = None,
                 infer_labels: bool = True, s3_endpoint: str | None = None,
                 limits: ArchiveLimits | None = None) -> SourcePlan:
    """List every source once on the driver (pyarrow's recursive listing), index plain tars from their headers,
    and work out keys and labels (other archives are scanned for class names only when labels are inferred)."""
    if not srcs:
        raise ValueError("expected at least one source path or URI, got none")
    plan, fs_index, seen = SourcePlan(limits=limits or ArchiveLimits()), {}, []
    labels_at = resolve_path(labels_file, filesystem, s3_endpoint) if labels_file else None
    class_names: set[str] = set()
    for src in srcs:
        fs, path = resolve_path(src, filesystem, s3_endpoint)
        idx = fs_index.setdefault(fs.type_name if filesystem is None else "given", len(plan.filesystems))
        if idx == len(plan.filesystems):
            plan.filesystems.append(fs)
            plan.roots.append([]), plan.files.append([]), plan.archives.append([]), seen.append(set())
        root, entries = _list_source(fs, path, src, labels_at[1] if labels_at else None)
        single = root != path  # the source is one file, not a directory
        plan.roots[idx].append((path, src, single))
        stems = collections.Counter(strip_archive_suffix(k) for _, k in entries if archive_suffix(k))
        for file_path, key in entries:
            if file_path in seen[idx]:  # listed by an earlier source too: one input, read once
                continue
            seen[idx].add(file_path)
            if archive_suffix(file_path) is None:
                plan.files[idx].append((file_path, key))
                if infer_labels and "/" in key:
                    class_names.add(key.split("/", 1)[0])
                continue
            # `x.tar` contributes `x/` to its members' keys unless another archive (`x.zip`) has the same stem
            prefix = "" if single else (strip_archive_suffix(key) if stems[strip_archive_suffix(key)] == 1 else key)
            index = index_tar(fs, file_path, plan.limits)
            plan.archives[idx].append({"path": file_path, "prefix": prefix, "key": key, "source": src, "index": index})
            if infer_labels:
                class_names |= _archive_classes(fs, file_path, prefix, index, plan.limits)
    if infer_labels:
        plan.labeling = build_labeling(class_names, labels_at)
    return plan


def read_sources(srcs: list[str], *, filesystem: pafs.FileSystem | None = None, labels_file: str | None = None,
                 infer_labels: bool = True, key_filter: KeyFilter | None = None,
                 s3_endpoint: str | None = None) -> ray.data.Dataset:
    """Dataset of {key, bytes, label, error, source} over `srcs` (paths, `s3://` or other pyarrow URIs, each a
    directory, an image file or an archive). With `infer_labels=False` nothing is scanned and labels are null."""
    plan = plan_sources(srcs, filesystem=filesystem, labels_file=labels_file, infer_labels=infer_labels,
                        s3_endpoint=s3_endpoint)
    return plan.to_dataset(key_filter)


def _list_source(fs: pafs.FileSystem, path: str, src: str,
                 skip_path: str | None) -> tuple[str, list[tuple[str, str]]]:
    """(root, [(file path, key relative to root)]) of one source; a single file's root is its folder."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return posixpath.dirname(path), [(path, posixpath.basename(path))]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"source {src!r} is neither a file nor a directory (looked for {path!r})")
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    entries = sorted((i.path, posixpath.relpath(i.path, path)) for i in listing
                     if i.type == pafs.FileType.File and i.path != skip_path)
    if not entries:
        raise FileNotFoundError(f"source {src!r} holds no files")
    return path, entries


def _archive_classes(fs: pafs.FileSystem, path: str, prefix: str, index: list[TarEntry] | None,
                     limits: ArchiveLimits) -> set[str]:
    """Class names (first key directories) that the archive's members will have: from the prefix when the
    archive sits in a directory source, else from its safe member names (`n01440764/x.JPEG`, `n01440764.tar`)."""
    if prefix:
        return {prefix.split("/", 1)[0]}
    classes = set()
    names = [e.name for e in index if e.name] if index is not None else list_member_names(fs, path, limits)
    for name in names:
        if name_problem(name, set()) is not None:
            continue
        if "/" in name:
            classes.add(name.split("/", 1)[0])
        elif archive_suffix(name):
            classes.add(strip_archive_suffix(name))
    return classes


def _row(key: str, source: str, data: bytes | None, error: str | None, labeling: Labeling) -> dict[str, Any]:
    return {"key": key, "bytes": data, "label": labeling.label(key), "error": error, "source": source}


def _item_rows(item: dict[str, Any], *, plan: SourcePlan, key_filter: KeyFilter | None) -> Iterator[dict[str, Any]]:
    yield from plan.item_rows(item, key_filter)


def _conform(batch: pa.Table, *, labeling: Labeling) -> pa.Table:
    keys = batch.column("key").to_pylist()
    return pa.table({"key": keys, "bytes": batch.column("bytes").cast(pa.binary()),
                     "label": pa.array([labeling.label(k) for k in keys], pa.int64()),
                     "error": batch.column("error").cast(pa.string()),
                     "source": batch.column("source").cast(pa.string())}, schema=SOURCE_SCHEMA)


def _key_of(path: str, roots: list[tuple[str, str, bool]]) -> tuple[str, str]:
    """(key, source) of a loose file: its name for a single-file source, else its path below the deepest
    directory source holding it."""
    for root, src, single in roots:
        if single and path == root:
            return posixpath.basename(path), src
    root, src, _ = max((r for r in roots if not r[2] and path.startswith(r[0].rstrip("/") + "/")),
                       key=lambda r: len(r[0]))
    return posixpath.relpath(path, root), src


def read_file_bytes(fs: pafs.FileSystem, path: str, limit: int = MAX_MEMBER_BYTES) -> tuple[bytes | None, str | None]:
    """(bytes, None) of one file, or (None, "reason: message") when it cannot be read: gone, unreadable, or over
    `limit` bytes (never read past it). Transient errors are retried twice; they are rare, and a failure row is
    the job's record of the input either way."""
    for attempt in range(3):
        try:
            with fs.open_input_stream(path) as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                return None, f"file_too_large: file is over the limit of {limit:,} bytes; not read"
            return data, None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            return None, f"unreadable_file: {type(exc).__name__}: {exc}"
        except OSError as exc:
            if attempt == 2:
                return None, f"unreadable_file: {type(exc).__name__}: {exc} (after 3 attempts)"
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _file_rows(batch: pa.Table, *, filesystem: pafs.FileSystem, roots: list[tuple[str, str, bool]],
               labeling: Labeling, limit: int = MAX_MEMBER_BYTES) -> pa.Table:
    """Read a block of listed files: {path} -> source rows; a file that cannot be read is an `error` row."""
    paths = batch.column("path").to_pylist()
    keys, sources = zip(*(_key_of(p, roots) for p in paths), strict=True) if paths else ((), ())
    data, errors = zip(*(read_file_bytes(filesystem, p, limit) for p in paths), strict=True) if paths else ((), ())
    return pa.table({"key": list(keys), "bytes": pa.array(data, pa.binary()),
                     "label": pa.array([labeling.label(k) for k in keys], pa.int64()),
                     "error": pa.array(errors, pa.string()), "source": list(sources)}, schema=SOURCE_SCHEMA)
