"""Shared session fixtures: a real MLflow server, a moto S3 server, a local Ray for single-machine tests
(layouts.py) and a token-authenticated Ray pool cluster (see services.py and ray_pool.py), all on loopback,
started on first use and reaped at the end; the one training submission on them (cluster_flow.py); the demo,
started with the session (demo_run.py); test order (fast tests first) and the shared-data rule."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest
from cluster_flow import Flow, run_flow
from layouts import LocalRay
from ray_pool import RayPoolCluster, connected_driver, run_ray_pool_cluster
from services import MlflowServer, S3Server, run_mlflow_server, run_s3_server, start_watchdog
from shared_data import DATA, SAMPLE, in_ci, require_shared_data


def pytest_configure(config):
    config.addinivalue_line("markers", "shared_data(*paths): needs these files of ../shared/data; skips "
                                       "locally, fails under CI=true")
    config.addinivalue_line("markers", "last: runs after the tests that read the shared session state it changes")


def pytest_report_header(config):
    found = "found" if DATA.is_dir() else "MISSING (tests that need it " + ("fail)" if in_ci() else "skip)")
    return f"shared test data {DATA}: {found}"


def pytest_collection_modifyitems(session, config, items):
    """Fast tests first, so model and transform failures show in the first minute; then the tests on the
    session's local Ray (one start for all of them: this process leaves it to drive the pool cluster); then the
    other tests that use Ray; then those marked `last`; then the HTTP and browser tests of the session's
    `coltran serve`; and at the very end those that read the demo started with the session in the background:
    niced, it uses what the tests leave of the machine until then, and a slow machine's tests do not stop to wait
    for it before their own end. The sort is stable: within each group the collection order stays."""
    def group(item) -> int:
        if "demo_run" in item.fixturenames:
            return 5  # the readers of the background demo: as late as possible
        if "served_app" in item.fixturenames:
            return 4
        if item.get_closest_marker("last"):
            return 3
        if "ray_local" in item.fixturenames:
            return 1
        return 2 if item.get_closest_marker("ray") else 0
    items.sort(key=group)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for mark in item.iter_markers("shared_data"):
        require_shared_data(*mark.args)


@pytest.fixture(scope="session")
def service_mark() -> Iterator[str]:
    """This session's process mark; a watchdog reaps every marked process if pytest dies without teardown."""
    mark = f"pytest-{secrets.token_hex(6)}"
    watchdog = start_watchdog(mark)
    yield mark
    watchdog.terminate()
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, service_mark) -> Iterator[MlflowServer]:
    with run_mlflow_server(tmp_path_factory.mktemp("mlflow"), f"{service_mark}/mlflow") as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory, service_mark) -> Iterator[S3Server]:
    with run_s3_server(tmp_path_factory.mktemp("s3"), f"{service_mark}/s3") as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """The S3 server's endpoint and dummy credentials set in os.environ for one test only."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server.env


@pytest.fixture(scope="session")
def ray_local(s3_server, tmp_path_factory) -> Iterator[LocalRay]:
    """The session's local Ray for single-machine tests (layouts.LocalRay), up from its first use; its workers
    reach the session's S3 server and keep downloaded models in a cache of the session's own."""
    cache = tmp_path_factory.mktemp("model-cache")
    local = LocalRay(worker_env={**s3_server.env_overrides, "COLTRAN_MODEL_CACHE": str(cache)}, model_cache=cache)
    yield local.ensure()
    local.stop()


@pytest.fixture(scope="session")
def ray_pool_cluster(service_mark, s3_server) -> Iterator[RayPoolCluster]:
    """Every node reaches the session's S3 server (endpoint and credentials in its environment, as an instance
    role and a machine image give them): S3 is the storage the nodes share."""
    with run_ray_pool_cluster(f"{service_mark}/ray", node_env=s3_server.env) as cluster:
        yield cluster


@pytest.fixture
def ray_pool_driver(ray_pool_cluster) -> Iterator[RayPoolCluster]:
    """This test process connected as a driver to the pool cluster (token auth set up), disconnected after."""
    with connected_driver(ray_pool_cluster) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def cluster_flow(ray_pool_cluster, mlflow_server, s3_server, tmp_path_factory) -> Flow:
    """The session's one training submission (preprocess, train, batch colorize, evaluate) on the pool cluster,
    through S3 and the MLflow server."""
    require_shared_data(SAMPLE)
    return run_flow(ray_pool_cluster, mlflow_server, s3_server, tmp_path_factory.mktemp("cluster-flow"))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, service_mark):
    """`coltran demo` at 0.4x its steps, in the background from the moment it is first asked for (tests/demo_run.py)."""
    from demo_run import run_demo

    with run_demo(tmp_path_factory.mktemp("demo"), f"{service_mark}/demo") as run:
        yield run


@pytest.fixture(scope="session", autouse=True)
def _start_the_demo_early(request):
    """Start `demo_run` before the first test when a selected test needs it: its processes run niced beside the
    fast tests. This process then computes on one torch thread: with a second thread, each of the sampler's
    thousands of small parallel regions waits for that thread to be woken on the core the demo holds
    (test_pipeline's seeds test: 119 s instead of 8 s on 2 cores)."""
    import torch

    if not any("demo_run" in item.fixturenames for item in request.session.items):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        request.getfixturevalue("demo_run")
    except (Exception, pytest.skip.Exception, pytest.fail.Exception):
        pass  # pytest keeps the error: the tests that need the fixture report it, not this first test
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def served_app(tmp_path_factory, service_mark):
    """`coltran serve` (its own Ray, its generated API token) for the whole session: HTTP and browser tests."""
    from served_app import run_served_app

    with run_served_app(tmp_path_factory.mktemp("served-app"), f"{service_mark}/served-app") as app:
        yield app
