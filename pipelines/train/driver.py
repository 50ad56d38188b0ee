"""The training driver: loads the job file, opens the MLflow parent run and a child run per stage, runs one
Ray Train `TorchTrainer` per enabled stage concurrently (one thread each, pinned to its pool by node label),
then writes each finished stage's EMA checkpoint to the models directory and registers it in MLflow."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
import yaml
from ray.train import CheckpointConfig, DataConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from coltran.checkpoint import load_checkpoint, save_checkpoint
from coltran.configs import ConfigError, config_to_dict
from pipelines.io.s3 import resolve_path
from pipelines.io.shared_path import SharedPathError, require_shared_path, require_shared_tracking_uri
from pipelines.tracking.registry import register_stage
from pipelines.tracking.runs import RunLogger, SubmissionRuns, finish_run, open_submission
from pipelines.train.config import JobConfig, flatten, job_to_dict, load_job
from pipelines.train.data import open_train_dataset
from pipelines.train.worker import train_loop


@dataclass
class StageOutcome:
    stage: str
    ok: bool
    step: int | None = None
    checkpoint: str | None = None  # the latest Ray Train checkpoint (run storage)
    models_dir: str | None = None  # the exported final checkpoint (models directory entry)
    version: str | None = None  # registered model version
    error: str | None = None


def build_trainer(job: JobConfig, stage: str, run_id: str, tracking_uri: str) -> TorchTrainer:
    """The stage's TorchTrainer: its pool, workers, data, checkpoint retention and retries from `job`."""
    spec = job.stage(stage)
    s, t = spec.scaling, spec.train
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    scaling = ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                            label_selector={"pool": s.pool} if s.pool else None)
    fs, storage = resolve_path(job.storage_path)
    run_config = RunConfig(name=job.stage_run_name(stage), storage_path=storage, storage_filesystem=fs,
                           checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                           failure_config=FailureConfig(max_failures=t.max_failures))
    datasets = {"train": open_train_dataset(job.dataset, stage, job.train_split, job.cache_train_below_mb)}
    loop_config = {"job": job_to_dict(job), "stage": stage, "mlflow_run_id": run_id, "tracking_uri": tracking_uri}
    return TorchTrainer(train_loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config,
                        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]))


def finished_result(job: JobConfig, stage: str):
    """The stage's Ray Train result when its run's latest checkpoint has already reached max_steps (a
    re-submission after another stage failed): exporting and registering it needs no trainer, so no workers,
    pool or data are held for it. None when the run does not exist yet or has steps left."""
    fs, storage = resolve_path(job.storage_path)
    try:
        result = Result.from_path(f"{storage.rstrip('/')}/{job.stage_run_name(stage)}", storage_filesystem=fs)
    except RuntimeError:  # no run folder, or no checkpoint recorded in it yet
        return None
    step = (result.metrics or {}).get("step")
    if result.checkpoint is None or step is None or step < job.stage(stage).train.max_steps:
        return None
    print(f"stage {stage}: its run is at step {step} of max_steps {job.stage(stage).train.max_steps}, nothing to "
          "train: exporting and registering its latest checkpoint", flush=True)
    return result


def export_stage(job: JobConfig, stage: str, checkpoint, run_id: str, directory: Path) -> int:
    """Write the final weights (raw + EMA, no optimizer) of a Ray checkpoint as a coltran checkpoint; one of
    another model config than the job's is a CheckpointError, as when a trainer restores it."""
    with checkpoint.as_directory() as source:
        ckpt = load_checkpoint(source, weights="model", stage=stage, with_training_state=True,
                               expected_config=job.stage(stage).model_config(stage))
    meta = {"run_name": job.run_name, "mlflow_run_id": run_id, "ray_checkpoint": checkpoint.path}
    save_checkpoint(directory, ckpt.model, ema_state=ckpt.ema_state, step=ckpt.step, meta=meta)
    return ckpt.step


def run_stage(job: JobConfig, stage: str, run_id: str, tracking_uri: str) -> StageOutcome:
    """Train one stage to its max_steps (resuming when the run exists; a finished run is only exported), export
    and register it."""
    try:
        result = finished_result(job, stage) or build_trainer(job, stage, run_id, tracking_uri).fit()
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise RuntimeError(f"stage {stage} finished without a checkpoint")
        outcome = StageOutcome(stage, ok=True, checkpoint=result.checkpoint.path)
        with tempfile.TemporaryDirectory(prefix=f"coltran-{stage}-") as tmp:
            target = Path(job.models_dir) / stage if job.models_dir else Path(tmp) / stage
            outcome.step = export_stage(job, stage, result.checkpoint, run_id, target)
            outcome.models_dir = str(target) if job.models_dir else None
            outcome.version = register_stage(
                target, run_id=run_id, name=getattr(job.mlflow.registered_models, stage),
                alias=job.mlflow.alias, tracking_uri=tracking_uri, source=result.checkpoint.path)
    except Exception as err:  # one stage failing must not stop the others
        traceback.print_exc()
        outcome = StageOutcome(stage, ok=False, error=f"{type(err).__name__}: {err}")
    finish_run(run_id, outcome.ok, tracking_uri)
    return outcome


def run_job(job: JobConfig, job_text: str | None = None) -> dict[str, StageOutcome]:
    """Train every enabled stage at once; returns the outcome per stage (Ray must be initialised)."""
    tracking_uri = job.mlflow.tracking_uri or mlflow.get_tracking_uri()
    ray.data.DataContext.get_current().enable_progress_bars = False  # one progress line per step is noise
    stages = job.enabled_stages()
    runs = open_submission(job.run_name, stages, experiment=job.mlflow.experiment,
                                    tracking_uri=tracking_uri)
    _log_config(job, runs, job_text, tracking_uri)
    outcomes: dict[str, StageOutcome] = {}

    def target(stage: str) -> None:
        outcomes[stage] = run_stage(job, stage, runs.children[stage], tracking_uri)

    threads = [threading.Thread(target=target, args=(s,), name=f"train-{s}") for s in stages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    parent = RunLogger(runs.parent_id, tracking_uri)
    parent.tags({f"coltran.status.{s}": "ok" if o.ok else "failed" for s, o in outcomes.items()})
    finish_run(runs.parent_id, all(o.ok for o in outcomes.values()), tracking_uri)
    return outcomes


def _log_config(job: JobConfig, runs: SubmissionRuns, job_text: str | None, uri: str) -> None:
    resolved = yaml.safe_dump(job_to_dict(job), sort_keys=False)
    parent = RunLogger(runs.parent_id, uri)
    parent.params(flatten(job_to_dict(job)))
    parent.artifact_text(resolved, "config/job_resolved.yaml")
    if job_text is not None:
        parent.artifact_text(job_text, "config/job_submitted.yaml")
    for stage, run_id in runs.children.items():
        spec = job.stage(stage)
        params = {**flatten(dataclasses.asdict(spec)), **flatten({"model_config": config_to_dict(
            spec.model_config(stage))}), "run_name": job.run_name, "dataset": job.dataset}
        RunLogger(run_id, uri).params(params)


def local_cpus_needed(job: JobConfig) -> int:
    """CPUs the enabled stages' workers reserve, plus one for Ray Data's read tasks."""
    s = [job.stage(name).scaling for name in job.enabled_stages()]
    return math.ceil(sum(x.num_workers * x.cpus_per_worker for x in s)) + 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job file, e.g. jobs/train_all.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job field by its dotted path, e.g. stages.colorizer.train.max_steps=10")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on 127.0.0.2)")


def run(args: argparse.Namespace) -> int:
    """`coltran train JOB [--set k=v ...]`: exit 0 when every stage finished, 1 when any failed, 2 on a bad job."""
    try:
        job = load_job(args.job, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = False
    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:  # a local Ray on loopback, with at least the CPUs the job asks for (plus one for data reads)
            ray.init(_node_ip_address="127.0.0.2", include_dashboard=False,
                     num_cpus=max(os.cpu_count() or 1, local_cpus_needed(job)))
        started = True
    try:
        # before any run or trainer exists: every node's workers write checkpoints and log to these
        require_shared_path(job.storage_path, "training storage_path")
        require_shared_tracking_uri(job.mlflow.tracking_uri or mlflow.get_tracking_uri())
        outcomes = run_job(job, Path(args.job).read_text())
    except SharedPathError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if started:
            ray.shutdown()
    for stage, o in outcomes.items():
        state = f"ok at step {o.step}, registered version {o.version}" if o.ok else f"FAILED: {o.error}"
        print(f"stage {stage}: {state}")
    failed = [s for s, o in outcomes.items() if not o.ok]
    if failed:
        print(f"error: stage(s) {', '.join(failed)} failed", file=sys.stderr)
        return 1
    return 0
