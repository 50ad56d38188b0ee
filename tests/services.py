"""Real services for the test suites: an MLflow tracking server and a moto S3 server, each a child process
on loopback; plus the process bookkeeping (free ports, marked environments, reaping) they and the Ray pool
cluster in `ray_pool.py` share. Run as a script it is the watchdog that reaps a dead session's services."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
# Every process a service starts carries MARK_VAR=<session mark>/<service> in its environment; that is how
# teardown and the watchdog find all of them (Ray rewrites worker command lines, but not their environment).
MARK_VAR = "COLTRAN_TEST_SERVICE"


class ServiceError(RuntimeError):
    """A test service did not start, did not answer in time, or left processes behind."""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as err:
        return f"<no log at {path}: {err}>"


def wait_until(ready: Callable[[], bool], timeout: float, what: str, diagnose: Callable[[], str]) -> float:
    """Poll `ready` until true; return the seconds it took or raise ServiceError with `diagnose()`."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            raise ServiceError(f"{what} not ready after {timeout:.0f} s\n{diagnose()}")
        time.sleep(0.25)
    return time.monotonic() - start


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> int | None:
    """HTTP status of a GET, or None when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


def service_env(mark: str | None, extra: dict[str, str] | None = None,
                drop: Sequence[str] = ()) -> dict[str, str]:
    """Our environment with the venv's bin first on PATH (so `python` in a job is this venv's), without the
    variables in `drop`, plus `extra` and, for a service process, its mark."""
    env = {k: v for k, v in os.environ.items() if k not in (*drop, MARK_VAR)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    if mark is not None:
        env[MARK_VAR] = mark
    env.update(extra or {})
    return env


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def marked_pids(mark: str, prefix: bool = False, sessions: set[int] | None = None) -> list[int]:
    """Live processes whose environment carries MARK_VAR=mark (or a value starting with mark), and those in the
    process sessions of such processes. Some Ray daemons (the dashboard and runtime-env agents) set process titles
    long enough that setproctitle overwrites their environment, mark included; each service starts in a session
    of its own, which they keep. `sessions` gathers those sessions across calls (never this process's own), so a
    daemon whose marked siblings are already dead is still found."""
    wanted = f"{MARK_VAR}={mark}".encode()
    sessions = set() if sessions is None else sessions
    found, others = [], []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        hit = any(v.startswith(wanted) for v in environ) if prefix else wanted in environ
        (found if hit else others).append(int(entry))
    sessions.update(s for pid in found if (s := _session(pid)) is not None)
    sessions.discard(os.getsid(0))
    if sessions:
        found += [pid for pid in others if _session(pid) in sessions]
    return sorted(pid for pid in found if not _is_zombie(pid))


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def reap(mark: str, prefix: bool = False, grace: float = 3.0) -> list[int]:
    """SIGTERM every process carrying `mark` (or in the session of one), SIGKILL what is left after `grace`;
    return survivors."""
    sessions: set[int] = set()
    _signal_all(marked_pids(mark, prefix, sessions), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while marked_pids(mark, prefix, sessions) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_all(marked_pids(mark, prefix, sessions), signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while (left := marked_pids(mark, prefix, sessions)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def stop_marked(mark: str, what: str) -> None:
    left = reap(mark)
    if left:
        raise ServiceError(f"{what}: processes {left} still alive after SIGKILL")


def start_watchdog(session_mark: str, parent: int | None = None) -> subprocess.Popen:
    """A detached process that reaps everything marked `session_mark/...` once `parent` (default: this
    process) is gone, so a pytest killed without teardown leaves no service running."""
    cmd = [sys.executable, __file__, "watchdog", str(parent or os.getpid()), session_mark]
    return subprocess.Popen(cmd, env=service_env(None), start_new_session=True, stdin=subprocess.DEVNULL)


def _watch(parent: int, session_mark: str) -> None:
    while not _is_zombie(parent):
        time.sleep(1.0)
    reap(f"{session_mark}/", prefix=True)  # services are marked <session mark>/<service>


def _start_http(cmd: list[str], url: str, mark: str, log: Path, timeout: float,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=service_env(mark, env), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def ready() -> bool:
        if proc.poll() is not None:
            raise ServiceError(f"{cmd[0]} exited with {proc.returncode}\n{log_tail(log)}")
        return http_status(url) == 200

    try:
        wait_until(ready, timeout, f"{Path(cmd[0]).name} at {url}", lambda: log_tail(log))
    except BaseException:
        stop_marked(mark, cmd[0])
        raise
    return proc


def _stop_http(proc: subprocess.Popen, mark: str, what: str) -> None:
    stop_marked(mark, what)
    proc.wait(timeout=10)


@dataclass
class MlflowServer:
    """A running `mlflow server` (sqlite backend, local artifact root)."""

    uri: str
    artifact_root: Path

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.uri)


@contextmanager
def run_mlflow_server(root: Path, mark: str, timeout: float = 90.0) -> Iterator[MlflowServer]:
    """Start `mlflow server --workers 1` on a free loopback port under `root`; stop its whole tree after."""
    root.mkdir(parents=True, exist_ok=True)
    artifacts = root / "artifacts"
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"
    # The server's job runner (seven huey consumers, for GenAI scorers and trace roll-ups) is not used by
    # this project and costs seconds of start-up and hundreds of MB on a small machine.
    proc = _start_http(cmd, f"{uri}/health", mark, root / "mlflow-server.log", timeout,
                       env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        yield MlflowServer(uri=uri, artifact_root=artifacts)
    finally:
        _stop_http(proc, mark, "mlflow server")


@dataclass
class S3Server:
    """A running moto S3 server with dummy credentials; `env` is what a client process needs."""

    endpoint_url: str
    region: str = "us-east-1"
    access_key: str = "testing"
    secret_key: str = "testing"
    buckets: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    @property
    def env_overrides(self) -> dict[str, str | None]:
        """`env` plus the unsetting (None, for layouts.env_vars) of a session token or profile that would
        otherwise be sent along with the dummy credentials."""
        return {**self.env, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def filesystem(self):
        """A pyarrow S3FileSystem on this server (what Ray Data readers and writers take)."""
        from pyarrow import fs

        host = self.endpoint_url.removeprefix("http://")
        return fs.S3FileSystem(endpoint_override=host, scheme="http", access_key=self.access_key,
                               secret_key=self.secret_key, region=self.region)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def upload_folder(self, folder: Path, bucket: str, prefix: str = "") -> list[str]:
        """Upload every file under `folder` to s3://bucket/prefix/<relative path>; return the keys."""
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"upload_folder expects a directory, got {folder}")
        s3, keys = self.client(), []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = "/".join(filter(None, [prefix.strip("/"), path.relative_to(folder).as_posix()]))
            s3.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys


@contextmanager
def run_s3_server(root: Path, mark: str, timeout: float = 60.0) -> Iterator[S3Server]:
    """Start `moto_server` on a free loopback port; stop it after."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    endpoint = f"http://127.0.0.1:{port}"
    proc = _start_http(cmd, f"{endpoint}/moto-api/", mark, root / "moto-server.log", timeout)
    try:
        yield S3Server(endpoint_url=endpoint)
    finally:
        _stop_http(proc, mark, "moto server")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "watchdog":
        sys.exit(f"usage: {sys.argv[0]} watchdog PARENT_PID SESSION_MARK (got {sys.argv[1:]})")
    _watch(int(sys.argv[2]), sys.argv[3])
