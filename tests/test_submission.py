"""Submitting the project's jobs to a token-authenticated multi-node Ray cluster as a user does: preprocessing and
batch colorization with `coltran submit` (token from RAY_AUTH_TOKEN, then from RAY_AUTH_TOKEN_PATH), training with
the README's `ray job submit --headers ... --working-dir . -- python -m pipelines.train JOB.yaml`; results read
back from MLflow and the batch manifest; submissions without the right token are refused."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from services import VENV_BIN, service_env

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(2400)]  # generous: a loaded 2-core box is 5x slower

ROOT = Path(__file__).resolve().parents[1]
IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-500"
STAGES = ("colorizer", "color_upsampler", "spatial_upsampler")
NAMES = {"colorizer": "coltran-colorizer", "color_upsampler": "coltran-color-upsampler",
         "spatial_upsampler": "coltran-spatial-upsampler"}
# global batch, max_steps: one pass over the 9 training rows at most (each new epoch is another Ray Data execution)
STEPS = {"colorizer": (2, 4), "color_upsampler": (2, 4), "spatial_upsampler": (1, 4)}
RUN, EXPERIMENT = "submitted-run", "submission-test"
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
             "MLFLOW_TRACKING_URI")
README_TRAIN = re.compile(r"^ray job submit --address http://HEAD:8265 .*?-- python -m pipelines\.train "
                          r"jobs/train_all\.yaml$", re.S | re.M)
# cluster/README.md's environment form (RAY_AUTH_MODE + RAY_AUTH_TOKEN_PATH, no header), here for a probe job
PROBE = ("import json, os, sys, pipelines; files = [os.path.join(d, f) for d, _, names in os.walk('.') for f in names]; "
         "print('PROBE', json.dumps({'python': sys.executable, 'cwd': os.getcwd(), 'pipelines': pipelines.__file__, "
         "'top': sorted(os.listdir('.')), 'files': len(files), 'bytes': sum(os.path.getsize(f) for f in files)}))")


@dataclass
class Flow:
    root: Path
    dataset: Path
    photos: list[Path]
    out: Path
    job_ids: dict[str, str] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def cli_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A user's shell: the venv first on PATH, HOME at `home`, no Ray or MLflow settings but `extra`."""
    return service_env(None, {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})}, drop=AUTH_VARS)


def run_cli(cmd: list[str] | str, env: dict[str, str], cwd: Path, timeout: float = 300,
            cluster=None) -> subprocess.CompletedProcess:
    """Run a command line (a string runs in bash); past `timeout`, stop the cluster's unfinished jobs and fail
    with their logs."""
    try:
        return subprocess.run(cmd, env=env, cwd=cwd, shell=isinstance(cmd, str), capture_output=True, text=True,
                              timeout=timeout, executable="/bin/bash" if isinstance(cmd, str) else None)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        logs = []
        if cluster is not None:
            client = cluster.job_client()
            for job in client.list_jobs():
                if not job.status.is_terminal():
                    client.stop_job(job.submission_id)
                    logs.append(f"--- {job.submission_id}: {job.entrypoint}\n"
                                f"{client.get_job_logs(job.submission_id)[-8000:]}")
        pytest.fail(f"{cmd} still running after {timeout} s\n{out[-3000:]}\n" + "\n".join(logs))


def readme_train_command(address: str, job_file: Path) -> str:
    """The README's `ray job submit` of the training job, word for word but for the address and the job file."""
    found = README_TRAIN.search((ROOT / "README.md").read_text())
    assert found, "README.md no longer shows `ray job submit --address http://HEAD:8265 ... jobs/train_all.yaml`"
    command = found.group(0)
    assert "--headers" in command and "--working-dir ." in command and "~/.ray/auth_token" in command, command
    return command.replace("http://HEAD:8265", address).replace("jobs/train_all.yaml", str(job_file))


def job_id_in(output: str, pattern: str) -> str:
    found = re.search(pattern, output)
    assert found, f"no job id in the output:\n{output[-3000:]}"
    return found.group(1)


def train_job(flow_root: Path, dataset: Path, tracking_uri: str) -> dict:
    """jobs/train_local.yaml with each stage pinned to its pool, `test` presets and a few steps."""
    job = yaml.safe_load((ROOT / "jobs" / "train_local.yaml").read_text())
    job.update(run_name=RUN, storage_path=str(flow_root / "runs"), dataset=str(dataset), models_dir=None)
    job["mlflow"].update(tracking_uri=tracking_uri, experiment=EXPERIMENT, alias="candidate")
    for stage, (batch, steps) in STEPS.items():
        spec = job["stages"][stage]
        spec["model"] = {"preset": "test"}
        spec["scaling"].update(pool=stage, num_workers=1, use_gpu=False, cpus_per_worker=1)
        spec["train"].update(batch_size=batch, max_steps=steps, checkpoint_every_steps=steps, eval_every_steps=0,
                             log_every_steps=2)  # evaluation is test_train.py's business
    return job


def batch_job(photos: Path, out: Path) -> dict:
    """jobs/colorize.yaml on a folder of photos, models from the registry, one small actor per stage, CPU."""
    job = yaml.safe_load((ROOT / "jobs" / "colorize.yaml").read_text())
    job.update(sources=[str(photos)], models="models:/@candidate", out=str(out), num_samples=1, device="cpu",
               progress_every_s=0)
    for stage in ("prepare", "write"):
        job[stage].update(batch_size=2, num_cpus=0.5)
    for stage in STAGES:
        job[stage].update(batch_size=2, pool_min=1, pool_max=1, num_cpus=0.5, num_threads=1)
    for stage in ("color_upsampler", "spatial_upsampler"):
        job[stage]["micro_batch"] = 1
    return job


@pytest.fixture(scope="module")
def flow(ray_pool_cluster, mlflow_server, tmp_path_factory) -> Flow:
    if not IMAGES.is_dir():
        pytest.skip(f"test images not found at {IMAGES}")
    root = tmp_path_factory.mktemp("submission")
    jpegs = sorted(IMAGES.glob("*.JPEG"))
    (root / "train_images").mkdir()
    (root / "photos").mkdir()
    for path in jpegs[:12]:
        shutil.copy(path, root / "train_images" / path.name)
    photos = [Path(shutil.copy(path, root / "photos" / path.name)) for path in jpegs[12:15]]
    home = root / "home"  # a user's home holding the token where Ray and the README look for it
    (home / ".ray").mkdir(parents=True)
    shutil.copy(ray_pool_cluster.token_path, home / ".ray" / "auth_token")
    flow = Flow(root, root / "dataset", photos, root / "colorized")
    url = ray_pool_cluster.dashboard_url
    coltran = str(VENV_BIN / "coltran")

    # 1. preprocessing: the project's own job file with --set overrides; token from RAY_AUTH_TOKEN
    start = time.monotonic()
    sets = [f"sources=[{root / 'train_images'}]", f"dest={flow.dataset}", "heldout_fraction=0.25",
            "min_rows_per_file=4", "batch_size=4"]
    done = run_cli([coltran, "submit", "preprocess", "jobs/preprocess.yaml", "--address", url, "--working-dir",
                    str(ROOT), *[f"--set={s}" for s in sets], "--timeout", "600"],
                   cli_env(root / "empty-home", {"RAY_AUTH_TOKEN": ray_pool_cluster.token}), cwd=root,
                   timeout=660, cluster=ray_pool_cluster)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    flow.job_ids["preprocess"] = job_id_in(done.stdout, r"submitted preprocess job (\S+) to")
    flow.seconds["preprocess"] = time.monotonic() - start
    print(f"preprocess job: {flow.seconds['preprocess']:.1f} s", flush=True)

    # 2. training: a probe job (environment form, not waited for) and the README's command, from the checkout
    job_file = root / "train.yaml"
    job_file.write_text(yaml.safe_dump(train_job(root, flow.dataset, mlflow_server.uri), sort_keys=False))
    env_auth = cli_env(root / "empty-home", {"RAY_AUTH_MODE": "token",
                                             "RAY_AUTH_TOKEN_PATH": str(ray_pool_cluster.token_path)})
    probe = run_cli([str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--no-wait", "--working-dir", ".",
                     "--", "python", "-c", PROBE], env_auth, cwd=ROOT, timeout=120)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    flow.job_ids["probe"] = job_id_in(probe.stdout, r"Job '(\S+)' submitted successfully")
    start = time.monotonic()
    done = run_cli(readme_train_command(url, job_file), cli_env(home), cwd=ROOT, timeout=1200,
                   cluster=ray_pool_cluster)
    flow.seconds["train"] = time.monotonic() - start
    flow.logs["train"] = done.stdout
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    flow.job_ids["train"] = job_id_in(done.stdout, r"Job '(\S+)' submitted successfully")
    print(f"training job: {flow.seconds['train']:.1f} s", flush=True)

    # 3. batch colorization from the registry; token from RAY_AUTH_TOKEN_PATH
    batch_file = root / "colorize.yaml"
    batch_file.write_text(yaml.safe_dump(batch_job(root / "photos", flow.out), sort_keys=False))
    start = time.monotonic()
    done = run_cli([coltran, "submit", "colorize", str(batch_file), "--address", url, "--working-dir", str(ROOT),
                    "--env", f"MLFLOW_TRACKING_URI={mlflow_server.uri}", "--env",
                    f"COLTRAN_MODEL_CACHE={root / 'model-cache'}", "--timeout", "600"],
                   cli_env(root / "empty-home", {"RAY_AUTH_TOKEN_PATH": str(ray_pool_cluster.token_path)}), cwd=root,
                   timeout=660, cluster=ray_pool_cluster)
    flow.seconds["colorize"] = time.monotonic() - start
    flow.logs["colorize"] = done.stdout
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    flow.job_ids["colorize"] = job_id_in(done.stdout, r"submitted colorize job (\S+) to")
    print(f"submission timings: { {k: round(v, 1) for k, v in flow.seconds.items()} }")
    return flow


def test_every_job_succeeded_on_the_cluster(flow, ray_pool_cluster):
    client = ray_pool_cluster.job_client()
    for kind, job_id in flow.job_ids.items():
        status = client.get_job_status(job_id)
        if kind == "probe":
            ray_pool_cluster.wait_job(job_id, timeout=60)
        else:
            assert str(status).endswith("SUCCEEDED"), f"{kind} job {job_id} ended {status}"
    assert f"Job '{flow.job_ids['train']}' succeeded" in flow.logs["train"]
    assert f"job {flow.job_ids['colorize']}: SUCCEEDED" in flow.logs["colorize"]
    manifest = json.loads((flow.dataset / "manifest.json").read_text())
    assert manifest["splits"]["heldout"]["images"] >= 1 and manifest["splits"]["train"]["images"] >= 6
    assert manifest["settings"]["heldout_fraction"] == 0.25  # the --set overrides reached the job


def test_working_dir_upload_is_the_checkout_without_venv_and_jobs_use_the_venv_python(flow, ray_pool_cluster):
    client = ray_pool_cluster.job_client()
    for kind, job_id in flow.job_ids.items():
        uri = client.get_job_info(job_id).runtime_env.get("working_dir", "")
        assert uri.startswith("gcs://_ray_pkg_"), f"{kind} job's working_dir was not uploaded: {uri!r}"
    logs = client.get_job_logs(flow.job_ids["probe"])
    probe = json.loads(logs.split("PROBE ", 1)[1].splitlines()[0])
    print(f"working_dir as the job sees it: {probe['files']} files, {probe['bytes'] / 1e6:.2f} MB")
    assert Path(probe["python"]).parent == VENV_BIN, probe["python"]  # the venv's python, first on PATH
    assert "runtime_resources/working_dir_files/_ray_pkg_" in probe["cwd"], probe["cwd"]
    assert Path(probe["pipelines"]).is_relative_to(probe["cwd"]), "the job must import the uploaded code"
    assert {"pipelines", "coltran", "jobs", "pyproject.toml"} <= set(probe["top"]), probe["top"]
    assert not {".venv", ".git", "coltran.egg-info", "__pycache__"} & set(probe["top"]), probe["top"]
    assert probe["bytes"] < 8_000_000, f"working_dir upload is {probe['bytes'] / 1e6:.1f} MB"


def _runs(mlflow_server):
    client = mlflow_server.client()
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], f"tags.`coltran.run_name` = '{RUN}' and "
                                                      "tags.`coltran.kind` = 'submission'")
    assert len(parents) == 1
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return client, parents[0], {run.data.tags["coltran.stage"]: run for run in children}, children


def test_training_results_in_mlflow(flow, mlflow_server, ray_pool_cluster):
    client, parent, runs, children = _runs(mlflow_server)
    assert parent.info.status == "FINISHED" and parent.data.params["dataset"] == str(flow.dataset)
    assert len(children) == 3 and set(runs) == set(STAGES)
    for stage, run in runs.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["coltran.final_step"] == str(STEPS[stage][1])
        assert "loss" in run.data.metrics and "images_per_s" in run.data.metrics
        nodes = json.loads(run.data.tags["coltran.worker_nodes"])
        assert [n["labels"]["pool"] for n in nodes] == [stage]
        assert [n["node_id"] for n in nodes] == [ray_pool_cluster.node_ids[stage]]
        version = client.get_model_version_by_alias(NAMES[stage], "candidate")
        assert version.run_id == run.info.run_id, f"{NAMES[stage]}@candidate is not this submission's {stage}"
        assert f"stage {stage}: ok at step {STEPS[stage][1]}, registered version {version.version}" \
            in flow.logs["train"]


def test_batch_job_colorized_every_photo_with_the_registered_models(flow, mlflow_server):
    client = mlflow_server.client()
    rows = pq.read_table(flow.out / "manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(p.name for p in flow.photos)
    for row in rows:
        assert row["status"] == "done" and row["attempt"] == 1, row
        for stage in STAGES:
            version = client.get_model_version_by_alias(NAMES[stage], "candidate").version
            assert row[f"{stage}_model"] == f"models:/{NAMES[stage]}/{version}"
        assert len(row["outputs"]) == 1
        with Image.open(flow.out / row["outputs"][0]) as out, Image.open(flow.root / "photos" / row["key"]) as src:
            assert out.mode == "RGB" and out.size == src.size == (row["width"], row["height"])


def test_submissions_without_the_right_token_are_refused(flow, ray_pool_cluster):
    root, url = flow.root, ray_pool_cluster.dashboard_url
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
