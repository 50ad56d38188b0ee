"""A preprocessing DEST as a record that a rerun can finish: DEST/_progress/job.json (the settings and work items
the run started with), one marker per finished work item and its failures, merged and removed at the end. The same
command on the same DEST resumes; a DEST made with other settings or from changed sources is refused."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.dataset.format import FAILURE_SCHEMA, read_manifest, write_json

PROGRESS = "_progress"
RUNTIME_SETTINGS = ("dest", "batch_size", "s3_endpoint")  # how a run reaches its data, not what it writes


class DestMismatch(FileExistsError):
    """DEST holds something this run must not write into or resume (exit status 2)."""


def output_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what is written; a DEST is resumed only with exactly these."""
    return {k: v for k, v in settings.items() if k not in RUNTIME_SETTINGS}


def work_items_digest(item_ids: list[str]) -> dict[str, Any]:
    return {"count": len(item_ids), "sha1": hashlib.sha1("\n".join(sorted(item_ids)).encode()).hexdigest()}


def _differences(have: dict[str, Any], want: dict[str, Any]) -> str:
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return "; ".join(f"{k}: {have.get(k)!r} in DEST, {want.get(k)!r} now" for k in keys)


def open_dest(fs: pafs.FileSystem, dest: str, settings: dict[str, Any], item_ids: list[str],
              object_store: bool) -> str:
    """"new" (DEST was new or empty; job.json written), "resume" (an unfinished run of the same job) or
    "complete" (a finished run of the same job); raises DestMismatch for anything else."""
    record = {"settings": output_settings(settings), "work_items": work_items_digest(item_ids)}
    info = fs.get_file_info(dest)
    if info.type == pafs.FileType.File:
        raise DestMismatch(f"destination {dest!r} is a file; expected a new or empty directory or a DEST of this job")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(dest)):
        if fs.get_file_info(f"{dest}/manifest.json").type == pafs.FileType.File:
            manifest = read_manifest(fs, dest)
            done = {"settings": output_settings(manifest["settings"]), "work_items": manifest.get("work_items")}
            if done == record:
                return "complete"
            raise DestMismatch(f"destination {dest!r} holds a finished dataset of another job ("
                               f"{_differences(done['settings'], record['settings']) or 'other sources'}); "
                               "give a new DEST, or the same settings to keep it")
        if fs.get_file_info(f"{dest}/{PROGRESS}/job.json").type == pafs.FileType.File:
            with fs.open_input_stream(f"{dest}/{PROGRESS}/job.json") as f:
                started = json.loads(f.read())
            if started == record:
                return "resume"
            what = _differences(started["settings"], record["settings"]) or (
                f"the sources now give {record['work_items']['count']} work items, DEST was started with "
                f"{started['work_items']['count']} (sha1 {started['work_items']['sha1'][:12]}): the sources changed")
            raise DestMismatch(f"destination {dest!r} holds an unfinished run of another job ({what}); rerun it "
                               "with the settings it was started with, or give a new DEST")
        raise DestMismatch(f"destination {dest!r} is not empty and holds no preprocessing run; expected a new or "
                           "empty directory or a DEST of this job")
    if not object_store:
        for sub in ("done", "failures"):
            fs.create_dir(f"{dest}/{PROGRESS}/{sub}", recursive=True)
    write_json(fs, f"{dest}/{PROGRESS}/job.json", record)
    return "new"


def done_items(fs: pafs.FileSystem, dest: str) -> set[str]:
    """Ids of the work items an earlier attempt finished (their marker is written after all their files)."""
    listing = fs.get_file_info(pafs.FileSelector(f"{dest}/{PROGRESS}/done", allow_not_found=True))
    return {i.base_name[:-len(".json")] for i in listing if i.base_name.endswith(".json")}


def read_markers(fs: pafs.FileSystem, dest: str) -> list[dict[str, Any]]:
    out = []
    for info in fs.get_file_info(pafs.FileSelector(f"{dest}/{PROGRESS}/done", allow_not_found=True)):
        with fs.open_input_stream(info.path) as f:
            out.append(json.loads(f.read()))
    return out


def mark_done(fs: pafs.FileSystem, dest: str, marker: dict[str, Any], failures: pa.Table) -> None:
    """Record one finished work item: its failures first, then the marker that says all its files are written."""
    if failures.num_rows:
        pq.write_table(failures, f"{dest}/{PROGRESS}/failures/{marker['id']}.parquet", filesystem=fs)
    path = f"{dest}/{PROGRESS}/done/{marker['id']}.json"
    if fs.type_name in ("s3", "gcs"):  # an object appears whole or not at all
        write_json(fs, path, marker)
    else:  # a rename is atomic: a killed task never leaves half a marker
        write_json(fs, f"{path}.tmp", marker)
        fs.move(f"{path}.tmp", path)


def merge_failures(fs: pafs.FileSystem, dest: str) -> pa.Table:
    """The work items' failures as DEST/failures.parquet, one row per input (a retried task wrote the same file)."""
    listing = fs.get_file_info(pafs.FileSelector(f"{dest}/{PROGRESS}/failures", allow_not_found=True))
    tables = [pq.read_table(i.path, filesystem=fs, schema=FAILURE_SCHEMA) for i in listing
              if i.path.endswith(".parquet")]
    table = pa.concat_tables(tables) if tables else FAILURE_SCHEMA.empty_table()
    if table.num_rows:
        table = table.group_by(FAILURE_SCHEMA.names, use_threads=False).aggregate([]).sort_by("key")
    table = table.select(FAILURE_SCHEMA.names)
    pq.write_table(table, f"{dest}/failures.parquet", filesystem=fs)
    return table


def remove_progress(fs: pafs.FileSystem, dest: str) -> None:
    if fs.get_file_info(f"{dest}/{PROGRESS}").type == pafs.FileType.Directory:
        fs.delete_dir(f"{dest}/{PROGRESS}")
