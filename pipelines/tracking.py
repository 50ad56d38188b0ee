"""MLflow for every job: a parent run per submission with a child run per stage (found again by tags, so a
resumed submission continues the same runs), logging, registering a stage as a pyfunc model whose artifact is
its coltran checkpoint directory, and `resolve_models` turning a directory or `models:/` URI into local files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

import coltran
from coltran.configs import STAGE_NAMES, ModelConfig, load_config
from pipelines.train.config import REGISTERED_NAMES

RUN_NAME_TAG, KIND_TAG, STAGE_TAG = "coltran.run_name", "coltran.kind", "coltran.stage"
PARENT_TAG = "mlflow.parentRunId"
PYFUNC_FILE = Path(__file__).with_name("coltran_pyfunc.py")
CACHE_ENV = "COLTRAN_MODEL_CACHE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
_FLUENT_LOCK = threading.Lock()  # mlflow.pyfunc.log_model uses the process-global fluent run state


@dataclass
class SubmissionRuns:
    experiment_id: str
    parent_id: str
    children: dict[str, str]  # stage -> run id
    resumed: bool  # the parent run existed already (same run name re-submitted)


def open_submission(run_name: str, stages: list[str], *, experiment: str,
                    tracking_uri: str | None = None) -> SubmissionRuns:
    """Get or create the parent run tagged with `run_name` and one child run per stage under it."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    found = client.search_runs([exp_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{KIND_TAG}` = "
                                         "'submission'", order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        parent_id = found[0].info.run_id
        client.update_run(parent_id, status="RUNNING")
    else:
        parent_id = client.create_run(exp_id, run_name=run_name,
                                      tags={RUN_NAME_TAG: run_name, KIND_TAG: "submission"}).info.run_id
    children = {}
    for run in client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{parent_id}'"):
        children.setdefault(run.data.tags.get(STAGE_TAG), run.info.run_id)
    for stage in stages:
        if stage not in children:
            tags = {RUN_NAME_TAG: run_name, KIND_TAG: "stage", STAGE_TAG: stage, PARENT_TAG: parent_id}
            children[stage] = client.create_run(exp_id, run_name=f"{run_name}/{stage}", tags=tags).info.run_id
        else:
            client.update_run(children[stage], status="RUNNING")
    return SubmissionRuns(exp_id, parent_id, {s: children[s] for s in stages}, resumed=bool(found))


def finish_run(run_id: str, ok: bool, tracking_uri: str | None = None) -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


class RunLogger:
    """Logs to one existing run by id (no global state): what a rank-0 worker and the driver use."""

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def image(self, array: np.ndarray, key: str, step: int) -> None:
        self.client.log_image(self.run_id, np.ascontiguousarray(array, np.uint8), key=key, step=step)

    def tags(self, values: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def params(self, values: dict[str, Any]) -> list[str]:
        """Log params not logged yet; MLflow params are immutable, so keys whose value changed since (a
        resumed run with an edited job file) are recorded in the tag `coltran.changed_params` and returned."""
        existing = self.client.get_run(self.run_id).data.params
        values = {k: _param_text(v) for k, v in values.items()}
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start:start + 100])
        if changed:
            self.tags({"coltran.changed_params": json.dumps({k: values[k] for k in changed})[:5000]})
        return changed

    def artifact_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)


def stage_signature(config: ModelConfig) -> ModelSignature:
    """Inputs and output of ColTranStageModel.predict for `config`'s stage, all uint8 tensors."""
    h, w = config.resolution
    spec = {"colorizer": ([("gray_64", (h, w))], ("colors3", (h, w, 3))),
            "color_upsampler": ([("gray_64", (h, w)), ("colors3", (h, w, 3))], ("rgb_64", (h, w, 3))),
            "spatial_upsampler": ([("gray_256", (h, w)), ("rgb_64", (h // 4, w // 4, 3))], ("rgb_256", (h, w, 3)))}
    inputs, (out_name, out_shape) = spec[config.stage]
    u8 = np.dtype(np.uint8)
    return ModelSignature(inputs=Schema([TensorSpec(u8, (-1, *shape), name) for name, shape in inputs]),
                          outputs=Schema([TensorSpec(u8, (-1, *out_shape), out_name)]))


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str | None):
    """`uri` for MLflow's fluent API inside the block only. mlflow.set_tracking_uri is process-global and also
    writes MLFLOW_TRACKING_URI into os.environ (so Ray workers started later would inherit it); both are put
    back afterwards. (MLflow's `_use_tracking_uri` would unset a variable the user had set.)"""
    if not uri:
        yield
        return
    from mlflow.tracking._tracking_service import utils as tracking_utils  # the global, pinned mlflow version

    saved, saved_env = tracking_utils._tracking_uri, os.environ.get(TRACKING_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop(TRACKING_ENV, None)
        else:
            os.environ[TRACKING_ENV] = saved_env


def register_stage(checkpoint_dir: str | Path, *, run_id: str, name: str, alias: str | None = "candidate",
                   tracking_uri: str | None = None) -> str:
    """Log `checkpoint_dir` (a coltran checkpoint) as a pyfunc model in run `run_id`, register it as `name`
    and point `alias` at the new version; returns the version."""
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir / "config.yaml")
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "safetensors", "pyyaml", "pillow",
                    f"mlflow=={mlflow.__version__}"]
    with _FLUENT_LOCK, _fluent_tracking_uri(tracking_uri):
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=config.stage, python_model=str(PYFUNC_FILE), artifacts={"checkpoint": str(checkpoint_dir)},
                code_paths=[str(Path(coltran.__file__).parent)], signature=stage_signature(config),
                pip_requirements=requirements, registered_model_name=name)
    version = str(info.registered_model_version)
    if alias:
        MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version)
    return version


def resolve_models(spec: str | Path, *, dest: str | Path | None = None, tracking_uri: str | None = None,
                   names: dict[str, str] | None = None) -> Path:
    """A local directory for `spec`:
    - an existing directory: itself (a models directory DIR/<stage>, or one stage's checkpoint);
    - `models:/<name>@<alias>` or `models:/<name>/<version>`: that stage's checkpoint directory;
    - `models:/@<alias>`: a models directory holding the three registered stages (`names`, default
      coltran-colorizer, coltran-color-upsampler, coltran-spatial-upsampler) at that alias.
    Downloads go to `dest`, else a cache ($COLTRAN_MODEL_CACHE or ~/.cache/coltran/models) keyed by name and
    version, so resolving the same version twice downloads once."""
    text = str(spec)
    if not text.startswith("models:/"):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"models spec {text!r} is neither a directory nor a models:/ URI")
        return path
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    ref = text.removeprefix("models:/")
    if ref.startswith("@"):
        names = names or REGISTERED_NAMES
        versions = {stage: _version(client, f"{names[stage]}{ref}") for stage in STAGE_NAMES}
        label = "-".join(f"{names[s]}.{v}" for s, v in versions.items())
        target = Path(dest) if dest else _cache_root() / "sets" / label
        for stage, version in versions.items():
            _download(client, names[stage], version, target / stage, tracking_uri)
        return target
    name, version = _version_of(client, ref)
    target = Path(dest) if dest else _cache_root() / name / version
    return _download(client, name, version, target, tracking_uri)


def _version_of(client: MlflowClient, ref: str) -> tuple[str, str]:
    if "@" in ref:
        return ref.split("@", 1)[0], _version(client, ref)
    name, _, version = ref.partition("/")
    if not name or not version.isdigit():
        raise ValueError(f"expected models:/<name>@<alias> or models:/<name>/<version>, got models:/{ref}")
    return name, version


def _version(client: MlflowClient, ref: str) -> str:
    name, _, alias = ref.partition("@")
    if not name or not alias:
        raise ValueError(f"expected <name>@<alias>, got {ref!r}")
    return str(client.get_model_version_by_alias(name, alias).version)


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "coltran" / "models")


def _download(client: MlflowClient, name: str, version: str, target: Path, tracking_uri: str | None) -> Path:
    """Fetch version `version` of `name` and place its checkpoint directory at `target` (atomically).

    Several processes of one node (the actors of a batch or evaluation job) resolve the same version at once:
    a lock file beside `target` makes one of them download while the others wait and then reuse its copy, so
    a directory that another process is loading from is never replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _holds_version(target, name, version):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.dl-", dir=target.parent))
        try:
            # Not download_artifacts("models:/..."): MLflow resolves that URI against the process-global
            # registry URI (ignoring registry_uri), which breaks when a Ray worker inherited another server's.
            location = client.get_model_version_download_uri(name, version)
            model_dir = Path(mlflow.artifacts.download_artifacts(location, dst_path=str(tmp),
                                                                 tracking_uri=tracking_uri))
            flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
            ckpt = model_dir / flavor["artifacts"]["checkpoint"]["path"]
            meta = json.loads((ckpt / "meta.json").read_text())
            # "version" in meta.json is the checkpoint format's; the registry's goes under its own keys
            meta.update(registered_name=name, registered_version=version, source=f"models:/{name}/{version}")
            (ckpt / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            if target.exists():  # another version at an explicit `dest`: moved aside, removed with tmp
                os.replace(target, tmp / "stale")
            os.replace(ckpt, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _holds_version(target: Path, name: str, version: str) -> bool:
    try:
        meta = json.loads((target / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("registered_name") == name and str(meta.get("registered_version")) == version


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict | tuple) else str(value)
    return text[:6000]  # the tracking server's limit on a param value
