"""Submitting the project's jobs to a token-authenticated multi-node Ray cluster as a user does (the session's
cluster_cluster_flow.py): preprocessing and batch colorization with `coltran submit` (token from RAY_AUTH_TOKEN, then from
RAY_AUTH_TOKEN_PATH), training with the README's `ray job submit --headers ... --working-dir . -- python -m
pipelines.train JOB.yaml`; results read back from MLflow and the batch manifest; submissions without the right
token are refused."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import pytest
from cluster_flow import EVAL_IMAGES, NAMES, PHOTOS, PLAN, ROOT, STAGES, cli_env, run_cli, submission_runs
from PIL import Image
from services import VENV_BIN

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(2400)]  # generous: a loaded 2-core box is 5x slower


def test_every_job_succeeded_on_the_cluster(cluster_flow, ray_pool_cluster):
    client = ray_pool_cluster.job_client()
    for kind, job_id in cluster_flow.job_ids.items():
        status = client.get_job_status(job_id)
        if kind == "probe":
            ray_pool_cluster.wait_job(job_id, timeout=60)
        else:
            assert str(status).endswith("SUCCEEDED"), f"{kind} job {job_id} ended {status}"
    assert f"Job '{cluster_flow.job_ids['train']}' succeeded" in cluster_flow.logs["train"]
    assert f"job {cluster_flow.job_ids['colorize']}: SUCCEEDED" in cluster_flow.logs["colorize"]
    assert f"job {cluster_flow.job_ids['evaluate']}: SUCCEEDED" in cluster_flow.logs["evaluate"]
    manifest = json.loads(cluster_flow.read_bytes(f"{cluster_flow.dataset}/manifest.json"))
    assert manifest["splits"]["heldout"]["images"] >= 1 and manifest["splits"]["train"]["images"] >= 6
    assert manifest["settings"]["heldout_fraction"] == 0.25  # the --set overrides reached the job


def test_working_dir_upload_is_the_checkout_without_venv_and_jobs_use_the_venv_python(cluster_flow, ray_pool_cluster):
    client = ray_pool_cluster.job_client()
    for kind, job_id in cluster_flow.job_ids.items():
        uri = client.get_job_info(job_id).runtime_env.get("working_dir", "")
        assert uri.startswith("gcs://_ray_pkg_"), f"{kind} job's working_dir was not uploaded: {uri!r}"
    logs = client.get_job_logs(cluster_flow.job_ids["probe"])
    probe = json.loads(logs.split("PROBE ", 1)[1].splitlines()[0])
    print(f"working_dir as the job sees it: {probe['files']} files, {probe['bytes'] / 1e6:.2f} MB")
    assert Path(probe["python"]).parent == VENV_BIN, probe["python"]  # the venv's python, first on PATH
    assert "runtime_resources/working_dir_files/_ray_pkg_" in probe["cwd"], probe["cwd"]
    assert Path(probe["pipelines"]).is_relative_to(probe["cwd"]), "the job must import the uploaded code"
    assert {"pipelines", "coltran", "jobs", "pyproject.toml"} <= set(probe["top"]), probe["top"]
    assert not {".venv", ".git", "coltran.egg-info", "__pycache__"} & set(probe["top"]), probe["top"]
    assert probe["bytes"] < 8_000_000, f"working_dir upload is {probe['bytes'] / 1e6:.1f} MB"
    assert probe["nodes"] == len(ray_pool_cluster.node_ids), "the job's ray.init() must join the whole cluster"


def test_training_results_in_mlflow(cluster_flow, mlflow_server, ray_pool_cluster):
    client, parent, runs, children = submission_runs(mlflow_server)
    assert parent.info.status == "FINISHED" and parent.data.params["dataset"] == str(cluster_flow.dataset)
    assert len(children) == 3 and set(runs) == set(STAGES)
    for stage, run in runs.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["coltran.final_step"] == str(PLAN[stage][2])
        assert "loss" in run.data.metrics and "images_per_s" in run.data.metrics
        nodes = json.loads(run.data.tags["coltran.worker_nodes"])
        assert [n["labels"]["pool"] for n in nodes] == [stage] * PLAN[stage][0]
        assert [n["node_id"] for n in nodes] == [ray_pool_cluster.node_ids[stage]] * PLAN[stage][0]
        version = client.get_model_version(NAMES[stage], cluster_flow.versions[stage])
        assert version.run_id == run.info.run_id, f"{NAMES[stage]}@candidate is not this submission's {stage}"
        assert f"stage {stage}: ok at step {PLAN[stage][2]}, registered version {version.version}" \
            in cluster_flow.logs["train"]


def test_batch_job_colorized_every_photo_with_the_registered_models(cluster_flow):
    rows = cluster_flow.read_table(f"{cluster_flow.out}/manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(p.name for p in cluster_flow.photos)
    for row in rows:
        assert row["status"] == "done" and row["attempt"] == 1, row
        for stage in STAGES:  # the versions that the training job registered at @candidate
            assert row[f"{stage}_model"] == f"models:/{NAMES[stage]}/{cluster_flow.versions[stage]}"
        assert len(row["outputs"]) == 1
        source = cluster_flow.root / "photos" / row["key"]
        written = io.BytesIO(cluster_flow.read_bytes(f"{cluster_flow.out}/{row['outputs'][0]}"))
        with Image.open(written) as out, Image.open(source) as src:
            assert out.mode == "RGB" and out.size == src.size == (row["width"], row["height"])


def _state(cluster, kind: str, job_id: str) -> list[dict]:
    """Ray's state API (`actors` or `tasks`) for one job, finished ones included."""
    request = urllib.request.Request(f"{cluster.dashboard_url}/api/v0/{kind}?limit=10000&detail=1",
                                     headers=cluster.headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return [a for a in json.load(response)["data"]["result"]["result"] if a.get("job_id") == job_id]


def test_evaluation_report_in_s3_and_a_child_run_of_the_training(cluster_flow, mlflow_server):
    """`coltran submit evaluate` on the separate-disk cluster: the report went to S3 (the driver's disk is the
    head's), its figures cover every stage and the disjoint reference set, and its MLflow run is a child of the
    training submission holding the same report, with the versions that training registered."""
    metrics = json.loads(cluster_flow.read_bytes(f"{cluster_flow.report}/metrics.json"))
    assert metrics["counts"]["evaluated"] == EVAL_IMAGES and metrics["counts"]["reference"] == PHOTOS, metrics
    assert not metrics["missing"], metrics
    for stage in STAGES:
        assert 0 < metrics["metrics"][f"bits_per_dim/{stage}"] < 12, metrics
        assert metrics["models"][stage] == f"models:/{NAMES[stage]}/{cluster_flow.versions[stage]}", metrics
    for name in ("fid/colorized", "fid/grayscale", "fid/ground_truth"):
        assert metrics["metrics"][name] >= 0, metrics
    assert all(cluster_flow.exists(f"{cluster_flow.report}/{name}") for name in ("report.html", "report.md", "grid.png"))
    client, parent, _, _ = submission_runs(mlflow_server)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                           "and tags.`coltran.kind` = 'evaluation'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    assert runs[0].data.metrics["bits_per_dim/colorizer"] == pytest.approx(metrics["metrics"]["bits_per_dim/colorizer"])
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id, "report")} >= {"report/report.html",
                                                                                       "report/metrics.json"}
    assert f"MLflow run {runs[0].info.run_id}" in cluster_flow.logs["evaluate"]


def test_decode_and_write_tasks_ran_on_the_cpu_pool(cluster_flow, ray_pool_cluster):
    """Placement, from Ray's state API: preprocessing's read-decode-write tasks, the colorize job's reading,
    preparing and writing tasks and the evaluation's reading, preparing and digest tasks ran on the CPU pool's
    node (the head here), never on a training/stage node."""
    client = ray_pool_cluster.job_client()
    cpu = ray_pool_cluster.node_ids["cpu"]
    for job, markers in (("preprocess", ("process_items",)), ("colorize", ("prepare_batch", "write_batch")),
                         ("evaluate", ("parquet_rows", "image_rows", "digest_batch"))):
        tasks = _state(ray_pool_cluster, "tasks", client.get_job_info(cluster_flow.job_ids[job]).job_id)
        for marker in markers:
            nodes = {t.get("node_id") for t in tasks if marker in (t.get("name") or "")}
            assert nodes == {cpu}, f"{job}: {marker} tasks on {nodes}, CPU pool node {cpu}; " \
                                   f"tasks: {sorted({t.get('name') for t in tasks})}"


@pytest.mark.parametrize("job", ["colorize", "evaluate"])
def test_stage_actors_ran_on_their_pools(cluster_flow, ray_pool_cluster, job):
    """Placement, from Ray's state API: the batch and evaluation jobs' actors of each stage (Ray Data's map
    workers, whose names carry the stage's actor class) ran on that stage's pool node only."""
    job_id = ray_pool_cluster.job_client().get_job_info(cluster_flow.job_ids[job]).job_id
    actors = _state(ray_pool_cluster, "actors", job_id)
    for stage, actor_class in zip(STAGES, ("ColorizerActor", "ColorUpsamplerActor", "SpatialUpsamplerActor"),
                                  strict=True):
        nodes = {a["node_id"] for a in actors if actor_class in (a.get("repr_name") or "") + a["class_name"]}
        assert nodes == {ray_pool_cluster.node_ids[stage]}, (
            f"{job}: {actor_class} on {nodes}, pool node {ray_pool_cluster.node_ids[stage]}; "
            f"actors: {[(a['class_name'], a.get('repr_name')) for a in actors]}")


def test_submissions_without_the_right_token_are_refused(cluster_flow, ray_pool_cluster):
    root, url = cluster_flow.root, ray_pool_cluster.dashboard_url
    before = {job.submission_id for job in ray_pool_cluster.job_client().list_jobs()}
    nothing = cli_env(root / "empty-home")  # no RAY_AUTH_* and no ~/.ray/auth_token
    done = run_cli([str(VENV_BIN / "coltran"), "submit", "colorize", str(root / "colorize.yaml"), "--address", url,
                    "--working-dir", str(ROOT), "--no-wait"], nothing, cwd=root, timeout=120)
    assert done.returncode == 2 and "refused the submission" in done.stderr, done.stdout + done.stderr[-3000:]
    assert "Authentication required" in done.stderr
    wrong = json.dumps({"Authorization": "Bearer " + "0" * 64})
    for headers, expected in ((None, "Authentication required"), (wrong, "Authentication failed")):
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--no-wait", "--working-dir", ".",
               *(["--headers", headers] if headers else []), "--", "python", "-c", "print('should not run')"]
        done = run_cli(cmd, nothing, cwd=ROOT, timeout=120)
        assert done.returncode != 0 and expected in done.stdout + done.stderr, done.stdout + done.stderr[-3000:]
    after = {job.submission_id for job in ray_pool_cluster.job_client().list_jobs()}
    assert after == before, f"a refused submission created jobs {after - before}"
