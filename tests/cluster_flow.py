"""The suite's one training submission (a fixture builder, not tests): on the session's token-authenticated pool
cluster (worker nodes with private disks, tests/ray_pool.py), the MLflow server and the S3 server, as a user
does, it preprocesses 16 real photos from S3 to S3 with `coltran submit preprocess`, trains the three stages at
once with the README's `ray job submit` command (dataset and checkpoints in S3; a worker of the 2-worker stage
is SIGKILLed mid-run and must resume), colorizes a tar of 3 other photos from S3 to S3 with `coltran submit
colorize` from the registered models and evaluates those models on the held-out split with `coltran submit
evaluate` (report to S3, a child run of the training submission). Every byte the jobs share goes through S3 or
MLflow, as on machines that share no disk; each node downloads the registered models into a cache on its own
private disk. test_train.py, test_submission.py and the registry-based tests read what it leaves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from services import VENV_BIN, service_env
from shared_data import SAMPLE

from pipelines.tracking.names import REGISTERED_NAMES
from pipelines.train.worker import FAULT_ENV

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("colorizer", "color_upsampler", "spatial_upsampler")
NAMES = REGISTERED_NAMES  # `models:/@candidate` in the batch job resolves the product's default names
RUN, EXPERIMENT, ALIAS = "cluster-flow", "cluster-flow", "candidate"
BUCKET = "cluster-flow"
# stage: (workers, global batch, steps, checkpoint every) -- the colour upsampler runs DDP on 2 workers, whose
# start-up takes ~20 s longer here; the colorizer's 32 steps keep its step loop running well past that. The
# spatial upsampler (256x256, ~2.5 s a step here) takes 16: at 24 it trained alone for the job's last 30 s; at 12
# its loss fell by only 0.09-0.25 between the halves (6 seeds, a plain loop on these photos) against the 0.1
# test_train asks, at 16 by 0.37-0.61.
PLAN = {"colorizer": (1, 4, 32, 8), "color_upsampler": (2, 4, 16, 4), "spatial_upsampler": (1, 2, 16, 4)}
LR = {"colorizer": 3e-3, "color_upsampler": 3e-3, "spatial_upsampler": 5e-3}  # overfit a few images fast
KILL_STEP = 6  # rank 0 of the colour upsampler dies here on its first attempt; it resumes from step 4
LOG_EVERY = 2
TRAIN_IMAGES, PHOTOS = 16, 3
EVAL_IMAGES = 4  # the held-out split of the 16 training photos at heldout_fraction 0.25 (a stable hash of the key)
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
             "MLFLOW_TRACKING_URI")
README_TRAIN = re.compile(r"^ray job submit --address http://HEAD:8265 .*?-- python -m pipelines\.train "
                          r"jobs/train_all\.yaml$", re.S | re.M)
# cluster/README.md's environment form (RAY_AUTH_MODE + RAY_AUTH_TOKEN_PATH, no header), here for a probe job: what
# the job sees of its working_dir, and its driver's `ray.init()` joins the cluster it runs on (every node)
PROBE = ("import json, os, sys, ray, pipelines; files = [os.path.join(d, f) for d, _, names in os.walk('.') for f in names]; "
         "ray.init(); print('PROBE', json.dumps({'python': sys.executable, 'cwd': os.getcwd(), "
         "'pipelines': pipelines.__file__, 'top': sorted(os.listdir('.')), 'files': len(files), "
         "'bytes': sum(os.path.getsize(f) for f in files), 'nodes': sum(n['Alive'] for n in ray.nodes())}))")


@dataclass
class Flow:
    root: Path  # the user's local folder (job files, logs, the photos' originals)
    fs: object  # pyarrow S3FileSystem on the session's S3 server, for reading what the jobs wrote
    dataset: str  # s3:// URIs from here to `out`
    job_file: Path  # the training job as submitted (the re-submission test submits it again)
    storage: str
    models_dir: Path  # written by the training job's driver, on the head node (this machine)
    photos: list[Path]
    out: str  # the batch job's output
    report: str  # the evaluation job's report folder
    job_ids: dict[str, str] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # stage -> version registered by the training job

    def key(self, uri: str) -> str:
        assert uri.startswith(f"s3://{BUCKET}/"), uri
        return uri.removeprefix("s3://")

    def read_bytes(self, uri: str) -> bytes:
        with self.fs.open_input_file(self.key(uri)) as f:
            return f.read()

    def read_table(self, uri: str, **kwargs):
        import pyarrow.parquet as pq

        return pq.read_table(self.key(uri), filesystem=self.fs, **kwargs)

    def exists(self, uri: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self.key(uri)).type != fs.FileType.NotFound

    def folders(self, uri: str) -> list[str]:
        """URIs of the folders directly under `uri`, sorted."""
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.key(uri)))
        return sorted(f"s3://{i.path}" for i in infos if i.type == fs.FileType.Directory)


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


def readme_train_command(address: str, job_file: Path, env_vars: dict[str, str]) -> str:
    """The README's `ray job submit` of the training job, word for word but for the address, the job file and a
    runtime environment carrying the test's `env_vars`."""
    found = README_TRAIN.search((ROOT / "README.md").read_text())
    assert found, "README.md no longer shows `ray job submit --address http://HEAD:8265 ... jobs/train_all.yaml`"
    command = found.group(0)
    assert "--headers" in command and "--working-dir ." in command and "~/.ray/auth_token" in command, command
    runtime_env = json.dumps({"env_vars": env_vars})
    return (command.replace("http://HEAD:8265", address).replace("jobs/train_all.yaml", str(job_file))
            .replace("ray job submit", f"ray job submit --runtime-env-json '{runtime_env}'", 1))


def job_id_in(output: str, pattern: str) -> str:
    found = re.search(pattern, output)
    assert found, f"no job id in the output:\n{output[-3000:]}"
    return found.group(1)


def train_job(dataset: str, storage: str, models_dir: Path, tracking_uri: str) -> dict:
    """jobs/train_local.yaml with each stage pinned to its pool, `test` presets, PLAN's workers and steps."""
    job = yaml.safe_load((ROOT / "jobs" / "train_local.yaml").read_text())
    job.update(run_name=RUN, storage_path=storage, dataset=dataset, models_dir=str(models_dir))
    job["mlflow"].update(tracking_uri=tracking_uri, experiment=EXPERIMENT, alias=ALIAS)
    for stage, (workers, batch, steps, every) in PLAN.items():
        spec = job["stages"][stage]
        spec["model"] = {"preset": "test"}
        spec["scaling"].update(pool=stage, num_workers=workers, use_gpu=False, cpus_per_worker=1)
        spec["train"].update(batch_size=batch, max_steps=steps, lr=LR[stage], checkpoint_every_steps=every,
                             checkpoint_every_seconds=0, eval_every_steps=steps, eval_batches=1, sample_images=2,
                             log_every_steps=LOG_EVERY, keep_checkpoints=2, max_failures=1)
    return job


def batch_job(source: str, out: str) -> dict:
    """jobs/colorize.yaml on an archive of photos, models from the registry, one small actor per stage, CPU."""
    job = yaml.safe_load((ROOT / "jobs" / "colorize.yaml").read_text())
    job.update(sources=[source], models=f"models:/@{ALIAS}", out=out, num_samples=1, device="cpu",
               progress_every_s=0, tracking_uri=None)  # the other documented way: MLFLOW_TRACKING_URI (--env)
    for stage in ("prepare", "write"):
        job[stage].update(batch_size=2, num_cpus=0.5)
    for stage in STAGES:
        job[stage].update(batch_size=2, pool_min=1, pool_max=1, num_cpus=0.5, num_threads=1)
    for stage in ("color_upsampler", "spatial_upsampler"):
        job[stage]["micro_batch"] = 1
    return job


def evaluate_sets(flow: Flow, uri: str, tracking_uri: str, parent_run_id: str) -> list[str]:
    """--set overrides of jobs/evaluate.yaml: the held-out split of the flow's dataset against the 3 batch photos
    (a disjoint reference set), the registered models, the report to S3 (the Inception statistics cache stays on
    the driver's node, the one process that reads it), one small actor per pool, CPU."""
    sets = [f"data=[{flow.dataset}]", f"reference=[{uri}/archives/photos.tar]", f"num_images={EVAL_IMAGES}",
            f"num_reference={PHOTOS}", f"models=models:/@{ALIAS}", f"out={flow.report}", "device=cpu",
            "grid_images=2", f"cache_dir={flow.root / 'fid-cache'}", f"tracking.tracking_uri={tracking_uri}",
            f"tracking.parent_run_id={parent_run_id}", "prepare.batch_size=2", "prepare.num_cpus=0.5"]
    for pool in ("bits", *STAGES, "inception"):
        sets += [f"{pool}.batch_size=2", f"{pool}.pool_min=1", f"{pool}.pool_max=1", f"{pool}.num_cpus=0.5"]
    sets += [f"{stage}.micro_batch=1" for stage in ("color_upsampler", "spatial_upsampler")]
    return sets


def submission_runs(mlflow_server):
    """(client, the training submission's parent run, {stage: its stage run}, the stage runs): evaluations logged
    under the same parent are children too, and left out."""
    client = mlflow_server.client()
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], f"tags.`coltran.run_name` = '{RUN}' and "
                                                      "tags.`coltran.kind` = 'submission'")
    assert len(parents) == 1, "a re-submission must reuse the parent run"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}' "
                                                      "and tags.`coltran.kind` = 'stage'")
    return client, parents[0], {run.data.tags["coltran.stage"]: run for run in children}, children


def _timed(flow: Flow, step: str, start: float) -> None:
    flow.seconds[step] = time.monotonic() - start
    print(f"cluster flow, {step}: {flow.seconds[step]:.1f} s", flush=True)


def _coltran_submit(flow: Flow, cluster, kind: str, job_file: str, options: list[str], env: dict[str, str],
                    cwd: Path) -> None:
    """`coltran submit KIND JOB_FILE` of the checkout to `cluster`, waited for; its output and job id go to
    `flow`, its time too."""
    start = time.monotonic()
    done = run_cli([str(VENV_BIN / "coltran"), "submit", kind, job_file, "--address", cluster.dashboard_url,
                    "--working-dir", str(ROOT), *options, "--timeout", "600"], cli_env(flow.root / "empty-home", env),
                   cwd=cwd, timeout=660, cluster=cluster)
    flow.logs[kind] = done.stdout
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    flow.job_ids[kind] = job_id_in(done.stdout, rf"submitted {kind} job (\S+) to")
    _timed(flow, kind, start)


def run_flow(cluster, mlflow_server, s3_server, root: Path) -> Flow:
    """Preprocess, train and colorize on `cluster` as a user does; see the module docstring."""
    jpegs = sorted(SAMPLE.glob("*.JPEG"))
    (root / "train_images").mkdir()
    (root / "photos").mkdir()
    for path in jpegs[:TRAIN_IMAGES]:
        shutil.copy(path, root / "train_images" / path.name)
    photos = [Path(shutil.copy(path, root / "photos" / path.name))
              for path in jpegs[TRAIN_IMAGES:TRAIN_IMAGES + PHOTOS]]
    (root / "archives").mkdir()
    with tarfile.open(root / "archives" / "photos.tar", "w") as tar:
        for path in photos:
            tar.add(path, arcname=path.name)
    s3 = s3_server.create_bucket(BUCKET)
    s3_server.upload_folder(root / "train_images", s3, "train_images")
    s3_server.upload_folder(root / "archives", s3, "archives")
    home = root / "home"  # a user's home holding the token where Ray and the README look for it
    (home / ".ray").mkdir(parents=True)
    shutil.copy(cluster.token_path, home / ".ray" / "auth_token")
    uri = f"s3://{BUCKET}"
    flow = Flow(root, s3_server.filesystem(), f"{uri}/dataset", root / "train.yaml", f"{uri}/runs", root / "models",
                photos, f"{uri}/colorized", f"{uri}/evaluation")
    url = cluster.dashboard_url

    # 1. preprocessing: the project's own job file with --set overrides; token from RAY_AUTH_TOKEN
    sets = [f"sources=[{uri}/train_images]", f"dest={flow.dataset}", "heldout_fraction=0.25", "train_crops=8",
            "min_rows_per_file=8", "batch_size=4"]
    _coltran_submit(flow, cluster, "preprocess", "jobs/preprocess.yaml", [f"--set={s}" for s in sets],
                    {"RAY_AUTH_TOKEN": cluster.token}, cwd=root)

    # 2. training: a probe job (environment form, not waited for) and the README's command, from the checkout
    flow.job_file.write_text(yaml.safe_dump(train_job(flow.dataset, flow.storage, flow.models_dir, mlflow_server.uri), sort_keys=False))
    env_auth = cli_env(root / "empty-home", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token_path)})
    probe = run_cli([str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--no-wait", "--working-dir", ".",
                     "--", "python", "-c", PROBE], env_auth, cwd=ROOT, timeout=120)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    flow.job_ids["probe"] = job_id_in(probe.stdout, r"Job '(\S+)' submitted successfully")
    start = time.monotonic()
    # RAY_ADDRESS for every process of the job: Ray Train's helper actors otherwise auto-detect the cluster and
    # fail when other Ray instances run on the same machine (as on a shared test box).
    env_vars = {"RAY_ADDRESS": cluster.address, FAULT_ENV: f"color_upsampler:{KILL_STEP}"}
    done = run_cli(readme_train_command(url, flow.job_file, env_vars), cli_env(home), cwd=ROOT, timeout=1200,
                   cluster=cluster)
    flow.logs["train"] = done.stdout
    (root / "train.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    flow.job_ids["train"] = job_id_in(done.stdout, r"Job '(\S+)' submitted successfully")
    _timed(flow, "train", start)
    client = mlflow_server.client()
    flow.versions = {stage: client.get_model_version_by_alias(NAMES[stage], ALIAS).version for stage in STAGES}

    # 3. batch colorization from the registry; token from RAY_AUTH_TOKEN_PATH
    batch_file = root / "colorize.yaml"
    batch_file.write_text(yaml.safe_dump(batch_job(f"{uri}/archives/photos.tar", flow.out), sort_keys=False))
    token_path = {"RAY_AUTH_TOKEN_PATH": str(cluster.token_path)}
    model_cache = f"COLTRAN_MODEL_CACHE={cluster.scratch / 'model-cache'}"  # each node's own disk
    _coltran_submit(flow, cluster, "colorize", str(batch_file),
                    ["--env", f"MLFLOW_TRACKING_URI={mlflow_server.uri}", "--env", model_cache], token_path, cwd=root)

    # 4. evaluation of the registered models on the held-out split, a child run of the training submission
    sets = evaluate_sets(flow, uri, mlflow_server.uri, submission_runs(mlflow_server)[1].info.run_id)
    _coltran_submit(flow, cluster, "evaluate", "jobs/evaluate.yaml",
                    [*[f"--set={s}" for s in sets], "--env", model_cache], token_path, cwd=ROOT)
    return flow
