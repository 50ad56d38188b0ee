"""MLflow helpers without a server (a local SQLite store): registering a stage must not change MLflow's process-wide
tracking URI or MLFLOW_TRACKING_URI (Ray workers started later inherit the environment), and registered versions
resolve to checkpoint directories when asked for that store explicitly."""

from __future__ import annotations

import os

import mlflow
import pytest
from mlflow import MlflowClient

from coltran.checkpoint import load_checkpoint
from coltran.init_models import init_models
from pipelines.tracking import register_stage, resolve_models


@pytest.mark.parametrize("preset_env", [None, "sqlite:////nonexistent/elsewhere.db"])
def test_register_stage_leaves_the_global_tracking_uri_alone(tmp_path, monkeypatch, preset_env):
    if preset_env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", preset_env)
    before = mlflow.get_tracking_uri()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("tracking-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    models = init_models(tmp_path / "models", "test", seed=1)
    version = register_stage(models / "color_upsampler", run_id=run_id, name="t-color-upsampler",
                             alias="candidate", tracking_uri=store)
    assert version == "1"
    assert mlflow.get_tracking_uri() == before
    assert os.environ.get("MLFLOW_TRACKING_URI") == preset_env
    resolved = resolve_models("models:/t-color-upsampler@candidate", dest=tmp_path / "resolved", tracking_uri=store)
    ckpt = load_checkpoint(resolved, stage="color_upsampler")
    assert ckpt.meta["registered_name"] == "t-color-upsampler" and ckpt.meta["registered_version"] == "1"
