"""One work item, one task: read its source rows (pipelines.io.sources), decode each image once, and write both
splits' rows as Parquet parts named after the item (DEST/<split>/<item id>-<part>.parquet), so a retried or rerun
task overwrites its own files and never another's; then its failures and its done marker (progress.py)."""

from __future__ import annotations

import itertools
import json
import os
import posixpath
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.dataset.examples import failures_table, rows_to_table, split_examples
from pipelines.dataset.format import ROW_SCHEMA, SPLITS
from pipelines.io.sources import SourcePlan
from pipelines.preprocess.progress import mark_done

SUMMARY_SCHEMA = pa.schema([("id", pa.string()), ("train", pa.int64()), ("heldout", pa.int64()),
                            ("failures", pa.int64()), ("pid", pa.int64()), ("start", pa.float64()),
                            ("end", pa.float64())])


def concurrency(summaries: list[dict[str, Any]]) -> dict[str, int]:
    """How this run's work items ran: items, distinct worker processes, and the most items in progress at once
    (from each item's start and end time)."""
    events = sorted([(s["start"], 1) for s in summaries] + [(s["end"], -1) for s in summaries])
    running = peak = 0
    for _, step in events:  # an end sorts before a start at the same instant: touching is not overlapping
        running += step
        peak = max(peak, running)
    return {"items_run": len(summaries), "processes": len({s["pid"] for s in summaries}), "max_concurrent": peak}


class PartWriter:
    """Rows of one split of one work item -> `<item id>-<part>.parquet` files of at most `rows_per_file` rows,
    written a decode batch (one row group) at a time, so a task holds one batch of tensors, not its item's."""

    def __init__(self, fs: pafs.FileSystem, folder: str, item_id: str, rows_per_file: int) -> None:
        self.fs, self.folder, self.item_id, self.rows_per_file = fs, folder, item_id, rows_per_file
        self.part, self.in_part, self.rows, self.files = 0, 0, 0, []
        self.writer: pq.ParquetWriter | None = None

    def write(self, rows: list[dict[str, Any]]) -> None:
        while rows:
            if self.writer is None:
                path = f"{self.folder}/{self.item_id}-{self.part:04d}.parquet"
                self.writer = pq.ParquetWriter(path, ROW_SCHEMA, filesystem=self.fs)
                self.files.append(path)
            take, rows = rows[:self.rows_per_file - self.in_part], rows[self.rows_per_file - self.in_part:]
            self.writer.write_table(rows_to_table(take))
            self.in_part += len(take)
            self.rows += len(take)
            if self.in_part >= self.rows_per_file:
                self._close_part()

    def _close_part(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.in_part, self.part = None, 0, self.part + 1

    def close(self) -> list[str]:
        self._close_part()
        return self.files


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while batch := list(itertools.islice(rows, size)):
        yield batch


def process_item(item: dict[str, Any], *, plan: SourcePlan, settings: dict[str, Any], fs: pafs.FileSystem,
                 dest: str) -> dict[str, Any]:
    """Read, decode and write one work item; returns and records its marker (counts, files, pid, start/end)."""
    start = time.time()
    rows_per_file = settings["min_rows_per_file"]
    writers = {split: PartWriter(fs, f"{dest}/{split}", item["id"], rows_per_file) for split in SPLITS}
    failures: list[dict[str, str]] = []
    options = {k: settings[k] for k in ("heldout_fraction", "train_crops", "seed", "max_pixels", "min_side")}
    for batch in _batches(plan.item_rows(item), settings["batch_size"]):
        rows, failed = split_examples(batch, **options)
        failures += failed
        for split, split_rows in rows.items():
            writers[split].write(split_rows)
    files = [path for w in writers.values() for path in w.close()]
    marker = {"id": item["id"], "files": [posixpath.relpath(p, dest) for p in files],
              **{split: w.rows for split, w in writers.items()}, "failures": len(failures),
              "pid": os.getpid(), "start": start, "end": time.time()}
    mark_done(fs, dest, marker, failures_table(failures))
    return marker


def process_items(batch: pa.Table, *, plan: SourcePlan, settings: dict[str, Any], fs: pafs.FileSystem,
                  dest: str) -> pa.Table:
    """Ray Data `map_batches` function over {item: JSON}: one row per finished work item."""
    markers = [process_item(json.loads(text), plan=plan, settings=settings, fs=fs, dest=dest)
               for text in batch.column("item").to_pylist()]
    return pa.Table.from_pylist([{k: m[k] for k in SUMMARY_SCHEMA.names} for m in markers], schema=SUMMARY_SCHEMA)
