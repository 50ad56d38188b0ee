"""The MLflow model registry: registering a stage as a pyfunc model whose artifact is its coltran checkpoint
directory (pyfunc.py), and `resolve_models`, which turns a models directory or a `models:/` URI into local files,
downloading each version once per machine under a lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

import coltran
from coltran.configs import STAGE_NAMES, ModelConfig, load_config
from pipelines.tracking.names import REGISTERED_NAMES
from pipelines.tracking.runs import TRACKING_ENV

PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
CACHE_ENV = "COLTRAN_MODEL_CACHE"
_FLUENT_LOCK = threading.Lock()  # mlflow.pyfunc.log_model uses the process-global fluent run state


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


SOURCE_TAG = "coltran.source"  # model version tag: what was registered (e.g. the Ray Train checkpoint path)


def register_stage(checkpoint_dir: str | Path, *, run_id: str, name: str, alias: str | None = "candidate",
                   tracking_uri: str | None = None, source: str | None = None) -> str:
    """Log `checkpoint_dir` (a coltran checkpoint) as a pyfunc model in run `run_id`, register it as `name`
    and point `alias` at the version; returns the version. With `source` (what the checkpoint was made from), a
    version of this run already registered from the same source is reused: re-submitting a finished stage
    registers nothing new."""
    checkpoint_dir = Path(checkpoint_dir)
    client = MlflowClient(tracking_uri)
    version = _registered_from(client, name, run_id, source) if source else None
    if version is None:
        version = _log_and_register(checkpoint_dir, run_id, name, tracking_uri)
        if source:
            client.set_model_version_tag(name, version, SOURCE_TAG, source)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def _registered_from(client: MlflowClient, name: str, run_id: str, source: str) -> str | None:
    found = [v.version for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
             if v.tags.get(SOURCE_TAG) == source]
    return str(max(found, key=int)) if found else None


def _log_and_register(checkpoint_dir: Path, run_id: str, name: str, tracking_uri: str | None) -> str:
    config = load_config(checkpoint_dir / "config.yaml")
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "safetensors", "pyyaml", "pillow",
                    f"mlflow=={mlflow.__version__}"]
    with _FLUENT_LOCK, _fluent_tracking_uri(tracking_uri):
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=config.stage, python_model=str(PYFUNC_FILE), artifacts={"checkpoint": str(checkpoint_dir)},
                code_paths=[str(Path(coltran.__file__).parent)], signature=stage_signature(config),
                pip_requirements=requirements, registered_model_name=name)
    return str(info.registered_model_version)


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
