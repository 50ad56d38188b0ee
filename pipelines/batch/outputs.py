"""Where a batch job's outputs go and how they are written: input key -> a sanitised path under DEST (never
outside it), the per-image seed derived from the base seed and the key, and atomic writes (local: a temporary
file in DEST/_tmp renamed into place; S3: one PUT, visible only when complete).

The naming rule, shared with the single-file `coltran colorize` (coltran.colorize_files.output_name): colouring k
of the input key `dir/name.ext` is `DEST/dir/name_s<k>.<png|jpg>`. Keys mirror the inputs: a folder or archive
given alone contributes its members' relative paths; with several sources, each folder or archive gets its own
folder named after it (`photos/`, `photos-2/`, `more/` for more.tar.gz), while image files go straight under DEST
(a repeated file name gets its parent folder's name, deduplicated the same way)."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid

import pyarrow.fs as pafs

TMP_DIR = "_tmp"
RESERVED = ("_tmp", "_manifest_parts", "_batch_state.json", "manifest.parquet", "contact_sheet.png")
EXTENSIONS = {"png": "png", "jpeg": "jpg"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
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
    """DEST-relative path of colouring `sample` of `key`: <key's folders>/<name without its image extension>_s<k>.<ext>
    (`beach/beach_006.jpg` -> `beach/beach_006_s0.png`). A top-level name the job uses itself (RESERVED) gets a hash
    like any changed key. The one ambiguity, documented in docs/batch.md: two files of one folder that differ only
    in their image extension (`a.jpg`, `a.png`) share their output names."""
    if fmt not in EXTENSIONS:
        raise ValueError(f"output format must be one of {sorted(EXTENSIONS)}, got {fmt!r}")
    safe = key_path(key)
    top, sep, rest = safe.partition("/")
    if top in RESERVED:  # `_tmp/x.jpg` -> `_tmp~<hash>/x_s0.png`: never inside the job's own files
        safe = f"{top}~{hashlib.sha1(key.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}{sep}{rest}"
    path = f"{output_stem(safe)}_s{int(sample)}.{EXTENSIONS[fmt]}"
    normal = posixpath.normpath(path)
    if normal != path or normal.startswith(("/", "../")):  # cannot happen after key_path; checked anyway
        raise ValueError(f"output path {path!r} for key {key!r} would leave the destination")
    return path


def output_stem(path: str) -> str:
    """`path` without a trailing image extension (any case); other suffixes stay (`scan.v2` -> `scan.v2`)."""
    root, ext = posixpath.splitext(path)
    return root if ext.lower() in IMAGE_SUFFIXES and posixpath.basename(root) else path


def source_labels(sources: list[str]) -> dict[str, str]:
    """Key prefix per source when there are several (like `cp -r a b.tar c.jpg DEST` giving DEST/a, DEST/b and
    DEST/c.jpg): a folder or archive gets its last path component without an archive or Parquet suffix, '-2',
    '-3'... for repeats; an image file gets none unless its name repeats, then its parent folder's name (deduplicated
    the same way). One source gets no prefix."""
    from pipelines.io.archives import strip_archive_suffix

    if len(sources) == 1:
        return {sources[0]: ""}
    labels, seen, names = {}, set(), set()
    for src in sources:
        parent, _, name = src.rstrip("/").rpartition("/")
        if strip_archive_suffix(name) == name and posixpath.splitext(name)[1].lower() in IMAGE_SUFFIXES:
            if output_stem(name) not in names:  # an image file: straight under DEST, like the single-file CLI
                names.add(output_stem(name))
                labels[src] = ""
                continue
            name = parent.rsplit("/", 1)[-1] or "_"
        base = key_path(strip_archive_suffix(name).removesuffix(".parquet"))
        label, n = base, 1
        while label in seen or label in names:
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


def write_contact_sheet(out: str, sources: list[str], *, s3_endpoint: str | None = None, max_rows: int = 12,
                        cell: int = 160) -> str | None:
    """DEST/contact_sheet.png from a finished job's manifest: per done input (the first `max_rows`) the gray input,
    its colourings and the original where it is a local file with colour (for other inputs the gray is the outputs'
    luma, which is the input's within rounding). Returns its path, or None when no input was done."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from coltran.contact_sheet import compose, row_from_images
    from pipelines.io.s3 import resolve_path

    fs, dest = resolve_path(out, s3_endpoint=s3_endpoint)
    labels = source_labels(sources)
    rows = [r for r in pq.read_table(f"{dest}/manifest.parquet", filesystem=fs).to_pylist()
            if r["status"] in ("done", "skipped") and r["outputs"]]
    sheet = []
    for row in sorted(rows, key=lambda r: r["key"])[:max_rows]:
        samples = [np.asarray(Image.open(io.BytesIO(read_bytes(fs, f"{dest}/{p}"))).convert("RGB"))
                   for p in row["outputs"]]
        original = _local_original(row["source"], row["key"], labels.get(row["source"], ""))
        if original is None or original.size != (samples[0].shape[1], samples[0].shape[0]):
            original = None
        source = np.asarray(original) if original is not None else samples[0]
        entry = row_from_images(row["key"], source, samples)
        if original is None:
            entry.original = None  # the first colouring stood in for the gray input: it is no original
        sheet.append(entry)
    if not sheet:
        return None
    buffer = io.BytesIO()
    Image.fromarray(compose(sheet, cell)).save(buffer, format="PNG", optimize=True)
    put_bytes(fs, dest, "contact_sheet.png", buffer.getvalue())
    return f"{out.rstrip('/')}/contact_sheet.png"


def _local_original(source: str, key: str, label: str):
    """The input's own pixels (RGB PIL image) when it is a local file: the source itself or a folder member."""
    from PIL import Image, ImageOps

    path = source
    if os.path.isdir(source):
        path = os.path.join(source, key.removeprefix(f"{label}/") if label else key)
    if "://" in source or not os.path.isfile(path):
        return None
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except OSError:
        return None
