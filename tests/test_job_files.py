"""The shipped job files tell one story on a cluster: jobs/preprocess.yaml writes the dataset that
jobs/train_all.yaml trains on and jobs/evaluate.yaml evaluates; training registers the names that `models:/@alias`
resolves to, evaluation reads the alias training sets (`candidate`), and batch colorization and Serve read the
alias a user promotes an evaluated version to (`production`, README "Watch and compare runs")."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.batch.settings import load_settings as batch_settings
from pipelines.evaluate.settings import load_settings as evaluate_settings
from pipelines.preprocess.job import load_settings as preprocess_settings
from pipelines.tracking.names import REGISTERED_NAMES
from pipelines.train.config import load_job

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def _alias(models: str) -> str:
    assert models.startswith("models:/@"), f"expected models:/@<alias>, got {models}"
    return models.removeprefix("models:/@")


def test_preprocess_writes_what_training_and_evaluation_read():
    dest = preprocess_settings(str(JOBS / "preprocess.yaml"), []).dest
    train = load_job(JOBS / "train_all.yaml")
    evaluation = evaluate_settings(JOBS / "evaluate.yaml")
    assert train.dataset.rstrip("/") == dest.rstrip("/")
    assert [d.rstrip("/") for d in evaluation.data] == [dest.rstrip("/")] and evaluation.split == train.eval_split


def test_registered_names_and_aliases_connect_training_to_its_users():
    train = load_job(JOBS / "train_all.yaml")
    registered = {stage: getattr(train.mlflow.registered_models, stage) for stage in REGISTERED_NAMES}
    assert registered == REGISTERED_NAMES  # what models:/@<alias> resolves in batch, evaluation and Serve
    evaluation = evaluate_settings(JOBS / "evaluate.yaml")
    assert _alias(evaluation.models) == train.mlflow.alias == "candidate"
    assert _alias(batch_settings(path=JOBS / "colorize.yaml").models) == "production"
    serve = yaml.safe_load((JOBS / "serve.yaml").read_text())
    (app,) = serve["applications"]
    assert _alias(app["args"]["models"]) == "production"
    assert 'set_registered_model_alias(name, "production", version)' in (ROOT / "README.md").read_text()


def test_cluster_jobs_keep_their_data_and_runs_on_shared_storage():
    """Every node of a cluster must see these paths: object storage, never a node-local folder."""
    train = load_job(JOBS / "train_all.yaml")
    for path in (train.dataset, train.storage_path, preprocess_settings(str(JOBS / "preprocess.yaml"), []).dest,
                 batch_settings(path=JOBS / "colorize.yaml").out):
        assert path.startswith("s3://"), path
    assert train.mlflow.tracking_uri.startswith("http"), "a cluster's workers need a tracking server"


def test_serve_runs_the_model_stages_on_the_gpu_pools():
    """jobs/serve.yaml is for the GPU cluster of cluster/: each model stage asks for (a share of) a GPU on its own
    pool; the Ingress does CPU work on the CPU pool."""
    (app,) = yaml.safe_load((JOBS / "serve.yaml").read_text())["applications"]
    options = {d["name"]: d["ray_actor_options"] for d in app["deployments"]}
    for name, pool in (("Colorizer", "colorizer"), ("ColorUpsampler", "color_upsampler"),
                       ("SpatialUpsampler", "spatial_upsampler")):
        assert 0 < options[name]["num_gpus"] <= 1 and options[name]["label_selector"] == {"pool": pool}, name
    assert "num_gpus" not in options["Ingress"] and options["Ingress"]["label_selector"] == {"pool": "cpu"}
    assert app["args"].get("device") in (None, "cuda")  # null: CUDA wherever a replica was given a GPU
