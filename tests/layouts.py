"""Fixture builders (not tests) for the preprocessing tests: one ImageNet subset arranged in every source layout
(folder tree, tar of per-class tars, .tar.gz, zip, flat folder + labels file, S3 prefixes on the session's moto
server); the session's local Ray (LocalRay); killing a job process midway (kill_when)."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from shared_data import DATA, SAMPLE, require_shared_data  # noqa: F401 (re-exported for the test modules)


@dataclass
class Layouts:
    """The same images in each layout; `expected` maps key -> (bytes, label) for every layout."""

    root: Path
    wnids: list[str]
    expected: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    flat_labels: dict[str, int] = field(default_factory=dict)  # flat folder: file name -> label

    @property
    def tree(self) -> Path:
        return self.root / "train"

    @property
    def tar_of_tars(self) -> Path:
        return self.root / "ILSVRC2012_img_train.tar"

    @property
    def tar_gz(self) -> Path:
        return self.root / "train.tar.gz"

    @property
    def zip(self) -> Path:
        return self.root / "train.zip"

    @property
    def flat(self) -> Path:
        return self.root / "val"

    @property
    def labels_file(self) -> Path:
        return self.root / "val_labels.csv"


def build_layouts(root: Path, images: int = 40, classes: int = 8) -> Layouts:
    """`images` sample JPEGs spread over `classes` folders named after the first `classes` wnids."""
    files = sorted(SAMPLE.glob("*.JPEG"))[:images]
    wnids = sorted({f.name.split("_")[0] for f in files[:classes]})
    lay = Layouts(root=root, wnids=wnids)
    by_class: dict[str, list[Path]] = {w: [] for w in wnids}
    for i, f in enumerate(files):
        by_class[wnids[i % classes]].append(f)
    for label, (wnid, members) in enumerate(by_class.items()):
        (lay.tree / wnid).mkdir(parents=True)
        for f in members:
            (lay.tree / wnid / f.name).write_bytes(f.read_bytes())
            lay.expected[f"{wnid}/{f.name}"] = (f.read_bytes(), label)
    with tarfile.open(lay.tar_of_tars, "w") as outer:
        for wnid, members in by_class.items():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for f in members:
                    inner.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    with tarfile.open(lay.tar_gz, "w:gz") as tgz, zipfile.ZipFile(lay.zip, "w") as zf:
        for key in lay.expected:
            tgz.add(lay.tree / key, arcname=key)
            zf.write(lay.tree / key, arcname=key)
    lay.flat.mkdir()
    lines = ["filename,label"]
    for key, (data, label) in lay.expected.items():
        name = key.split("/")[1]
        (lay.flat / name).write_bytes(data)
        lay.flat_labels[name] = label
        lines.append(f"{name.rsplit('.', 1)[0]},{wnids[label]}")  # ImageNet style: no extension, a wnid
    lay.labels_file.write_text("\n".join(lines) + "\n")
    return lay


@dataclass
class MotoS3:
    endpoint_url: str
    bucket: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def upload(self, local: Path, prefix: str) -> None:
        s3 = self.client()
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            s3.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(local).as_posix()}")

    def filesystem(self):
        from pipelines.io.s3 import s3_filesystem

        return s3_filesystem(self.endpoint_url)


@contextmanager
def env_vars(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables, restoring the previous values after."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def s3_bucket(server, bucket: str) -> Iterator[MotoS3]:
    """A new bucket on the session's S3 server (services.S3Server), with its endpoint and dummy credentials set in
    os.environ for the caller (the driver side of a job) until the context ends. The session's local Ray (LocalRay)
    gives its workers the same endpoint and credentials."""
    server.create_bucket(bucket)
    with env_vars(server.env_overrides):
        yield MotoS3(server.endpoint_url, bucket)


@dataclass
class LocalRay:
    """The session's local Ray for single-machine tests (conftest's `ray_local`): this machine's CPU count, token
    auth on, its workers started with `worker_env` (the session's S3 endpoint and credentials, a model cache of the
    session's own). `ensure()` starts it when this process is not a Ray driver; a test that connects this process
    to another cluster stops it first (ray_pool.connected_driver), and conftest runs every test that uses it
    before those, so it starts once and its workers (torch and the product imported) serve every module."""

    worker_env: dict[str, str | None]
    model_cache: Path
    num_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)  # no extra logical CPUs

    def ensure(self) -> LocalRay:
        """Start it unless this process is already a Ray driver. RAY_AUTH_MODE is left unset, so ray.init does
        what it does for a cluster it starts: token auth on, with ~/.ray/auth_token (created if missing);
        setting the variable by hand after `import ray` would not reach Ray's cached config."""
        import ray

        if not ray.is_initialized():
            with env_vars({**self.worker_env, "RAY_AUTH_MODE": None, "RAY_ADDRESS": None,
                           "RAY_USAGE_STATS_ENABLED": "0"}):
                ray.init(_node_ip_address="127.0.0.2", num_cpus=self.num_cpus, object_store_memory=300_000_000,
                         include_dashboard=False, log_to_driver=False)
        return self

    def stop(self) -> None:
        import ray

        ray.shutdown()


def kill_when(proc, ready, log: Path, timeout: float, poll: float = 0.3):
    """SIGKILL the job process `proc` (started by the test, killed by its pid) once `ready()` returns something
    truthy, then wait until the local Ray has every CPU back (the job's tasks and actors are gone). Fails if the
    job ends first or nothing is ready within `timeout` s; returns what `ready()` last returned. A condition, never
    a sleep, decides when the kill lands."""
    import os
    import signal
    import time

    import ray

    deadline, found = time.monotonic() + timeout, None
    try:
        while not (found := ready()):
            assert proc.poll() is None, f"the job ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no progress in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
            time.sleep(poll)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline + 60, "the killed job's tasks and actors were not released"
        time.sleep(poll)
    return found
