"""Proves the shared test services work as the later suites use them: Ray jobs placed on the stage pools
through the token-authenticated job API (and refused without the token), MLflow nested runs, S3 on moto."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
from ray_pool import HEAD_POOL, WORKER_POOLS, connected_driver
from services import marked_pids, reap, run_s3_server, service_env, start_watchdog

pytestmark = pytest.mark.timeout(300)

# One task per pool, pinned by node label, each reporting the node it ran on.
PLACEMENT_DRIVER = """
import json, ray
ray.init()
@ray.remote(num_cpus=1)
def node_of_task():
    return ray.get_runtime_context().get_node_id()
pools = {pools!r}
refs = {{p: node_of_task.options(label_selector={{"pool": p}}).remote() for p in pools}}
print("PLACED " + json.dumps({{p: ray.get(r) for p, r in refs.items()}}))
"""


@pytest.mark.ray
def test_cluster_has_one_labelled_node_per_pool(ray_pool_cluster):
    nodes = ray_pool_cluster.alive_nodes()
    assert sorted(n["labels"]["pool"] for n in nodes) == sorted([HEAD_POOL, *WORKER_POOLS])
    assert {n["node_ip"] for n in nodes} == {"127.0.0.2"}
    assert all(n["resources_total"]["CPU"] == 2 for n in nodes)
    # Start-up time is reported, not asserted: on a shared 2-core machine it ranges from ~10 s to ~40 s.
    print("pool cluster start-up (s):", {k: round(v, 1) for k, v in ray_pool_cluster.startup_s.items()})


@pytest.mark.ray
def test_job_tasks_land_on_their_labelled_pools(ray_pool_cluster):
    pools = [*WORKER_POOLS, HEAD_POOL]
    code = PLACEMENT_DRIVER.format(pools=pools)
    client = ray_pool_cluster.job_client()
    job_id = client.submit_job(entrypoint=f"python -c {shlex.quote(code)}")
    logs = ray_pool_cluster.wait_job(job_id, timeout=180)
    placed = json.loads(re.search(r"^PLACED (\{.*\})$", logs, re.MULTILINE).group(1))
    assert placed == {pool: ray_pool_cluster.node_ids[pool] for pool in pools}
    assert len(set(placed.values())) == len(pools)


@pytest.mark.ray
def test_in_process_driver_pins_an_actor_to_a_pool_and_cleans_up(ray_pool_cluster, monkeypatch):
    import ray
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    with connected_driver(ray_pool_cluster):  # what the `ray_pool_driver` fixture does

        @ray.remote(num_cpus=1, label_selector={"pool": "spatial_upsampler"})
        class Probe:
            def node(self):
                return ray.get_runtime_context().get_node_id()

        assert ray.get(Probe.remote().node.remote(), timeout=60) == ray_pool_cluster.node_ids["spatial_upsampler"]
        assert get_auth_headers_if_auth_enabled({}) == {"authorization": ray_pool_cluster.headers["Authorization"]}
    assert not ray.is_initialized()
    assert "RAY_AUTH_MODE" not in os.environ
    assert get_auth_headers_if_auth_enabled({}) == {}, "cached token mode must not outlive the driver"


@pytest.mark.ray
def test_job_api_refuses_clients_without_the_token(ray_pool_cluster, monkeypatch):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)  # the client must not find a token on its own either
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="Authentication required"):
        JobSubmissionClient(ray_pool_cluster.dashboard_url)
    with pytest.raises(AuthenticationError, match="Authentication failed"):
        JobSubmissionClient(ray_pool_cluster.dashboard_url, headers={"Authorization": "Bearer " + "0" * 64})
    assert time.monotonic() - start < 10, "refusal should be immediate over HTTP, not after retries"


@pytest.mark.ray
def test_driver_connects_to_gcs_address_with_token_env(ray_pool_cluster):
    code = "import ray; ray.init(address={!r}); print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
    done = subprocess.run([sys.executable, "-c", code.format(ray_pool_cluster.address)],
                          env=ray_pool_cluster.client_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ALIVE 4" in done.stdout


def test_mlflow_nested_runs_round_trip(mlflow_server):
    client = mlflow_server.client()
    experiment_id = client.create_experiment(f"services-{time.time_ns()}")
    parent = client.create_run(experiment_id, run_name="train_all")
    child = client.create_run(experiment_id, run_name="colorizer",
                              tags={"mlflow.parentRunId": parent.info.run_id})
    client.log_metric(child.info.run_id, "loss", 1.25, step=3)
    client.log_text(child.info.run_id, "hello", "notes/hello.txt")
    for run in (child, parent):
        client.set_terminated(run.info.run_id)
    found = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [r.info.run_id for r in found] == [child.info.run_id]
    assert found[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_metric_history(child.info.run_id, "loss")[0].step == 3
    assert [f.path for f in client.list_artifacts(child.info.run_id, "notes")] == ["notes/hello.txt"]
    assert list(mlflow_server.artifact_root.rglob("hello.txt")), "artifacts must land in the local root"


def test_s3_put_get_and_list_with_pyarrow(s3_server, tmp_path):
    from pyarrow import fs

    bucket = s3_server.create_bucket(f"services-{time.time_ns()}")
    s3_server.client().put_object(Bucket=bucket, Key="raw/one.txt", Body=b"one")
    assert s3_server.client().get_object(Bucket=bucket, Key="raw/one.txt")["Body"].read() == b"one"
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "a.bin").write_bytes(b"\x00\x01")
    (tmp_path / "imgs" / "sub" / "b.bin").write_bytes(b"\x02")
    keys = s3_server.upload_folder(tmp_path / "imgs", bucket, "data/imgs")
    assert keys == ["data/imgs/a.bin", "data/imgs/sub/b.bin"]
    listed = s3_server.filesystem().get_file_info(fs.FileSelector(f"{bucket}/data", recursive=True))
    files = sorted(info.path for info in listed if info.type == fs.FileType.File)
    assert files == [f"{bucket}/data/imgs/a.bin", f"{bucket}/data/imgs/sub/b.bin"]


def test_s3_env_lets_default_clients_reach_moto(s3_server, s3_env):
    import boto3

    bucket = s3_server.create_bucket(f"env-{time.time_ns()}")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert bucket in [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]


def test_services_leave_no_process_behind_even_when_pytest_dies(tmp_path):
    mark = f"leakcheck-{time.time_ns()}"
    with run_s3_server(tmp_path / "a", f"{mark}/s3"):
        assert marked_pids(f"{mark}/s3")
    assert marked_pids(f"{mark}/s3") == []
    # A killed parent (here a stand-in process) must not leave its services running: the watchdog reaps them.
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    watchdog = start_watchdog(mark, parent=stand_in.pid)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                              env=service_env(f"{mark}/orphan"), start_new_session=True)
    assert marked_pids(mark, prefix=True) == [orphan.pid]
    stand_in.kill()
    stand_in.wait()
    assert watchdog.wait(timeout=30) == 0
    assert orphan.wait(timeout=5) == -15
    assert marked_pids(mark, prefix=True) == []


def test_reaping_finds_unmarked_processes_in_a_service_session_and_spares_ours():
    """Ray's dashboard and runtime-env agents overwrite their environment with their process titles, mark
    included: they are found through the process session of their marked node (every service starts one)."""
    mark = f"sessioncheck-{time.time_ns()}"
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
              "env={}); time.sleep(600)")  # a child with an empty environment, in its parent's session
    leader = subprocess.Popen([sys.executable, "-c", script], env=service_env(f"{mark}/node"), start_new_session=True)
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=service_env(f"{mark}/own"))
    try:
        deadline = time.monotonic() + 30
        while len(found := marked_pids(f"{mark}/node")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leader.pid in found and len(found) == 2, found
        assert marked_pids(f"{mark}/own") == [ours.pid]  # its session is pytest's: nothing else of it counts
        assert reap(f"{mark}/node") == []
        assert leader.wait(timeout=5) == -15 and ours.poll() is None
    finally:
        for proc in (leader, ours):
            proc.kill()
            proc.wait()
