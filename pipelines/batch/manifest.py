"""The record of a batch run in DEST: per-batch manifest parts written atomically as items finish
(DEST/_manifest_parts/*.parquet), compacted by the driver while the job runs (so start and finish read a number of
files that does not grow with the number of write batches, in one pyarrow dataset call), the run state
(DEST/_batch_state.json: settings fingerprint, attempt counter), and the merge of the parts into
DEST/manifest.parquet, one row per input (resume rules: docs in pipelines/batch/job.py).
"""

from __future__ import annotations

import datetime
import io
import json
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.batch.outputs import TMP_DIR, put_bytes, read_bytes

PARTS_DIR = "_manifest_parts"
STATE_FILE = "_batch_state.json"
MANIFEST_FILE = "manifest.parquet"
STATE_FORMAT = "coltran-batch-state"
COMPACTED = ("-compact-", "-merged-")  # name marks of parts that hold many batches (never compacted again)
STAGES = ("colorizer", "color_upsampler", "spatial_upsampler")
TIMINGS = ("prepare_s", "colorizer_s", "color_upsampler_s", "spatial_upsampler_s", "write_s")
MANIFEST_SCHEMA = pa.schema(
    [("key", pa.string()), ("source", pa.string()), ("status", pa.string()), ("reason", pa.string()),
     ("message", pa.string()), ("stage", pa.string()), ("outputs", pa.list_(pa.string())), ("seed", pa.int64()),
     ("num_samples", pa.int32()), ("height", pa.int32()), ("width", pa.int32()), ("out_height", pa.int32()),
     ("out_width", pa.int32()), ("was_grayscale", pa.bool_()), ("resolution", pa.string())]
    + [(f"{stage}_model", pa.string()) for stage in STAGES]
    + [("attempt", pa.int32()), ("finished_at", pa.timestamp("ms", tz="UTC"))]
    + [(name, pa.float64()) for name in TIMINGS])


class ResumeError(RuntimeError):
    """DEST holds the outputs of a run with other settings (or is not a batch destination)."""


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_part(fs: pafs.FileSystem, dest: str, rows: list[dict[str, Any]], attempt: int, tag: str = "") -> str:
    """One Parquet part with `rows` (MANIFEST_SCHEMA fields; missing ones null), written atomically."""
    table = pa.Table.from_pylist([{**r, "attempt": attempt} for r in rows], schema=MANIFEST_SCHEMA)
    relpath = f"{PARTS_DIR}/a{attempt:05d}-{tag}{uuid.uuid4().hex}.parquet"
    put_bytes(fs, dest, relpath, table_bytes(table))
    return relpath


def read_parts(fs: pafs.FileSystem, dest: str, small_only: bool = False) -> tuple[pa.Table, list[str]]:
    """All manifest parts in DEST (empty table when none) and their paths, read in one pyarrow dataset call (one
    listing, files read by Arrow's threads); `small_only`: only the per-batch parts not compacted yet."""
    directory = f"{dest}/{PARTS_DIR}"
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return MANIFEST_SCHEMA.empty_table(), []
    listing = fs.get_file_info(pafs.FileSelector(directory))
    paths = sorted(i.path for i in listing if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                   and not (small_only and any(mark in i.base_name for mark in COMPACTED)))
    if not paths:
        return MANIFEST_SCHEMA.empty_table(), []
    return pads.dataset(paths, filesystem=fs, format="parquet", schema=MANIFEST_SCHEMA).to_table(), paths


def compact_parts(fs: pafs.FileSystem, dest: str, attempt: int, min_parts: int = 2) -> int:
    """Rewrite the per-batch parts written so far as one part (written before they are deleted: a kill in between
    leaves duplicates, which the merge drops). Called by the driver while the job runs. Returns the parts merged."""
    table, paths = read_parts(fs, dest, small_only=True)
    if len(paths) < min_parts:
        return 0
    put_bytes(fs, dest, f"{PARTS_DIR}/a{attempt:05d}-compact-{uuid.uuid4().hex}.parquet", table_bytes(table))
    for path in paths:
        fs.delete_file(path)
    return len(paths)


def identity(key: str, read_error: str | None = None) -> str:
    """One input's identity (the scalar form of `identities`); `read_error`: the reader's reason, if any."""
    return f"{key}\x00{read_error}" if read_error is not None else key


def identities(table: pa.Table) -> pa.ChunkedArray:
    """Row identity: the key; a reader error row (stage 'read', e.g. a duplicate archive member name) is its own
    input even where a readable member has the same key, so it is key + NUL + reason."""
    keys, reasons = table.column("key"), pc.fill_null(table.column("reason"), "")
    return pc.if_else(pc.equal(pc.fill_null(table.column("stage"), ""), "read"),
                      pc.binary_join_element_wise(keys, reasons, "\x00"), keys)


def done_identities(table: pa.Table) -> pa.ChunkedArray:
    """The identities of the rows with status done (duplicates possible: parts may repeat rows)."""
    return pc.filter(identities(table), pc.equal(table.column("status"), "done"))


def begin_attempt(fs: pafs.FileSystem, dest: str, fingerprint: dict[str, Any]) -> int:
    """Check DEST against the run's fingerprint, count this attempt (1 for a new DEST) and clear stale temporaries."""
    info = fs.get_file_info(f"{dest}/{STATE_FILE}")
    state = {"format": STATE_FORMAT, "version": 1, "fingerprint": fingerprint, "attempts": 0}
    if info.type == pafs.FileType.File:
        state = json.loads(read_bytes(fs, info.path))
        theirs = state.get("fingerprint", {})
        ours = json.loads(json.dumps(fingerprint))
        changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if state.get("format") != STATE_FORMAT or changed:
            details = "; ".join(f"{k}: earlier {theirs.get(k)!r}, now {ours.get(k)!r}" for k in changed)
            raise ResumeError(f"{dest} holds the outputs of a batch run with other settings ({details}); "
                              "re-run with the same settings to resume it, or choose a new --out")
    elif fs.get_file_info(f"{dest}/{MANIFEST_FILE}").type == pafs.FileType.File:
        raise ResumeError(f"{dest} has a {MANIFEST_FILE} but no {STATE_FILE}: not a batch destination; "
                          "choose a new --out")
    state["attempts"] = int(state["attempts"]) + 1
    put_bytes(fs, dest, STATE_FILE, json.dumps(state, indent=1).encode())
    if isinstance(fs, pafs.LocalFileSystem):
        fs.delete_dir_contents(f"{dest}/{TMP_DIR}", missing_dir_ok=True)
    return state["attempts"]


def _first_of_runs(ids: pa.Array) -> pa.Array:
    """True where a sorted array starts a run of equal values."""
    if len(ids) == 0:
        return pa.array([], pa.bool_())
    return pa.concat_arrays([pa.array([True]), pc.not_equal(ids[1:], ids[:-1])])


def merge_parts(parts: pa.Table, attempt: int) -> tuple[pa.Table, pa.Table]:
    """(record, manifest) from every part row. Per identity: this attempt's row (done before failed, then the
    latest) if it saw the input; else the latest earlier 'done' row, reported as 'skipped' (already_done). An
    earlier reader failure (stage 'read', e.g. a duplicate archive member) whose key is done is kept as it was:
    resume skips finished keys before reading, so the attempt could not see it again. Other earlier failures the
    attempt did not see again are dropped (they are not inputs of this run any more). `record` keeps the chosen
    rows as written (the compacted parts); `manifest` is sorted by key. Vectorised: no Python loop over rows."""
    if parts.num_rows == 0:
        return parts, parts
    current = pc.equal(parts.column("attempt"), attempt)
    done = pc.equal(parts.column("status"), "done")
    work = parts.append_column("_id", identities(parts)).append_column("_cur", current).append_column("_done", done)
    work = work.sort_by([("_id", "ascending"), ("_cur", "descending"), ("_done", "descending"),
                         ("finished_at", "descending")]).combine_chunks()
    first = _first_of_runs(work.column("_id").chunk(0) if work.num_rows else pa.array([], pa.string()))
    done_keys = pc.unique(pc.filter(parts.column("key"), done))
    read_failure = pc.and_(pc.equal(pc.fill_null(work.column("stage"), ""), "read"),
                           pc.is_in(work.column("key"), value_set=done_keys))
    work = work.filter(pc.and_(first, pc.or_(pc.or_(work.column("_cur"), work.column("_done")), read_failure)))
    record = work.drop_columns(["_id", "_cur", "_done"])
    earlier = pc.and_(pc.invert(work.column("_cur")), work.column("_done"))
    message = pc.binary_join_element_wise("outputs written by attempt ",
                                          pc.cast(record.column("attempt"), pa.string()), " were kept", "")
    manifest = record.set_column(record.schema.get_field_index("status"), "status",
                                 pc.if_else(earlier, "skipped", record.column("status")))
    manifest = manifest.set_column(manifest.schema.get_field_index("reason"), "reason",
                                   pc.if_else(earlier, "already_done", record.column("reason")))
    manifest = manifest.set_column(manifest.schema.get_field_index("message"), "message",
                                   pc.if_else(earlier, message, record.column("message")))
    return record, manifest.sort_by([("key", "ascending"), ("stage", "ascending")])


def finish_attempt(fs: pafs.FileSystem, dest: str, attempt: int) -> pa.Table:
    """Merge the parts into DEST/manifest.parquet and compact them into one part (written before the old parts
    are deleted, so a kill in between only leaves duplicates that the next merge drops). Returns the manifest."""
    parts, paths = read_parts(fs, dest)
    record, manifest = merge_parts(parts, attempt)
    if record.num_rows:
        put_bytes(fs, dest, f"{PARTS_DIR}/a{attempt:05d}-merged-{uuid.uuid4().hex}.parquet", table_bytes(record))
    for path in paths:
        fs.delete_file(path)
    put_bytes(fs, dest, MANIFEST_FILE, table_bytes(manifest))
    if isinstance(fs, pafs.LocalFileSystem):
        fs.delete_dir_contents(f"{dest}/{TMP_DIR}", missing_dir_ok=True)
    return manifest


def counts(manifest: pa.Table) -> dict[str, int]:
    found = {v["values"]: v["counts"] for v in pc.value_counts(manifest.column("status")).to_pylist()}
    return {s: found.get(s, 0) for s in ("done", "failed", "skipped")}
