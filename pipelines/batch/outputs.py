"""Where a batch job's outputs go and how they are written: input key -> a sanitised path under DEST (never
outside it), the per-image seed derived from the base seed and the key, and atomic writes (local: a temporary
file in DEST/_tmp renamed into place; S3: one PUT, visible only when complete)."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid

import pyarrow.fs as pafs

IMAGES_DIR = "images"
TMP_DIR = "_tmp"
EXTENSIONS = {"png": "png", "jpeg": "jpg"}
MAX_COMPONENT_BYTES = 200  # file systems allow 255; leave room for the `_s<k>.png` suffix
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def image_seed(base_seed: int, key: str) -> int:
    """The seed of one image: a stable hash of (base seed, key), the same on every machine and in every batch
    composition; non-negative, below 2**31. Sample k of the image is the k-th draw stream of this seed."""
    digest = hashlib.sha256(f"{int(base_seed)}\x00{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def _clean_component(part: str) -> str:
    """One path component made safe: control characters -> '_', '..' -> '__', long names shortened with a hash."""
    if part in ("", "."):
        return ""
    if part == "..":
        return "__"
    part = _UNSAFE_CHARS.sub("_", part.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    raw = part.encode("utf-8")
    if len(raw) > MAX_COMPONENT_BYTES:
        digest = hashlib.sha1(raw).hexdigest()[:10]
        part = raw[: MAX_COMPONENT_BYTES - 11].decode("utf-8", "ignore") + "~" + digest
    return part


def key_path(key: str) -> str:
    """A relative POSIX path for `key` with no empty, '.', '..' or absolute components (backslashes split too).
    A key that had to be changed gets a hash of the original appended, so two keys never share a path."""
    parts = [p for p in (_clean_component(c) for c in re.split(r"[/\\]+", key)) if p] or ["_"]
    path = "/".join(parts)
    if path != key:
        path += "~" + hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return path


def output_relpath(key: str, sample: int, fmt: str) -> str:
    """DEST-relative path of colouring `sample` of `key`: images/<key path>_s<sample>.<ext>. The key keeps its
    extension (`a.jpg` and `a.png` in one folder must not collide)."""
    if fmt not in EXTENSIONS:
        raise ValueError(f"output format must be one of {sorted(EXTENSIONS)}, got {fmt!r}")
    path = f"{IMAGES_DIR}/{key_path(key)}_s{int(sample)}.{EXTENSIONS[fmt]}"
    normal = posixpath.normpath(path)
    if normal != path or normal.startswith(("/", "../")):  # cannot happen after key_path; checked anyway
        raise ValueError(f"output path {path!r} for key {key!r} would leave the destination")
    return path


def source_labels(sources: list[str]) -> dict[str, str]:
    """Key prefix per source when there are several (like `cp -r a b DEST` giving DEST/a, DEST/b): the last path
    component without an archive or Parquet suffix, '-2', '-3'... for repeats; one source gets no prefix."""
    from pipelines.io.archives import strip_archive_suffix

    if len(sources) == 1:
        return {sources[0]: ""}
    labels, seen = {}, set()
    for src in sources:
        base = key_path(strip_archive_suffix(src.rstrip("/").rsplit("/", 1)[-1]).removesuffix(".parquet"))
        label, n = base, 1
        while label in seen:
            n += 1
            label = f"{base}-{n}"
        seen.add(label)
        labels[src] = label
    return labels


def put_bytes(fs: pafs.FileSystem, dest: str, relpath: str, data: bytes) -> None:
    """Write DEST/relpath atomically: readers see the old file or the whole new one, never a part."""
    target = f"{dest}/{relpath}"
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp_dir = f"{dest}/{TMP_DIR}"
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = f"{tmp_dir}/{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    with fs.open_output_stream(target) as f:  # S3: a single PUT (or multipart upload completed on close)
        f.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()
