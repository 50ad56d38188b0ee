"""Class labels of raw inputs: class folders (sorted names -> index, ImageNet's wnid order) and labels files
(`name<sep>label` per line, as in ImageNet's LOC_val_solution.csv or Tiny ImageNet's val_annotations.txt)."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow.fs as pafs

HEADER_NAMES = {"file", "filename", "file_name", "image", "imageid", "image_id", "name", "path"}


@dataclass(frozen=True)
class Labeling:
    """Maps a key to its label: the index of its first directory among `classes`, else the labels file's
    entry for its file name (with or without extension), else None."""

    classes: tuple[str, ...] = ()
    by_file: dict[str, int] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)

    def label(self, key: str) -> int | None:
        first, sep, _ = key.partition("/")
        if sep and first in self.index:
            return self.index[first]
        name = posixpath.basename(key)
        if name in self.by_file:
            return self.by_file[name]
        return self.by_file.get(posixpath.splitext(name)[0])


def parse_labels(text: str, where: str = "labels file") -> dict[str, str]:
    """{file name: raw label} from lines `name,label`, `name<TAB>label` or `name label`; only the first
    whitespace-separated token after the separator is the label (so `ImageId,n01751748 255 142 ...` works).
    Blank lines and `#` comments are skipped, and a first line naming a column (`filename,label`) is a header."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sep = "," if "," in line else ("\t" if "\t" in line else None)
        if sep:
            name, _, rest = line.partition(sep)
        else:
            name, rest = (line.split(None, 1) + [""])[:2]
        tokens = rest.split()
        if number == 1 and name.strip().lower() in HEADER_NAMES:
            continue
        if not tokens:
            raise ValueError(f"{where} line {number}: expected 'name<sep>label', got {line!r}")
        out[name.strip()] = tokens[0]
    return out


def read_labels_file(fs: pafs.FileSystem, path: str) -> dict[str, str]:
    with fs.open_input_stream(path) as f:
        return parse_labels(f.read().decode("utf-8"), where=path)


def _is_int(value: str) -> bool:
    return value.lstrip("-").isdigit()


def build_labeling(class_names: Iterable[str], labels_file: tuple[pafs.FileSystem, str] | None = None) -> Labeling:
    """Labeling from the class folders found and an optional labels file. Integer labels in the file are used
    as they are; class names in it join the folder names in one sorted index."""
    raw = read_labels_file(*labels_file) if labels_file else {}
    names = set(class_names)
    values = set(raw.values())
    if values and all(_is_int(v) for v in values):
        by_file = {k: int(v) for k, v in raw.items()}
    else:
        if any(_is_int(v) for v in values):
            raise ValueError(f"labels file {labels_file[1]!r} mixes integer labels and class names; "
                             "expected one kind")
        names |= values
        by_file = {}
    classes = tuple(sorted(names))
    index = {c: i for i, c in enumerate(classes)}
    if not by_file:
        by_file = {k: index[v] for k, v in raw.items()}
    return Labeling(classes=classes, by_file=by_file, index=index)
