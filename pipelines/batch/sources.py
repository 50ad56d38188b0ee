"""The batch job's inputs as one Ray Dataset of prepared rows: image sources (folders, files, archives, S3
prefixes) through the shared reader and the decode + prepare stage, and preprocessed Parquet datasets, whose
gray tensors are already there (they hold no full-resolution pixels, so their outputs are always 256x256)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from pipelines.batch.outputs import image_seed
from pipelines.batch.resume import DoneKeys
from pipelines.batch.settings import BatchSettings
from pipelines.batch.tasks import JobContext, prepare_batch
from pipelines.dataset.format import read_manifest, read_tensor_column
from pipelines.inference.columns import objects
from pipelines.io.parquet import read_parquet
from pipelines.io.s3 import resolve_path
from pipelines.io.sources import plan_sources

PARQUET_COLUMNS = ["key", "crop_index", "orig_height", "orig_width", "was_grayscale", "gray_64", "gray_256"]


@dataclass(frozen=True)
class NotDone:
    """Key filter for the reader: loose files finished by an earlier attempt are dropped from the listing on the
    driver, archive members inside the reading task before their bytes are extracted (tar) or read (zip). It
    pickles as a prefix and an object reference, whatever the number of finished keys."""

    prefix: str
    done: DoneKeys

    def __call__(self, key: str) -> bool:
        return (f"{self.prefix}/{key}" if self.prefix else key) not in self.done


def parquet_paths(fs: pafs.FileSystem, path: str) -> list[tuple[str, str]] | None:
    """[(directory or file, key prefix)] when `path` is a preprocessed dataset (DEST/manifest.json: one entry per
    split, keys `<split>/<key>`), a directory of .parquet files or one .parquet file; None for image sources."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(path, "")] if path.endswith(".parquet") else None
    if info.type != pafs.FileType.Directory:
        return None
    if fs.get_file_info(f"{path}/manifest.json").type == pafs.FileType.File:
        try:
            manifest = read_manifest(fs, path)
        except ValueError:
            return None
        return [(f"{path}/{split}", split) for split in manifest["splits"]  # a split without rows has no folder
                if fs.get_file_info(f"{path}/{split}").type == pafs.FileType.Directory]
    files = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    if files and all(i.path.endswith(".parquet") for i in files):
        return [(path, "")]
    return None


def parquet_batch(batch: pa.Table, *, ctx: JobContext, source: str, prefix: str) -> dict[str, np.ndarray]:
    """Rows of a preprocessed dataset -> prepared rows (crops after the first are keyed `<key>#crop<i>`)."""
    start = time.perf_counter()
    crops = batch.column("crop_index").to_pylist()
    raw = [("/".join(filter(None, [prefix, k])) + (f"#crop{c}" if c else ""))
           for k, c in zip(batch.column("key").to_pylist(), crops, strict=True)]
    keep = [ctx.key(source, k) not in ctx.done for k in raw]
    batch = batch.filter(pa.array(keep, pa.bool_()))
    raw = [k for k, kept in zip(raw, keep, strict=True) if kept]
    count = len(raw)
    out = {"key": objects([ctx.key(source, k) for k in raw]), "source": objects([source] * count),
           "resolution": objects(["256"] * count), "seed": np.array([image_seed(ctx.seed, k) for k in raw], np.int64),
           "height": pc.cast(batch.column("orig_height"), pa.int32()).to_numpy(),
           "width": pc.cast(batch.column("orig_width"), pa.int32()).to_numpy(),
           "was_grayscale": np.asarray(batch.column("was_grayscale").to_pylist(), bool),
           "gray_64": read_tensor_column(batch, "gray_64"), "gray_256": read_tensor_column(batch, "gray_256")}
    out["prepare_s"] = np.full(count, (time.perf_counter() - start) / max(1, count))
    if ctx.resolution == "full":
        out["full_res"] = objects([None] * count)  # no full-resolution pixels: the write keeps the 256x256 outputs
        out["full_res_kind"] = objects([None] * count)
    return out


def build_inputs(settings: BatchSettings, ctx: JobContext,
                 task_args: dict | None = None) -> tuple[ray.data.Dataset, list[str]]:
    """The prepared rows of every source, and the sources that are Parquet (their outputs are 256x256); `task_args`
    place the reading and preparing tasks (the resource plan's CPU pool)."""
    task_args = task_args or {}
    parts, parquet_sources = [], []
    for src in settings.sources:
        fs, path = resolve_path(src, s3_endpoint=settings.s3_endpoint)
        found = parquet_paths(fs, path)
        if found is not None:
            parquet_sources.append(src)
            for location, prefix in found:
                ds = read_parquet(location, fs, columns=PARQUET_COLUMNS, ray_remote_args=task_args)
                parts.append(ds.map_batches(parquet_batch, batch_format="pyarrow", batch_size=settings.prepare.batch_size,
                                            num_cpus=settings.prepare.num_cpus, **task_args,
                                            fn_kwargs={"ctx": ctx, "source": src, "prefix": prefix}))
            continue
        plan = plan_sources([src], infer_labels=False, s3_endpoint=settings.s3_endpoint)
        # Archive members too are filtered before they are read: a duplicate member, whose error row shares its key
        # with a finished image, is not seen again, and the merge keeps its earlier row (manifest.merge_parts).
        key_filter = NotDone(ctx.labels.get(src, ""), ctx.done) if ctx.done else None
        parts.append(plan.to_dataset(key_filter, task_args=task_args).map_batches(
            prepare_batch, batch_format="numpy", batch_size=settings.prepare.batch_size,
            num_cpus=settings.prepare.num_cpus, **task_args, fn_kwargs={"ctx": ctx}))
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), parquet_sources
