"""A real multi-node Ray cluster for tests, started with the `ray start` CLI as a user does: token
authentication on, a head labelled `pool=cpu` and one worker node per stage pool (`pool=colorizer`,
`pool=color_upsampler`, `pool=spatial_upsampler`), every node on loopback 127.0.0.2 with its own temp dir.

Machines that share no disk, imitated: each worker node runs in its own mount namespace (`unshare --mount
--propagation private`) with a private tmpfs mounted over the cluster's `scratch` directory, so what one node
writes under that path the other nodes, the head and the test process never see, as on separate hardware.
Everything else (the code, the venv, pytest's tmp dirs) stays visible to all nodes, like a shared mount; shared
storage proper is the moto S3 server and the MLflow tracking server, over HTTP."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services import VENV_BIN, ServiceError, free_port, log_tail, service_env, stop_marked, wait_until

NODE_IP = "127.0.0.2"
POOL_LABEL = "pool"
HEAD_POOL = "cpu"  # the head stands in for the CPU (preprocess / decode) pool; it runs no training
WORKER_POOLS = ("colorizer", "color_upsampler", "spatial_upsampler")
CPUS_PER_NODE = 2
HEAD_OBJECT_STORE = 300_000_000
WORKER_OBJECT_STORE = 150_000_000
# Client-side variables that would override the token file or point clients at another cluster.
_FOREIGN_VARS = ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


@dataclass
class RayPoolCluster:
    """Addresses, credentials and node ids of a running pool cluster."""

    address: str  # GCS address, for ray.init(address=...)
    dashboard_url: str  # job API and dashboard
    token: str
    token_path: Path
    temp_root: Path
    scratch: Path  # the same path on every node, private to each worker node (see the module docstring)
    node_ids: dict[str, str]  # pool label -> node id
    startup_s: dict[str, float]  # seconds from the start to: gcs_up, ray_start_done, nodes_alive

    @property
    def env(self) -> dict[str, str]:
        """What a Ray client (driver, `ray job submit`, JobSubmissionClient) needs to authenticate."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_USAGE_STATS_ENABLED": "0"}

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A full environment for a client subprocess: ours without foreign Ray settings, plus `env`."""
        return service_env(None, {**self.env, **(extra or {})}, drop=_FOREIGN_VARS)

    def job_client(self, headers: dict[str, str] | None = None):
        """A JobSubmissionClient on the dashboard, authenticated with the token unless `headers` says otherwise."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.headers if headers is None else headers)

    def wait_job(self, job_id: str, timeout: float = 300.0) -> str:
        """Wait for a submitted job to succeed and return its logs; raise ServiceError (with logs) otherwise."""
        from ray.job_submission import JobStatus

        client = self.job_client()
        deadline = time.monotonic() + timeout
        while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED):
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise ServiceError(f"job {job_id} still {status} after {timeout:.0f} s\n"
                                   f"{client.get_job_logs(job_id)[-4000:]}")
            time.sleep(0.5)
        logs = client.get_job_logs(job_id)
        if status != JobStatus.SUCCEEDED:
            info = client.get_job_info(job_id)
            raise ServiceError(f"job {job_id} ended {status}: {info.message}\n{logs[-4000:]}")
        return logs

    def alive_nodes(self) -> list[dict]:
        """Alive nodes as the state API lists them (node_id, labels, resources_total, ...)."""
        return alive_nodes(self.dashboard_url, self.headers)


def _reset_auth_state() -> None:
    """Make this process re-read RAY_AUTH_MODE and the token: Ray caches both at first use, so a process
    that imported ray before the variables were set would otherwise connect without the token."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def connected_driver(cluster: RayPoolCluster) -> Iterator[RayPoolCluster]:
    """`ray.init(address=...)` from this process with the cluster's auth env; undone (env too) on exit."""
    import ray

    if ray.is_initialized():  # a process drives one cluster at a time: the session's local Ray (conftest) stops
        ray.shutdown()
    saved = {name: os.environ.get(name) for name in (*cluster.env, *_FOREIGN_VARS)}
    os.environ.update(cluster.env)
    for name in _FOREIGN_VARS:
        os.environ.pop(name, None)
    _reset_auth_state()
    try:
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reset_auth_state()


def alive_nodes(dashboard_url: str, headers: dict[str, str]) -> list[dict]:
    request = urllib.request.Request(f"{dashboard_url}/api/v0/nodes?limit=100", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            nodes = json.load(response)["data"]["result"]["result"]
    except OSError:
        return []
    return [node for node in nodes if node["state"] == "ALIVE"]


SCRATCH_TMPFS_SIZE = "256m"


def _ray_start(args: list[str], log: Path, env: dict[str, str], private: Path | None = None) -> subprocess.Popen:
    """`ray start ARGS`; with `private`, inside a new mount namespace where a tmpfs covers `private`: the
    node's daemons and workers inherit the namespace, so that directory is the node's own."""
    cmd = [str(VENV_BIN / "ray"), "start", *args, "--disable-usage-stats"]
    if private is not None:
        mount = f'mount -t tmpfs -o size={SCRATCH_TMPFS_SIZE} coltran-scratch "$0" && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mount, str(private), *cmd]
    with open(log, "ab") as out:
        # A new session keeps the daemons out of pytest's process group (Ctrl-C is handled by teardown).
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _node_args(root: Path, pool: str, object_store: int) -> list[str]:
    return ["--node-ip-address", NODE_IP, "--num-cpus", str(CPUS_PER_NODE),
            "--object-store-memory", str(object_store), "--temp-dir", str(root / pool),
            "--dashboard-agent-listen-port", str(free_port()), "--labels", f"{POOL_LABEL}={pool}"]


def _wait_started(procs: dict[str, subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every `ray start`; return the pools whose command failed. `ray start` gives up when its raylet has
    not registered within Ray's fixed 30 s, which an overloaded machine exceeds while the node still comes up, so
    a failed command is judged by whether its node appears, not by its exit code."""
    failed = []
    for pool, proc in procs.items():
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        if proc.returncode != 0:
            failed.append(pool)
    return failed


def _gcs_listening(port: int, head: subprocess.Popen) -> bool:
    if head.poll() not in (None, 0):
        raise ServiceError(f"`ray start --head` ended with {head.returncode}")
    try:
        socket.create_connection((NODE_IP, port), timeout=1).close()
        return True
    except OSError:
        return False


def _start_nodes(root: Path, env: dict[str, str], gcs_port: int, dashboard_port: int, times: dict) -> list[str]:
    head = ["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
            str(dashboard_port), "--include-dashboard=true", "--ray-client-server-port", str(free_port()),
            *_node_args(root, HEAD_POOL, HEAD_OBJECT_STORE)]
    starting = {HEAD_POOL: _ray_start(head, root / f"{HEAD_POOL}.log", env)}
    # Workers only need the GCS: starting them while the head still brings up its dashboard saves seconds.
    times["gcs_up"] = wait_until(lambda: _gcs_listening(gcs_port, starting[HEAD_POOL]), 60, "the head's GCS",
                                 lambda: log_tail(root / f"{HEAD_POOL}.log"))
    for pool in WORKER_POOLS:
        args = ["--address", f"{NODE_IP}:{gcs_port}", *_node_args(root, pool, WORKER_OBJECT_STORE)]
        starting[pool] = _ray_start(args, root / f"{pool}.log", env, private=root / "scratch")
    failed = _wait_started(starting, 120)
    times["ray_start_done"] = time.monotonic() - times["start"]
    return failed


def _pools_up(dashboard_url: str, headers: dict[str, str]) -> dict[str, str]:
    """pool label -> node id for alive nodes, if every pool has exactly one node; else {}."""
    nodes = alive_nodes(dashboard_url, headers)
    pools = {node["labels"].get(POOL_LABEL): node["node_id"] for node in nodes}
    return pools if len(nodes) == len(pools) and set(pools) == {HEAD_POOL, *WORKER_POOLS} else {}


@contextmanager
def run_ray_pool_cluster(mark: str, timeout: float = 180.0,
                         node_env: dict[str, str] | None = None) -> Iterator[RayPoolCluster]:
    """Start head + pool workers with token auth; on exit kill exactly the processes they started. `node_env`
    is every node's environment, as a machine image or instance role gives it (here: the S3 endpoint and
    credentials of the session's moto server)."""
    root = Path(tempfile.mkdtemp(prefix="ctray-", dir="/tmp"))  # short: Ray's socket paths live under it
    token_path = root / "auth_token"
    token = secrets.token_hex(32)
    token_path.write_text(token)
    token_path.chmod(0o600)
    (root / "tmp").mkdir()
    (root / "scratch").mkdir()
    env = service_env(mark, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
                             "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(root / "tmp"), **(node_env or {})},
                      drop=_FOREIGN_VARS)
    gcs_port, dashboard_port = free_port(), free_port()
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    headers = {"Authorization": f"Bearer {token}"}
    times = {"start": time.monotonic()}
    try:
        failed = _start_nodes(root, env, gcs_port, dashboard_port, times)
        logs = "\n".join(f"`ray start` of {pool} failed:\n{log_tail(root / f'{pool}.log')}" for pool in failed)
        wait_until(lambda: bool(_pools_up(dashboard_url, headers)), timeout, "Ray pool nodes",
                   lambda: f"alive: {alive_nodes(dashboard_url, headers)}\n{logs or log_tail(root / 'cpu.log')}")
        times["nodes_alive"] = time.monotonic() - times.pop("start")
        cluster = RayPoolCluster(address=f"{NODE_IP}:{gcs_port}", dashboard_url=dashboard_url, token=token,
                                 token_path=token_path, temp_root=root, scratch=root / "scratch",
                                 node_ids=_pools_up(dashboard_url, headers), startup_s=times)
        yield cluster
    finally:
        try:
            stop_marked(mark, "Ray pool cluster")
        finally:
            shutil.rmtree(root, ignore_errors=True)
