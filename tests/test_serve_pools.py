"""jobs/serve.yaml as written (deployments, autoscaling, label selectors) deployed with `serve run` onto the
labelled pool cluster of nodes that share no disk (tests/ray_pool.py): the replicas load the models that the
session's training submission registered in MLflow, every stage's replica lands on its own pool's node and the
app answers; a models directory that only some nodes have is refused."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import requests
import yaml
from cluster_flow import ALIAS, STAGES
from PIL import Image
from ray_pool import connected_driver
from services import VENV_BIN, free_port

from coltran.init_models import init_models

JOB_FILE = Path(__file__).resolve().parents[1] / "jobs" / "serve.yaml"
DEPLOYMENT_POOLS = {"Colorizer": "colorizer", "ColorUpsampler": "color_upsampler",
                    "SpatialUpsampler": "spatial_upsampler", "Ingress": "cpu"}

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _local_copy(tmp_path: Path, models: str | Path, port: int, token_file: Path,
                tracking_uri: str | None = None) -> Path:
    """The job file with only what the test cluster needs changed: its models and MLflow server, a free loopback
    port, one HTTP proxy (all the test cluster's nodes share one loopback address, so only one can bind the
    port), no GPUs (it has none), and the API token from a file rather than the nodes' environment."""
    config = yaml.safe_load(JOB_FILE.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["proxy_location"] = "HeadOnly"
    assert config["applications"][0]["args"]["auth"].get("disabled") is not True
    for deployment in config["applications"][0]["deployments"]:  # CPU-only pools: the documented edit
        deployment["ray_actor_options"].pop("num_gpus", None)
    config["applications"][0]["args"].update(models=str(models), tracking_uri=tracking_uri,
                                             auth={"token_file": str(token_file)})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_healthy(url: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{url}/healthz", timeout=10)
            if response.status_code == 200:
                return response.json()
            last = f"HTTP {response.status_code}: {response.text[:300]}"
        except requests.RequestException as err:
            last = repr(err)
        time.sleep(1.0)
    raise AssertionError(f"the app from {JOB_FILE.name} was not healthy after {timeout:.0f} s: {last}")


def test_job_file_serves_the_registered_models_each_stage_on_its_pool(cluster_flow, ray_pool_cluster,
                                                                       mlflow_server, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(JOB_FILE.read_text()))
    port = free_port()
    token = secrets.token_hex(32)
    (tmp_path / "token").write_text(token)
    config = _local_copy(tmp_path, f"models:/@{ALIAS}", port, tmp_path / "token", tracking_uri=mlflow_server.uri)
    run = subprocess.run([str(VENV_BIN / "serve"), "run", "--non-blocking", "--address", ray_pool_cluster.address,
                          str(config)], env=ray_pool_cluster.client_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with connected_driver(ray_pool_cluster):
        from ray import serve

        try:
            url = f"http://127.0.0.1:{port}"
            health = _wait_healthy(url, 300)
            assert health["untrained"] is False and set(health["models"]) == set(STAGES)
            for stage in STAGES:  # the versions the session's training job registered at @candidate
                assert health["models"][stage]["version"] == cluster_flow.versions[stage], health
            gray = Image.new("L", (40, 30), 128)
            response = requests.post(f"{url}/colorize", data=_png(gray), params={"resolution": "256"}, timeout=300)
            assert response.status_code == 401, response.text
            response = requests.post(f"{url}/colorize", data=_png(gray), params={"resolution": "256"}, timeout=300,
                                     headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200, response.text
            placed = replica_nodes(ray_pool_cluster)
            expected = {name: ray_pool_cluster.node_ids[pool] for name, pool in DEPLOYMENT_POOLS.items()}
            assert placed == expected, f"replicas on {placed}, pools' nodes {ray_pool_cluster.node_ids}"
        finally:
            serve.shutdown()


def replica_nodes(cluster) -> dict[str, str]:
    """deployment name -> node id of its alive replica, from the state API (authenticated with the token)."""
    request = urllib.request.Request(f"{cluster.dashboard_url}/api/v0/actors?limit=1000", headers=cluster.headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        actors = json.load(response)["data"]["result"]["result"]
    prefix = "ServeReplica:coltran:"
    return {a["class_name"].removeprefix(prefix): a["node_id"] for a in actors
            if a["state"] == "ALIVE" and a["class_name"].startswith(prefix)}


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_models_directory_missing_on_some_nodes_is_refused(ray_pool_cluster, tmp_path):
    """Models under the cluster's scratch path exist on the head only (each worker node has its own scratch): the
    app fails to deploy with a message naming the nodes that lack them and what to use, before any replica
    starts on a node where its checkpoint is missing, and at the first build attempt (no retries)."""
    models = init_models(ray_pool_cluster.scratch / f"models-{secrets.token_hex(4)}", "test")
    (tmp_path / "token").write_text(secrets.token_hex(32))
    config = _local_copy(tmp_path, models, free_port(), tmp_path / "token")
    run = subprocess.run([str(VENV_BIN / "serve"), "run", "--non-blocking", "--address", ray_pool_cluster.address,
                          str(config)], env=ray_pool_cluster.client_env(), capture_output=True, text=True,
                         timeout=300)
    with connected_driver(ray_pool_cluster):
        from ray import serve

        try:
            message = run.stdout + run.stderr
            if run.returncode == 0:  # deployed in the background: the application's status says why it failed
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    app = serve.status().applications.get("coltran")
                    if app is not None and app.status == "DEPLOY_FAILED":
                        message = app.message
                        break
                    time.sleep(1.0)
            assert "3 of the cluster's 4 nodes do not have" in message, message[-3000:]
            assert "models:/@<alias>" in message and str(models) in message
            # reported at once, as a RayServeException: any other exception Serve retries three times, each in a
            # new worker, and shows as a traceback
            assert "Traceback" not in message, message[-3000:]
            assert not replica_nodes(ray_pool_cluster), "no replica may start"
        finally:
            serve.shutdown()
