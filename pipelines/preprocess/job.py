"""Preprocessing job (Ray Data): ImageNet-style sources -> DEST/{train,heldout}/*.parquet tensor shards,
DEST/failures.parquet and DEST/manifest.json. Design and format: docs/preprocessing.md.

Run: `coltran preprocess SRC... DEST [options]`, or on a cluster
`ray job submit --working-dir . -- python -m pipelines.preprocess jobs/preprocess.yaml [--set key=value ...]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines.dataset.format import ROW_SCHEMA, SPLITS, read_manifest, read_tensor_column, write_json
from pipelines.dataset.manifest import build_manifest
from pipelines.io.archives import EXPANSION_RATIO, MAX_MEMBER_BYTES, ArchiveLimits
from pipelines.io.s3 import resolve_path
from pipelines.io.shared_path import SharedPathError, require_shared_path
from pipelines.io.sources import SourcePlan, plan_sources
from pipelines.job_config import parse_overrides, read_job_file
from pipelines.preprocess.items import concurrency, process_items
from pipelines.preprocess.progress import (
    DestMismatch,
    done_items,
    merge_failures,
    open_dest,
    remove_progress,
    work_items_digest,
)

__all__ = ["PreprocessSettings", "add_arguments", "main", "read_tensor_column", "run", "run_preprocess"]
log = logging.getLogger(__name__)
TASK_CPUS = 1  # one work item (read, decode, write) per task and CPU


@dataclass
class PreprocessSettings:
    """Everything a preprocessing run depends on; written into the manifest."""

    sources: list[str] = field(default_factory=list)
    dest: str = ""
    labels_file: str | None = None  # `name<sep>label` lines for images without a class folder
    heldout_fraction: float = 0.01  # share of keys (by stable hash) in the held-out split
    train_crops: int = 1  # random-position crops stored per training image
    seed: int = 0  # places the training crops; the split does not depend on it
    min_rows_per_file: int = 1000  # rows per Parquet file at most; files or tar members per work item = this / crops
    batch_size: int = 16  # images decoded between two Parquet row-group writes
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


def _is_object_store(fs: pafs.FileSystem) -> bool:
    """Object stores need no directories, and creating them would leave marker objects above DEST."""
    return fs.type_name in ("s3", "gcs")


def _cpu_pool_placement() -> dict:
    """Pin the tasks to cluster/'s CPU pool (nodes labelled pool=cpu) when the cluster has a node there that can run
    one; else no selector (a laptop, a cluster without pools). The batch and evaluation jobs do the same through
    their resource plan (pipelines.inference.plan.TASK_POOL)."""
    for node in ray.nodes():
        if (node.get("Alive") and (node.get("Labels") or {}).get("pool") == "cpu"
                and (node.get("Resources") or {}).get("CPU", 0.0) >= TASK_CPUS):
            return {"label_selector": {"pool": "cpu"}}
    return {}


def _write_items(plan: SourcePlan, items: list[dict[str, Any]], done: set[str], settings: PreprocessSettings,
                 fs: pafs.FileSystem, dest: str) -> dict[str, int]:
    """Run the work items not finished yet, one fused read -> decode -> write task each (TASK_CPUS): neither bytes
    nor tensors pass through the object store, only one summary row per item comes back."""
    todo = [item for item in items if item["id"] not in done]
    log.info("preprocess: %d work items, %d finished by an earlier run, %d to do", len(items), len(done), len(todo))
    if not todo:
        return concurrency([])
    ds = ray.data.from_items([{"item": json.dumps(item)} for item in todo], override_num_blocks=len(todo))
    placement = _cpu_pool_placement()  # decoding belongs on the CPU pool, not on training nodes
    if placement:
        log.info("preprocess: tasks on the nodes labelled %s", placement["label_selector"])
    ds = ds.map_batches(process_items, batch_size=1, batch_format="pyarrow", num_cpus=TASK_CPUS, **placement,
                        fn_kwargs={"plan": plan.for_tasks(), "settings": dataclasses.asdict(settings), "fs": fs,
                                   "dest": dest})
    # Ray Data's per-operator reservation would hold back CPUs for operators that are cheap here (measured on
    # 500 ImageNet JPEGs, 2 CPUs, benchmarks/preprocess.py: 10.3 s with it, 5.6 s without, 4.2 s fused).
    ds.context.op_resource_reservation_enabled = False
    every, summaries = max(1, len(todo) // 20), []
    for n, row in enumerate(ds.iter_rows(), 1):
        summaries.append(row)
        if n % every == 0 or n == len(todo):
            log.info("preprocess: %d/%d work items written", n + len(done), len(items))
    return concurrency(summaries)


def _finish_splits(settings: PreprocessSettings, fs: pafs.FileSystem, dest: str) -> None:
    """An empty shard for a split that got no rows keeps `read_parquet(DEST/split)` and the schema working; a split
    the fraction rules out (0 or 1) gets no folder."""
    for split in _splits(settings):
        if not fs.get_file_info(pafs.FileSelector(f"{dest}/{split}", allow_not_found=True)):
            if not _is_object_store(fs):
                fs.create_dir(f"{dest}/{split}", recursive=True)
            pq.write_table(ROW_SCHEMA.empty_table(), f"{dest}/{split}/empty.parquet", filesystem=fs)


def _splits(settings: PreprocessSettings) -> list[str]:
    return [s for s in SPLITS if not (s == "heldout" and settings.heldout_fraction == 0)
            and not (s == "train" and settings.heldout_fraction == 1)]


def run_preprocess(settings: PreprocessSettings, *, source_filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """Run the whole job on the current Ray cluster (starting a local one if none is connected); return the
    manifest written to DEST/manifest.json. On a DEST an earlier run of the same job left unfinished it writes
    only the missing work items; on one it finished it writes nothing. `source_filesystem` reads the sources
    through a given pyarrow filesystem (tests count bytes with one)."""
    started = time.time()
    fs, dest = resolve_path(settings.dest, s3_endpoint=settings.s3_endpoint)
    if not ray.is_initialized():
        ray.init()
    require_shared_path(settings.dest, "preprocessing DEST")  # every node's tasks write Parquet files there
    plan = plan_sources(settings.sources, filesystem=source_filesystem, labels_file=settings.labels_file,
                        s3_endpoint=settings.s3_endpoint,
                        limits=ArchiveLimits(settings.max_member_bytes, settings.archive_expansion_ratio))
    items = plan.work_items(rows_per_block=max(1, settings.min_rows_per_file // settings.train_crops))
    state = open_dest(fs, dest, dataclasses.asdict(settings), [i["id"] for i in items], _is_object_store(fs))
    if state == "complete":
        remove_progress(fs, dest)  # a run stopped between its manifest and this clean-up
        log.info("preprocess: %s already holds this job's finished dataset; nothing to do", settings.dest)
        return read_manifest(fs, dest)
    if state == "new" and not _is_object_store(fs):
        for split in _splits(settings):
            fs.create_dir(f"{dest}/{split}", recursive=True)
    log.info("preprocess: %d files and %d archives in %d source(s), %d classes -> %s (%s)", plan.num_files,
             plan.num_archives, len(settings.sources), len(plan.labeling.classes), settings.dest, state)
    execution = _write_items(plan, items, done_items(fs, dest), settings, fs, dest)
    _finish_splits(settings, fs, dest)
    failures = merge_failures(fs, dest)
    manifest = build_manifest(fs, dest, settings=dataclasses.asdict(settings), classes=plan.labeling.classes,
                              failures=failures, seconds=time.time() - started)
    manifest["work_items"] = work_items_digest([i["id"] for i in items])
    manifest["execution"] = execution  # this run's share: items it ran, worker processes, most items at once
    write_json(fs, f"{dest}/manifest.json", manifest)
    remove_progress(fs, dest)
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
    """Run the job; 2 with the message when DEST is a local path that not every node sees, or holds something
    other than this job's output (another job's dataset or unfinished run, unrelated files)."""
    try:
        run_preprocess(settings)
    except (SharedPathError, DestMismatch) as err:
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
