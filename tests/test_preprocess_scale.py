"""Preprocessing at archive scale (issue 20): an ImageNet-shaped tar of tars (100 inner tars of small JPEGs, a few
bad members) in one pass, through a filesystem wrapper that counts the bytes read: about the archive's size, inner
tars read by several tasks at once, both splits written, every tensor equal to coltran's transforms, rows +
failures = members. Then the same job killed midway (SIGKILL by pid) and rerun: it completes, finished files keep
their inode and mtime, and the dataset equals the uninterrupted run's file for file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from corpus import build_tar_of_tars
from layouts import SAMPLE, kill_when, s3_bucket
from shared_data import needs_shared_data

from coltran.imageio import decode_image
from coltran.transforms import prepare_example
from pipelines.dataset.format import TENSOR_SHAPES, read_tensor_column
from pipelines.io.sources import plan_sources
from pipelines.preprocess.job import PreprocessSettings, main, run_preprocess

pytestmark = [pytest.mark.ray, needs_shared_data(SAMPLE)]
INNER, PER_INNER = 100, 2
SETTINGS = {"heldout_fraction": 0.2, "train_crops": 1, "seed": 3, "min_rows_per_file": 8, "batch_size": 4}
REPO = Path(__file__).resolve().parents[1]


class CountingFile:
    """A source file that appends (pid, opened, closed, bytes read) to a log per process when it is closed."""

    def __init__(self, raw, log_dir: str) -> None:
        self.raw, self.log_dir, self.count, self.opened = raw, log_dir, 0, time.time()

    def read(self, n=-1):
        data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        self.count += len(data)
        return data

    def seek(self, offset, whence=0):
        return self.raw.seek(offset, whence)

    def tell(self):
        return self.raw.tell()

    def size(self):
        return self.raw.size()

    def close(self):
        if not self.raw.closed:
            self.raw.close()
            with open(f"{self.log_dir}/{os.getpid()}.log", "a") as log:
                log.write(json.dumps([os.getpid(), self.opened, time.time(), self.count]) + "\n")

    @property
    def closed(self):
        return self.raw.closed


class CountingHandler(pafs.FileSystemHandler):
    """A read-only view of a filesystem (local by default) whose input files count the bytes read from it."""

    def __init__(self, log_dir: str, inner: pafs.FileSystem | None = None) -> None:
        self.log_dir, self.local = log_dir, inner or pafs.LocalFileSystem()

    def __eq__(self, other):
        return isinstance(other, CountingHandler) and other.log_dir == self.log_dir

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def open_input_stream(self, path):
        return pa.PythonFile(CountingFile(self.local.open_input_stream(path), self.log_dir), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(CountingFile(self.local.open_input_file(path), self.log_dir), mode="r")

    def _read_only(self, *args, **kwargs):
        raise OSError("the counting source filesystem is read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


def _build_tar_of_tars(path: Path) -> tuple[dict[str, bytes], set[str]]:
    """INNER class tars of PER_INNER small JPEGs; inner tars 7, 42 and 77 also hold a truncated JPEG."""
    return build_tar_of_tars(path, sorted(SAMPLE.glob("*.JPEG")), INNER, PER_INNER, truncated=(7, 42, 77))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_shaped")
    images, bad = _build_tar_of_tars(root / "ILSVRC2012_img_train.tar")
    return root / "ILSVRC2012_img_train.tar", images, bad


@pytest.fixture(scope="module")
def ray_session(ray_local):
    return ray_local


@pytest.fixture(scope="module")
def counted_run(archive, ray_session, tmp_path_factory):
    """The uninterrupted run, its source read through CountingHandler: (dest, manifest, open-file log)."""
    path, _, _ = archive
    root = tmp_path_factory.mktemp("counted")
    logs = root / "reads"
    logs.mkdir()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    fs = pafs.PyFileSystem(CountingHandler(str(logs)))
    manifest = run_preprocess(PreprocessSettings(sources=[str(path)], dest=str(root / "out"), **SETTINGS),
                              source_filesystem=fs)
    reads = [json.loads(line) for log in logs.iterdir() for line in log.read_text().splitlines()]
    return root / "out", manifest, reads


def test_one_pass_over_a_tar_of_tars(archive, counted_run):
    path, images, bad = archive
    dest, manifest, reads = counted_run
    size = path.stat().st_size
    read = sum(r[3] for r in reads)
    print(f"read {read:,} bytes of a {size:,}-byte archive ({read / size:.3f}x) in {len(reads)} opens by "
          f"{len({r[0] for r in reads})} processes; {manifest['seconds']} s; {manifest['execution']}")
    assert read <= 1.1 * size
    assert manifest["execution"]["items_run"] == INNER  # one work item per inner tar, each in one task,
    assert manifest["execution"]["processes"] > 1 and manifest["execution"]["max_concurrent"] > 1  # in parallel
    assert len({r[0] for r in reads if r[0] != os.getpid()}) > 1  # inner tars opened by several worker processes
    assert {s: manifest["splits"][s]["images"] > 0 for s in ("train", "heldout")} == {"train": True, "heldout": True}
    stored = 0
    for split in ("train", "heldout"):
        table = pq.read_table(dest / split)
        tensors = {name: read_tensor_column(table, name) for name in TENSOR_SHAPES}
        for i, row in enumerate(table.drop_columns(list(TENSOR_SHAPES)).to_pylist()):
            box = (row["crop_top"], row["crop_left"], row["crop_size"])
            want = prepare_example(decode_image(images[row["key"]]).rgb, box=box)
            assert row["split"] == split
            for name in TENSOR_SHAPES:
                np.testing.assert_array_equal(tensors[name][i], want[name], err_msg=f"{row['key']} {name}")
        stored += table.num_rows
    failures = pq.read_table(dest / "failures.parquet").to_pylist()
    assert {f["key"] for f in failures} == bad and len(failures) == len(bad)
    assert stored + len(failures) == len(images) + len(bad) == manifest["inputs"]
    assert manifest["work_items"]["count"] == INNER and not (dest / "_progress").exists()


def test_tar_of_tars_on_s3_is_read_by_range_requests(archive, counted_run, tmp_path, s3_server):
    """The same archive on a moto S3 server, read through the counting wrapper around pyarrow's S3 filesystem:
    the driver's header index and the tasks' inner tars are range requests adding up to about the archive."""
    path, images, bad = archive
    with s3_bucket(s3_server, "preprocess-scale") as server:
        server.client().upload_file(str(path), server.bucket, "imagenet/train.tar")
        s3 = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                               endpoint_override=server.endpoint_url.removeprefix("http://"))
        logs = tmp_path / "reads"
        logs.mkdir()
        fs = pafs.PyFileSystem(CountingHandler(str(logs), s3))
        plan = plan_sources([f"s3://{server.bucket}/imagenet/train.tar"], filesystem=fs)
        rows = plan.to_dataset().select_columns(["key", "error"]).take_all()
    read = sum(json.loads(line)[3] for log in logs.iterdir() for line in log.read_text().splitlines())
    print(f"S3: read {read:,} bytes of a {path.stat().st_size:,}-byte archive ({read / path.stat().st_size:.3f}x)")
    assert read <= 1.1 * path.stat().st_size
    assert sorted(r["key"] for r in rows) == sorted([*images, *bad])
    assert {r["key"] for r in rows if r["error"]} == set() and plan.labeling.classes[:2] == ("n00000000", "n00000001")


def _snapshot(dest: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(dest).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in dest.rglob("*.parquet") if "_progress" not in p.parts}


def test_killed_run_resumes_to_the_uninterrupted_dataset(archive, counted_run, tmp_path):
    path, _, _ = archive
    full_dest, full_manifest, _ = counted_run
    dest = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"sources": [str(path)], "dest": str(dest), **SETTINGS}))  # JSON is YAML
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.preprocess", str(job)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    done_dir = dest / "_progress" / "done"
    # the condition: a work item finished
    kill_when(proc, lambda: done_dir.is_dir() and any(done_dir.glob("*.json")), log, timeout=240, poll=0.05)
    markers = [json.loads(p.read_text()) for p in done_dir.glob("*.json")]
    finished = {f for m in markers for f in m["files"]}
    before = {k: v for k, v in _snapshot(dest).items() if k in finished}
    assert not (dest / "manifest.json").exists() and 0 < len(markers) < INNER, "the kill should land midway"
    assert set(before) == finished
    print(f"killed after {len(markers)} of {INNER} work items ({len(finished)} files)")

    assert main([str(job)]) == 0  # the same command again
    after = _snapshot(dest)
    assert {k: after[k] for k in finished} == before, "finished files were rewritten"
    assert sorted(after) == sorted(_snapshot(full_dest))  # the same files, named by work item
    for name in after:
        assert pq.read_table(dest / name).equals(pq.read_table(full_dest / name)), name
    failures = pq.read_table(dest / "failures.parquet")
    assert failures.equals(pq.read_table(full_dest / "failures.parquet"))
    assert len(set(failures.column("key").to_pylist())) == failures.num_rows
    manifest = json.loads((dest / "manifest.json").read_text())
    for key in ("inputs", "splits", "failures", "classes", "heldout_keys", "work_items"):
        assert manifest[key] == full_manifest[key], key
    assert sorted(p.name for p in dest.iterdir()) == ["failures.parquet", "heldout", "manifest.json", "train"]
