"""Batch resume after a real kill (issue 20): a folder of photos and an ImageNet-shaped tar of tars, colorized in
one job by a job process that is SIGKILLed by its pid once some outputs are recorded; the re-run finishes the rest,
redoes nothing (output files and finish times untouched, no temporary file left) and writes one manifest row per
input. Between the runs every finished member of the archive is replaced by a symbolic link, which the reader would
report as a failure if it looked at it: the re-run reports them as done by the first attempt, so finished members
are skipped before they are read."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from layouts import SAMPLE, kill_when
from shared_data import needs_shared_data

from coltran.init_models import init_models
from pipelines.batch.manifest import read_parts
from pipelines.cli import main as coltran_main

pytestmark = needs_shared_data(SAMPLE)
ONE_PER_BATCH = [f"--set={stage}.batch_size=1" for stage in ("prepare", "colorizer", "color_upsampler",
                                                               "spatial_upsampler", "write")]
LAYOUT = {"n01/": 2, "n02/": 2, "": 2}  # two inner class tars of two photos each, two photos beside them


def _add(tf: tarfile.TarFile, name: str, data: bytes | None, link: bool = False) -> None:
    info = tarfile.TarInfo(name)
    if link:
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
        return
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_archive(path, photos: dict[str, bytes], links: set[str] = frozenset()) -> None:
    """An outer tar holding n01.tar, n02.tar and loose photos; members whose key is in `links` become symlinks."""
    inner: dict[str, list[tuple[str, bytes]]] = {}
    for key, data in photos.items():
        folder, _, name = key.rpartition("/")
        inner.setdefault(folder, []).append((name, data))
    with tarfile.open(path, "w") as outer:
        for folder, members in sorted(inner.items()):
            if not folder:
                for name, data in members:
                    _add(outer, name, data, link=name in links)
                continue
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tf:
                for name, data in members:
                    _add(tf, name, data, link=f"{folder}/{name}" in links)
            _add(outer, f"{folder}.tar", buffer.getvalue())


@pytest.mark.ray
def test_killed_job_resumes_without_redoing_work_or_reading_finished_members(tmp_path, ray_local):
    import ray

    models = init_models(tmp_path / "models", "test")
    files = sorted(SAMPLE.glob("*.JPEG"))[:10]
    photos, i = {}, 0
    for folder, count in LAYOUT.items():
        for path in files[i:i + count]:
            photos[f"{folder}{path.name}"] = path.read_bytes()
        i += count
    (tmp_path / "folder").mkdir()
    for path in files[i:]:
        (tmp_path / "folder" / path.name).write_bytes(path.read_bytes())
    archive, dest = tmp_path / "shots.tar", tmp_path / "out"
    _write_archive(archive, photos)
    inputs = [f"shots/{key}" for key in photos] + [f"folder/{p.name}" for p in files[i:]]  # the job's keys
    # one photo per batch in every stage, so that the kill lands between recorded outputs; the resumed run keeps
    # the default batch sizes (not part of the run's fingerprint: a resume may regroup the remaining photos)
    args = ["colorize", str(archive), str(tmp_path / "folder"), "--models", str(models), "--out", str(dest),
            "--batch"]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args, *ONE_PER_BATCH, "--ray-address",
                                 ray.get_runtime_context().gcs_address], env=env, stdout=out, stderr=subprocess.STDOUT)
    from pyarrow import fs as pafs

    local = pafs.LocalFileSystem()
    # the condition: some inputs recorded as done (their files are in place before that)
    kill_when(proc, lambda: any(r["status"] == "done" for r in read_parts(local, str(dest))[0].to_pylist()), log,
              timeout=240)
    first = {r["key"]: r for r in read_parts(local, str(dest))[0].to_pylist() if r["status"] == "done"}
    assert not (dest / "manifest.parquet").exists() and 0 < len(first) < len(inputs), "the kill should land midway"
    stamps = {k: [(dest / o).stat().st_mtime_ns for o in r["outputs"]] for k, r in first.items()}
    # finished members of the archive can no longer be read as images
    _write_archive(archive, photos, links={k.removeprefix("shots/") for k in first if k.startswith("shots/")})
    print(f"killed after {len(first)} of {len(inputs)} done: {sorted(first)}")

    assert coltran_main(args) == 0
    rows = pq.read_table(dest / "manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(inputs), "one row per input, no duplicates"
    for row in rows:
        if row["key"] in first:
            assert (row["status"], row["reason"], row["attempt"]) == ("skipped", "already_done", 1), row
            assert row["outputs"] == first[row["key"]]["outputs"]
            assert row["finished_at"] == first[row["key"]]["finished_at"]
            assert [(dest / o).stat().st_mtime_ns for o in row["outputs"]] == stamps[row["key"]], "redone"
        else:
            assert (row["status"], row["attempt"], row["resolution"]) == ("done", 2, "full"), row
    images = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")  # outputs mirror the keys in DEST
                    if p.is_file() and p.suffix == ".png" and p.relative_to(dest).parts[0] != "_tmp")
    assert images == sorted(o for r in rows for o in r["outputs"]) and len(images) == len(inputs)
    assert not any((dest / "_tmp").glob("*"))
    assert len(list((dest / "_manifest_parts").iterdir())) == 1  # compacted into one part at the finish
