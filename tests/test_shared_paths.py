"""Nodes that share no disk (the pool cluster of ray_pool.py: each worker node has its own tmpfs over the cluster's
`scratch` path): the harness really separates the nodes, and every job given a node-local output path or MLflow
store, or a models directory that only the driver's node has, refuses before doing any work, saying why and what
to use instead (preprocessing submitted with `coltran submit`; the other jobs' entry points run in this process,
a driver on the head node as a submitted job's is). The same jobs on shared storage (S3 and the MLflow server) are the session's training submission
(cluster_flow.py)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
import yaml
from cluster_flow import ROOT, cli_env, run_cli, train_job
from ray_pool import HEAD_POOL, WORKER_POOLS, connected_driver
from services import VENV_BIN

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

ADVICE = "Use an s3:// prefix"
# One task pinned to each pool's node: does it see the file the test wrote, and what does it find in scratch?
PROBE = """
import json, os, sys, ray
ray.init()
@ray.remote(num_cpus=0)
def look(scratch, mine):
    with open(os.path.join(scratch, "written-by-" + mine), "w") as f:
        f.write(mine)
    return {{"sees_test_file": os.path.exists(os.path.join(scratch, "from-the-test")),
             "entries": sorted(os.listdir(scratch))}}
pools = {pools!r}
refs = {{p: look.options(label_selector={{"pool": p}}).remote({scratch!r}, p) for p in pools}}
print("SEEN " + json.dumps({{p: ray.get(r) for p, r in refs.items()}}))
"""


def _job(cluster, entrypoint: str) -> tuple[str, str]:
    """Submit `entrypoint` through the job API and wait; (final status, logs)."""
    client = cluster.job_client()
    job_id = client.submit_job(entrypoint=entrypoint,
                               runtime_env={"working_dir": str(ROOT), "excludes": [".venv", ".git"],
                                            "env_vars": {"RAY_ADDRESS": cluster.address}})
    try:
        cluster.wait_job(job_id, timeout=600)
        status = "SUCCEEDED"
    except Exception as err:  # wait_job raises on FAILED with the logs; the status is what matters here
        status = "FAILED" if "FAILED" in str(err) else f"ERROR: {err}"
    return status, client.get_job_logs(job_id)


def test_worker_nodes_have_private_scratch_disks(ray_pool_cluster):
    scratch = ray_pool_cluster.scratch
    (scratch / "from-the-test").write_text("head and test process")
    code = PROBE.format(pools=[HEAD_POOL, *WORKER_POOLS], scratch=str(scratch))
    status, logs = _job(ray_pool_cluster, f"python -c {shlex.quote(code)}")
    assert status == "SUCCEEDED", logs[-3000:]
    seen = json.loads(re.search(r"^SEEN (\{.*\})$", logs, re.MULTILINE).group(1))
    assert seen[HEAD_POOL]["sees_test_file"]  # the head shares the test process's disk
    for pool in WORKER_POOLS:  # each worker sees only what it wrote itself (other jobs of the session may have
        # left their own files there, e.g. the registry's model cache: only the probes' files are compared)
        mine = [e for e in seen[pool]["entries"] if e.startswith("written-by-") or e == "from-the-test"]
        assert not seen[pool]["sees_test_file"] and mine == [f"written-by-{pool}"], seen
    written = {p.name for p in scratch.iterdir() if p.name.startswith("written-by-")}
    assert written == {f"written-by-{HEAD_POOL}"}, "a worker node's file reached the test process's disk"


def test_preprocess_refuses_a_node_local_dest(ray_pool_cluster, tmp_path):
    (tmp_path / "photos").mkdir()  # refused before the sources are read: an empty folder is enough
    dest = ray_pool_cluster.scratch / "preprocessed"
    done = run_cli([str(VENV_BIN / "coltran"), "submit", "preprocess", "jobs/preprocess.yaml", "--address",
                    ray_pool_cluster.dashboard_url, "--working-dir", str(ROOT), f"--set=sources=[{tmp_path / 'photos'}]",
                    f"--set=dest={dest}", "--timeout", "300"],
                   cli_env(tmp_path / "home", {"RAY_AUTH_TOKEN": ray_pool_cluster.token}), cwd=tmp_path, timeout=360,
                   cluster=ray_pool_cluster)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and f"preprocessing DEST {dest} is a local path that 3 of the cluster's 4 nodes" \
        in out and ADVICE in out, out[-4000:]
    assert not any(dest.rglob("*")), "the refused job wrote into DEST"


@pytest.fixture(scope="module")
def driver(ray_pool_cluster):
    """This process as the jobs' driver on the head node (where `ray job submit` runs a job's entry point), for
    the module: each refusal below runs its job's entry point here, and the check tasks reuse their workers."""
    with connected_driver(ray_pool_cluster) as cluster:
        yield cluster


def _refusal(entry_point, job_file, capsys) -> str:
    """Run a job's entry point (`python -m pipelines.X JOB_FILE`'s main) in this process; it must refuse (exit
    status 2); what it printed."""
    capsys.readouterr()
    status = entry_point([str(job_file)])
    out = capsys.readouterr()
    assert status == 2, f"exit status {status}\n{out.out[-3000:]}\n{out.err[-3000:]}"
    return out.out + out.err


def test_batch_refuses_a_node_local_out(driver, tmp_path, capsys):
    from coltran.init_models import init_models
    from pipelines.batch.job import main

    models = init_models(tmp_path / "models", "test")  # pytest's tmp dir: every node sees it
    (tmp_path / "photos").mkdir()
    out = driver.scratch / "colorized"
    job = {"sources": [str(tmp_path / "photos")], "models": str(models), "out": str(out), "device": "cpu"}
    (tmp_path / "colorize.yaml").write_text(yaml.safe_dump(job))
    logs = _refusal(main, tmp_path / "colorize.yaml", capsys)
    assert f"batch OUT {out} is a local path that 3 of the cluster's 4 nodes" in logs and ADVICE in logs, logs
    assert not any(out.rglob("*")), "the refused job wrote into OUT"


@pytest.mark.parametrize("job", ["batch", "evaluate"])
def test_batch_and_evaluation_refuse_a_models_directory_some_nodes_lack(driver, tmp_path, capsys, job):
    """Models under the scratch path exist on the head (the driver's node) only: the job stops before reading any
    image, naming the nodes that lack them and the registry as the way out, instead of actors failing one by one."""
    from coltran.init_models import init_models
    from pipelines.batch.job import main as batch_main
    from pipelines.evaluate.job import main as evaluate_main

    models = init_models(driver.scratch / f"models-{job}-{tmp_path.name}", "test")
    (tmp_path / "photos").mkdir()
    settings = {"models": str(models), "out": str(tmp_path / "out"), "device": "cpu"}
    settings.update({"sources": [str(tmp_path / "photos")]} if job == "batch" else
                    {"data": [str(tmp_path / "photos")], "tracking": {"enabled": False}})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(settings))
    logs = _refusal(batch_main if job == "batch" else evaluate_main, tmp_path / "job.yaml", capsys)
    assert f"the models {models} is a local path that 3 of the cluster's 4 nodes do not have" in logs \
        and "models:/@<alias>" in logs, logs
    assert not (tmp_path / "out").exists(), "the refused job wrote its output"


@pytest.mark.parametrize("what", ["storage_path", "tracking_uri"])
def test_training_refuses_node_local_run_storage_and_mlflow_store(driver, mlflow_server, tmp_path, capsys, what):
    from pipelines.train.__main__ import main

    job = train_job(str(tmp_path / "no-dataset-needed"), str(tmp_path / "runs"), tmp_path / "models", mlflow_server.uri)
    job["run_name"] = job["mlflow"]["experiment"] = f"refused-{what}"
    local = driver.scratch / f"train-{what}"
    if what == "storage_path":
        job["storage_path"], expected = str(local), f"training storage_path {local} is a local path"
    else:
        job["mlflow"]["tracking_uri"] = f"sqlite:///{local}/mlflow.db"
        expected = "tracking server (http://...)"
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(job))
    logs = _refusal(main, tmp_path / "train.yaml", capsys)
    assert expected in logs and "3 of the cluster's 4 nodes" in logs, logs
    assert mlflow_server.client().get_experiment_by_name(f"refused-{what}") is None  # no run was opened


def test_unshare_is_available():
    """The harness needs mount namespaces (root); say so plainly where they are missing."""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "true"], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"unshare --mount failed (the multi-node harness needs root): {done.stderr}"
