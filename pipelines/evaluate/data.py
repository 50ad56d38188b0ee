"""The images of an evaluation as Ray Datasets: which keys are evaluated and which form the disjoint reference set
(sorted key order, like "the first 5,000 validation images"), read from preprocessed Parquet datasets or image
sources (centre crop, area resize to 256x256), as rows of uint8 tensors; content digests to check disjointness."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from coltran.imageio import decode_image
from coltran.transforms import prepare_example
from pipelines.batch.outputs import image_seed, source_labels
from pipelines.batch.sources import parquet_paths
from pipelines.dataset.format import read_tensor_column
from pipelines.inference.columns import objects
from pipelines.io.parquet import read_parquet
from pipelines.io.s3 import resolve_path
from pipelines.io.sources import plan_sources

ROW_SHAPES = {"gray_64": (64, 64), "gray_256": (256, 256), "rgb_64": (64, 64, 3), "truth_256": (256, 256, 3)}
PREPARE = "center crop, area resize to 256x256 (coltran.transforms.prepare_example)"


@dataclass(frozen=True)
class Candidate:
    source: str
    raw_key: str  # the key the reader gives
    key: str  # labelled with the source's prefix when there are several sources


@dataclass(frozen=True)
class KeySet:
    """Picklable key filter for the reader: only the selected keys are read (loose files) or kept (archives)."""

    keys: frozenset[str]

    def __call__(self, key: str) -> bool:
        return key in self.keys


def _parquet_location(source: str, split: str, s3_endpoint: str | None) -> tuple[object, str] | None:
    fs, path = resolve_path(source, s3_endpoint=s3_endpoint)
    found = parquet_paths(fs, path)
    if found is None:
        return None
    by_prefix = dict((prefix, location) for location, prefix in found)
    if "" in by_prefix:
        return fs, by_prefix[""]
    if split not in by_prefix:
        raise ValueError(f"dataset {source!r} has splits {sorted(by_prefix)}, not the requested split {split!r}")
    return fs, by_prefix[split]


def _source_keys(source: str, split: str, s3_endpoint: str | None) -> list[str]:
    """Every key of one source: Parquet key columns (first crop only), listed files, or archive members."""
    parquet = _parquet_location(source, split, s3_endpoint)
    if parquet is not None:
        fs, location = parquet
        table = pads.dataset(location, filesystem=fs, format="parquet").to_table(columns=["key", "crop_index"])
        return table.filter(pc.equal(table["crop_index"], 0))["key"].to_pylist()
    plan = plan_sources([source], infer_labels=False, s3_endpoint=s3_endpoint)
    if not plan.num_archives:
        return [key for files in plan.files for _, key in files]
    rows = plan.to_dataset().select_columns(["key", "error"]).take_all()  # archive members must be streamed past
    return [row["key"] for row in rows if row["error"] is None]


def list_candidates(sources: list[str], split: str, s3_endpoint: str | None = None) -> list[Candidate]:
    """All images of `sources` in sorted (labelled) key order; the first crop of a preprocessed image only."""
    if not sources:
        raise ValueError("expected at least one source of images, got none")
    labels = source_labels(sources)
    found = []
    for source in sources:
        for raw in _source_keys(source, split, s3_endpoint):
            found.append(Candidate(source, raw, f"{labels[source]}/{raw}" if labels[source] else raw))
    keys = [c.key for c in found]
    if len(set(keys)) != len(keys):
        raise ValueError(f"sources {sources} name some images twice; expected unique keys")
    return sorted(found, key=lambda c: c.key)


def select(candidates: list[Candidate], start: int, count: int, what: str) -> list[Candidate]:
    chosen = candidates[start:start + count]
    if len(chosen) < count:
        raise ValueError(f"{what}: asked for {count} images from position {start}, but the sources hold "
                         f"{len(candidates)} (only {len(chosen)} there); lower the count or add images")
    return chosen


def _rows(keys: list[str], seeds: list[int], gray: list[bool], arrays: dict[str, list[np.ndarray]]) -> dict:
    out = {"key": objects(keys), "seed": np.array(seeds, np.int64), "was_grayscale": np.array(gray, bool)}
    for name, shape in ROW_SHAPES.items():
        out[name] = np.stack(arrays[name]) if keys else np.zeros((0, *shape), np.uint8)
    return out


def parquet_rows(batch: pa.Table, *, labels: dict[str, str], seed: int) -> dict:
    """Preprocessed rows (already centre-cropped and resized) of the selected raw keys (`labels`: raw key ->
    labelled key) -> evaluation rows."""
    keep = pc.and_(pc.is_in(batch["key"], value_set=pa.array(sorted(labels), pa.string())),
                   pc.equal(batch["crop_index"], 0))
    batch = batch.filter(keep)
    named = [labels[k] for k in batch["key"].to_pylist()]
    arrays = {name: list(read_tensor_column(batch, "rgb_256" if name == "truth_256" else name))
              for name in ROW_SHAPES}
    return _rows(named, [image_seed(seed, k) for k in named], batch["was_grayscale"].to_pylist(), arrays)


def image_rows(batch: dict, *, labels: dict[str, str], seed: int) -> dict:
    """Source rows {key, bytes, error} -> evaluation rows; unreadable images are left out (the driver reports
    selected keys that never arrive)."""
    keys, seeds, gray, arrays = [], [], [], {name: [] for name in ROW_SHAPES}
    for raw, data, error in zip(batch["key"], batch["bytes"], batch["error"], strict=True):
        if error is not None or raw not in labels:
            continue
        try:
            decoded = decode_image(data)
            example = prepare_example(decoded.rgb, "center")
        except Exception:  # noqa: BLE001 - one unreadable image is reported by the driver, not raised
            continue
        keys.append(labels[raw])
        seeds.append(image_seed(seed, labels[raw]))
        gray.append(decoded.was_grayscale)
        for name in ROW_SHAPES:
            arrays[name].append(example["rgb_256" if name == "truth_256" else name])
    return _rows(keys, seeds, gray, arrays)


def rows_dataset(chosen: list[Candidate], *, split: str, seed: int, s3_endpoint: str | None = None,
                 batch_size: int = 8, num_cpus: float = 0.25, task_args: dict | None = None) -> ray.data.Dataset:
    """Evaluation rows {key, seed, was_grayscale, gray_64, gray_256, rgb_64, truth_256} of the chosen images;
    `task_args` place the reading tasks (the resource plan's CPU pool)."""
    parts, task_args = [], task_args or {}
    for source in sorted({c.source for c in chosen}):
        labels = {c.raw_key: c.key for c in chosen if c.source == source}
        parquet = _parquet_location(source, split, s3_endpoint)
        common = {"batch_size": batch_size, "num_cpus": num_cpus, **task_args}
        if parquet is not None:
            fs, location = parquet
            columns = ["key", "crop_index", "was_grayscale", "gray_64", "gray_256", "rgb_64", "rgb_256"]
            ds = read_parquet(location, fs, columns=columns, ray_remote_args=task_args)
            parts.append(ds.map_batches(parquet_rows, batch_format="pyarrow", **common,
                                        fn_kwargs={"labels": labels, "seed": seed}))
        else:
            plan = plan_sources([source], infer_labels=False, s3_endpoint=s3_endpoint)
            ds = plan.to_dataset(KeySet(frozenset(labels)), task_args=task_args)
            parts.append(ds.map_batches(image_rows, batch_format="numpy", **common,
                                        fn_kwargs={"labels": labels, "seed": seed}))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def digest_batch(batch: dict, *, role: str) -> dict:
    """{role, key, digest (sha1 of the 256x256 pixels), was_grayscale} per row: the identity of its content."""
    digests = [hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest() for img in batch["truth_256"]]
    return {"role": objects([role] * len(digests)), "key": batch["key"], "digest": objects(digests),
            "was_grayscale": batch["was_grayscale"]}


def digests(datasets: dict[str, ray.data.Dataset],
            task_args: dict | None = None) -> dict[str, dict[str, tuple[str, bool]]]:
    """role -> key -> (content digest, was_grayscale) of evaluation-rows datasets, in one Ray Data pass (its
    tasks placed by `task_args`, as the reading tasks are)."""
    parts = [ds.map_batches(digest_batch, batch_format="numpy", fn_kwargs={"role": role}, **(task_args or {}))
             for role, ds in datasets.items()]
    out: dict[str, dict[str, tuple[str, bool]]] = {role: {} for role in datasets}
    for batch in parts[0].union(*parts[1:]).iter_batches(batch_size=None, batch_format="numpy"):
        for role, key, digest, gray in zip(batch["role"], batch["key"], batch["digest"], batch["was_grayscale"],
                                           strict=True):
            out[str(role)][str(key)] = (str(digest), bool(gray))
    return out
