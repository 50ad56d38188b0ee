"""Preprocessing job (Ray Data): ImageNet-style sources -> DEST/{train,heldout}/*.parquet tensor shards,
DEST/failures.parquet and DEST/manifest.json. Design and format: docs/preprocessing.md.

Run: `coltran preprocess SRC... DEST [options]`, or on a cluster
`ray job submit --working-dir . -- python -m pipelines.preprocess jobs/preprocess.yaml [--set key=value ...]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines.dataset.examples import examples_batch
from pipelines.dataset.format import (
    FAILURE_SCHEMA,
    ROW_SCHEMA,
    SPLITS,
    key_in_split,
    read_tensor_column,
    write_json,
)
from pipelines.dataset.manifest import build_manifest
from pipelines.io.archives import EXPANSION_RATIO, MAX_MEMBER_BYTES, ArchiveLimits
from pipelines.io.s3 import resolve_path
from pipelines.io.shared_path import SharedPathError, require_shared_path
from pipelines.io.sources import SourcePlan, plan_sources
from pipelines.job_config import parse_overrides, read_job_file

__all__ = ["PreprocessSettings", "add_arguments", "main", "read_tensor_column", "run", "run_preprocess"]
log = logging.getLogger(__name__)
FAILURES_STAGING = "_failures"
TASK_CPUS = 1  # the decode's and the write's CPU share: equal to each other and to the file read's (Ray Data's default),
# so Ray fuses read, decode and write into one task per Parquet file


@dataclass
class PreprocessSettings:
    """Everything a preprocessing run depends on; written into the manifest."""

    sources: list[str] = field(default_factory=list)
    dest: str = ""
    labels_file: str | None = None  # `name<sep>label` lines for images without a class folder
    heldout_fraction: float = 0.01  # share of keys (by stable hash) in the held-out split
    train_crops: int = 1  # random-position crops stored per training image
    seed: int = 0  # places the training crops; the split does not depend on it
    min_rows_per_file: int = 1000  # rows per Parquet file, also the images one task decodes and writes
    batch_size: int = 16  # images per decode task batch
    max_pixels: int = 64_000_000  # larger images are failures (decompression bombs)
    min_side: int = 8  # smaller images are failures
    max_member_bytes: int = MAX_MEMBER_BYTES  # larger archive members and image files are failures, never read
    archive_expansion_ratio: float = EXPANSION_RATIO  # an archive may expand to this x its size + one member cap
    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:9000; default: AWS_ENDPOINT_URL or AWS

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        checks = [(bool(self.sources), "sources", "at least one source"), (bool(self.dest), "dest", "a path"),
                  (0.0 <= self.heldout_fraction <= 1.0, "heldout_fraction", "a number in [0, 1]")]
        checks += [(isinstance(getattr(self, n), int) and getattr(self, n) >= 1, n, "an integer >= 1")
                   for n in ("train_crops", "min_rows_per_file", "batch_size", "max_pixels", "min_side",
                             "max_member_bytes")]
        checks.append((isinstance(self.archive_expansion_ratio, int | float) and self.archive_expansion_ratio >= 1,
                       "archive_expansion_ratio", "a number >= 1"))
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"setting {name}={getattr(self, name)!r} is invalid; expected {expected}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSettings:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown preprocess setting(s) {unknown}; valid settings are {valid}")
        return cls(**data)


def _prepare_dest(fs: pafs.FileSystem, dest: str) -> None:
    info = fs.get_file_info(dest)
    if info.type == pafs.FileType.File:
        raise FileExistsError(f"destination {dest!r} is a file; expected a new or empty directory")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(dest)):
        raise FileExistsError(f"destination {dest!r} is not empty; expected a new or empty directory")
    if not _is_object_store(fs):
        fs.create_dir(f"{dest}/{FAILURES_STAGING}", recursive=True)


def _is_object_store(fs: pafs.FileSystem) -> bool:
    """Object stores need no directories, and creating them would leave marker objects above DEST."""
    return fs.type_name in ("s3", "gcs")


def _collect_failures(fs: pafs.FileSystem, dest: str) -> pa.Table:
    """Merge the per-batch failure files into DEST/failures.parquet (deduplicated against task retries)."""
    staging = f"{dest}/{FAILURES_STAGING}"
    listing = fs.get_file_info(pafs.FileSelector(staging, allow_not_found=True))
    files = [i.path for i in listing if i.path.endswith(".parquet")]
    tables = [pq.read_table(p, filesystem=fs, schema=FAILURE_SCHEMA) for p in files]
    table = pa.concat_tables(tables) if tables else FAILURE_SCHEMA.empty_table()
    if table.num_rows:
        table = table.group_by(FAILURE_SCHEMA.names, use_threads=False).aggregate([]).sort_by("key")
    pq.write_table(table.select(FAILURE_SCHEMA.names), f"{dest}/failures.parquet", filesystem=fs)
    if fs.get_file_info(staging).type == pafs.FileType.Directory:
        fs.delete_dir(staging)
    return table


def _write_split(plan: SourcePlan, split: str, settings: PreprocessSettings, fs: pafs.FileSystem, dest: str) -> None:
    key_filter = functools.partial(key_in_split, split=split, heldout_fraction=settings.heldout_fraction)
    crops = settings.train_crops if split == "train" else 1
    files_per_block = max(1, settings.min_rows_per_file // crops)  # one block of inputs -> one Parquet file
    ds = plan.to_dataset(key_filter, rows_per_block=files_per_block).map_batches(
        examples_batch, batch_size=settings.batch_size, batch_format="pyarrow", num_cpus=TASK_CPUS,
        fn_kwargs={"split": split, "train_crops": settings.train_crops, "seed": settings.seed,
                   "max_pixels": settings.max_pixels, "min_side": settings.min_side, "failures_fs": fs,
                   "failures_dir": f"{dest}/{FAILURES_STAGING}"})
    # The read of loose files, the decode and the write ask for the same CPU share (TASK_CPUS), so Ray fuses
    # them: each task reads one block of files, decodes it and writes it as one Parquet file, with no trip of
    # bytes or tensors through the object store. Ray Data's per-operator reservation would hold back CPUs for
    # operators that are cheap here. Measured on 500 ImageNet JPEGs, 2 CPUs (benchmarks/preprocess.py): 10.3 s
    # unfused with reservation, 5.6 s unfused without, 4.2 s with decode and write fused; reading inside the
    # fused task instead of in Ray's read_binary_files tasks took a further 15-20 % off (A/B in one run).
    ds.context.op_resource_reservation_enabled = False
    ds.write_parquet(f"{dest}/{split}", filesystem=fs, min_rows_per_file=settings.min_rows_per_file,
                     try_create_dir=not _is_object_store(fs), ray_remote_args={"num_cpus": TASK_CPUS})
    if not fs.get_file_info(pafs.FileSelector(f"{dest}/{split}", allow_not_found=True)):
        # nothing usable in this split: an empty shard keeps `read_parquet(DEST/split)` and the schema working
        if not _is_object_store(fs):
            fs.create_dir(f"{dest}/{split}", recursive=True)
        pq.write_table(ROW_SCHEMA.empty_table(), f"{dest}/{split}/empty.parquet", filesystem=fs)


def run_preprocess(settings: PreprocessSettings) -> dict[str, Any]:
    """Run the whole job on the current Ray cluster (starting a local one if none is connected); return the
    manifest that was written to DEST/manifest.json."""
    started = time.time()
    fs, dest = resolve_path(settings.dest, s3_endpoint=settings.s3_endpoint)
    if not ray.is_initialized():
        ray.init()
    require_shared_path(settings.dest, "preprocessing DEST")  # every node's tasks write Parquet files there
    plan = plan_sources(settings.sources, labels_file=settings.labels_file, s3_endpoint=settings.s3_endpoint,
                        limits=ArchiveLimits(settings.max_member_bytes, settings.archive_expansion_ratio))
    _prepare_dest(fs, dest)
    log.info("preprocess: %d files and %d archives in %d source(s), %d classes -> %s",
             plan.num_files, plan.num_archives, len(settings.sources), len(plan.labeling.classes), settings.dest)
    for split in SPLITS:
        if (split == "heldout" and settings.heldout_fraction == 0) or \
                (split == "train" and settings.heldout_fraction == 1):
            continue
        log.info("preprocess: writing split %r", split)
        _write_split(plan, split, settings, fs, dest)
    failures = _collect_failures(fs, dest)
    manifest = build_manifest(fs, dest, settings=dataclasses.asdict(settings), classes=plan.labeling.classes,
                              failures=failures, seconds=time.time() - started)
    write_json(fs, f"{dest}/manifest.json", manifest)
    log.info("preprocess: done in %.1f s: %s, %d failures", manifest["seconds"],
             {s: v["images"] for s, v in manifest["splits"].items()}, manifest["failures"]["count"])
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `coltran preprocess SRC... DEST`."""
    d = PreprocessSettings
    parser.add_argument("paths", nargs="+", metavar="SRC... DEST",
                        help="sources (folders, image files, .tar/.tar.gz/.zip archives, s3:// prefixes), then DEST")
    parser.add_argument("--labels-file", default=None, help="name<sep>label lines for images without class folders")
    parser.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    parser.add_argument("--train-crops", type=int, default=d.train_crops)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--min-rows-per-file", type=int, default=d.min_rows_per_file)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels)
    parser.add_argument("--min-side", type=int, default=d.min_side)
    parser.add_argument("--max-member-bytes", type=int, default=d.max_member_bytes,
                        help="larger archive members and image files are failures, never read (default 128 MiB)")
    parser.add_argument("--archive-expansion-ratio", type=float, default=d.archive_expansion_ratio,
                        help="an archive may expand to this x its stored size + one member cap (default 20)")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    """`coltran preprocess`: build settings from parsed arguments and run the job."""
    if len(args.paths) < 2:
        raise SystemExit(f"coltran preprocess needs SRC... DEST, got {args.paths}")
    names = [f.name for f in dataclasses.fields(PreprocessSettings) if f.name not in ("sources", "dest")]
    settings = PreprocessSettings(sources=args.paths[:-1], dest=args.paths[-1],
                                  **{n: getattr(args, n) for n in names})
    return _run_reporting_refusals(settings)


def _run_reporting_refusals(settings: PreprocessSettings) -> int:
    """Run the job; 2 with the message when DEST is a local path that not every node sees."""
    try:
        run_preprocess(settings)
    except SharedPathError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


def load_settings(path: str, overrides: list[str]) -> PreprocessSettings:
    """Settings from a YAML job file plus `key=value` overrides (values parsed as YAML)."""
    return PreprocessSettings.from_dict({**read_job_file(path), **parse_overrides(overrides)})


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.preprocess JOB.yaml [--set key=value ...]` (the `ray job submit` entrypoint)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.preprocess", description=__doc__)
    parser.add_argument("job", help="YAML job file (see jobs/preprocess.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return _run_reporting_refusals(load_settings(args.job, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
