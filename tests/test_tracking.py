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
from pipelines.tracking.registry import register_stage, resolve_models


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


def test_registering_the_same_source_again_reuses_its_version(tmp_path):
    """A re-submitted stage that had already finished hands the driver the same Ray checkpoint again: no new
    version; a new checkpoint of the same run, or the same source from another run, is a new version."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("reuse-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_a, run_b = (client.create_run(experiment).info.run_id for _ in range(2))
    models = init_models(tmp_path / "models", "test", seed=1)

    def register(run_id: str, source: str | None, alias: str = "candidate") -> str:
        return register_stage(models / "colorizer", run_id=run_id, name="reuse-colorizer", alias=alias,
                              tracking_uri=store, source=source)

    assert register(run_a, "runs/a/checkpoint_000003") == "1"
    assert register(run_a, "runs/a/checkpoint_000003", alias="production") == "1"  # unchanged: reused
    assert str(client.get_model_version_by_alias("reuse-colorizer", "production").version) == "1"
    assert register(run_a, "runs/a/checkpoint_000004") == "2"  # trained on: a new version
    assert register(run_b, "runs/a/checkpoint_000004") == "3"  # another run's registration is not reused
    assert register(run_a, None) == "4"  # no source given: always a new version
    assert str(client.get_model_version_by_alias("reuse-colorizer", "candidate").version) == "4"


def _resolve_and_load(store: str, cache: str, start, rounds: int) -> list[str]:
    """In a child process: resolve the same registered version `rounds` times from a shared cache, each time
    loading the checkpoint at once (what the actors of one job on one node do)."""
    os.environ["COLTRAN_MODEL_CACHE"] = cache
    start.wait()
    steps = []
    for _ in range(rounds):
        path = resolve_models("models:/race-colorizer/1", tracking_uri=store)
        steps.append(str(load_checkpoint(path, stage="colorizer").step))
    return steps


def test_concurrent_resolution_of_one_version_never_exposes_a_partial_directory(tmp_path):
    import concurrent.futures
    import multiprocessing

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("race-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    models = init_models(tmp_path / "models", "test", seed=2)
    register_stage(models / "colorizer", run_id=run_id, name="race-colorizer", alias=None, tracking_uri=store)
    context = multiprocessing.get_context("spawn")
    workers = 4
    with context.Manager() as manager:
        start = manager.Barrier(workers)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_resolve_and_load, store, str(tmp_path / "cache"), start, 3)
                       for _ in range(workers)]
            results = [f.result(timeout=300) for f in futures]
    assert results == [["0", "0", "0"]] * workers
    cached = tmp_path / "cache" / "race-colorizer"
    assert sorted(p.name for p in cached.iterdir() if not p.name.startswith(".")) == ["1"]
    assert not [p for p in cached.iterdir() if ".dl-" in p.name]  # no download folders left behind
