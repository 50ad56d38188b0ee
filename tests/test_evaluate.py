"""The evaluation job end to end, as `coltran evaluate` runs it with its default resource settings, on a real local
Ray started with this machine's own CPU count and the session's MLflow server: test-preset models trained briefly
here, registered (under names of this module's own) as a training submission would, evaluated by alias on real
photos (an image folder with a grayscale photo, a preprocessed Parquet reference set); the figures checked against
direct computations, the report's table, grid and resource plan, the MLflow child run; settings, CLI, disjointness
and the reference cache."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from layouts import SAMPLE, env_vars, require_shared_data

from coltran.checkpoint import load_checkpoint, save_checkpoint
from coltran.configs import STAGE_NAMES, ConfigError, resolve_config
from coltran.imageio import decode_image
from coltran.init_models import init_models
from coltran.metrics import colourfulness
from coltran.models import build_model
from coltran.optim import EMA, make_optimizer
from coltran.transforms import prepare_example
from pipelines.cli import build_parser
from pipelines.cli import main as coltran_main
from pipelines.dataset.examples import image_examples, rows_to_table
from pipelines.dataset.format import FORMAT_NAME
from pipelines.demo.job import evaluate_command
from pipelines.evaluate.job import _reference_stats, run_evaluation, settings_from_args
from pipelines.evaluate.job import main as evaluate_main
from pipelines.evaluate.report import GAP
from pipelines.evaluate.settings import POOLS, load_settings
from pipelines.tracking.registry import register_stage
from pipelines.tracking.runs import PARENT_TAG, open_submission

pytestmark = [pytest.mark.ray, pytest.mark.slow]
# (steps, batch): a few dozen cheap 64x64 steps; the 256x256 spatial upsampler costs ~5-10 s a step on this CPU
TRAINING = {"colorizer": (10, 2), "color_upsampler": (20, 2), "spatial_upsampler": (3, 1)}
CPUS = os.cpu_count() or 1
# The session's MLflow server is shared with other modules: this module registers under names of its own.
TOKEN = secrets.token_hex(4)
NAMES = {stage: f"eval-test-{TOKEN}-{stage.replace('_', '-')}" for stage in STAGE_NAMES}


def _gray_files() -> list[str]:
    return sorted((SAMPLE / "GRAYSCALE_FILES.txt").read_text().split())


def _colour_files(start: int, count: int) -> list[Path]:
    gray = set(_gray_files())
    return [p for p in sorted(SAMPLE.glob("*.JPEG")) if p.name not in gray][start:start + count]


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_stage(stage: str, examples: list[dict]) -> tuple[torch.nn.Module, EMA, list[float]]:
    """A few RMSprop steps (lr 3e-3); EMA decay 0.5 so that so short a run shows in the evaluated weights."""
    torch.manual_seed(STAGE_NAMES.index(stage))
    steps, size = TRAINING[stage]
    model = build_model(resolve_config("test", stage)).train()
    optimizer, ema, losses = make_optimizer(model.parameters(), lr=3e-3), EMA(model, decay=0.5), []
    for step in range(steps):
        rows = [examples[(size * step + k) % len(examples)] for k in range(size)]
        batch = {name: torch.from_numpy(np.stack([r[name] for r in rows])) for name in
                 ("gray_64", "rgb_64", "gray_256", "rgb_256")}
        loss, metrics = model.loss(batch, random_channel=stage != "colorizer")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        losses.append(float(metrics["loss"]))
    return model, ema, losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A models directory trained briefly on 4 sample photos that are not among the evaluated ones."""
    require_shared_data(SAMPLE)
    root = tmp_path_factory.mktemp("trained")
    examples = [prepare_example(decode_image(p.read_bytes()).rgb) for p in _colour_files(100, 4)]
    losses = {}
    for stage in STAGE_NAMES:
        model, ema, losses[stage] = _train_stage(stage, examples)
        save_checkpoint(root / stage, model, ema_state=ema.state_dict(), step=TRAINING[stage][0],
                        meta={"source": "tests/test_evaluate.py brief training"})
    return root, losses


@pytest.fixture(scope="module")
def services(mlflow_server, trained, ray_local):
    """The session's MLflow server with the trained stages registered (as NAMES) under a training-style parent run
    with alias `candidate`, and the session's local Ray (this machine's CPUs), whose model cache this process
    shares."""
    runs = open_submission(f"train-for-eval-{TOKEN}", list(STAGE_NAMES), experiment=f"eval-test-{TOKEN}",
                           tracking_uri=mlflow_server.uri)
    for stage in STAGE_NAMES:
        register_stage(trained[0] / stage, run_id=runs.children[stage], name=NAMES[stage], alias="candidate",
                       tracking_uri=mlflow_server.uri)
    with env_vars({"COLTRAN_MODEL_CACHE": str(ray_local.model_cache)}):
        yield mlflow_server, runs


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Evaluated: a folder of 4 colour photos + 1 grayscale photo. Reference: 6 other colour photos as a
    preprocessed dataset (Parquet held-out split + manifest), as `coltran preprocess` writes it. Also copies of
    two evaluated photos under other names (a reference set that is disjoint by key but not by content)."""
    require_shared_data(SAMPLE)
    root = tmp_path_factory.mktemp("eval-data")
    (root / "photos").mkdir()
    (root / "renamed").mkdir()
    for path in _colour_files(0, 4) + [SAMPLE / _gray_files()[0]]:
        shutil.copy(path, root / "photos" / path.name)
    for path in _colour_files(0, 2):
        shutil.copy(path, root / "renamed" / f"copy-{path.name}")
    rows = [{"key": p.name, "label": 0, "split": "heldout", "source": "ref", **ex} for p in _colour_files(20, 6)
            for ex in image_examples(p.name, p.read_bytes(), split="heldout", train_crops=1, seed=0,
                                     max_pixels=64_000_000, min_side=8)]
    (root / "reference" / "heldout").mkdir(parents=True)
    pq.write_table(rows_to_table(rows), root / "reference" / "heldout" / "part-0.parquet")
    (root / "reference" / "manifest.json").write_text(json.dumps({"format": FORMAT_NAME, "splits": {"heldout": {}}}))
    return root / "photos", root / "reference", root / "renamed"


def _registry_args(uri: str) -> list[str]:
    return [f"--set=tracking.tracking_uri={uri}", *(f"--set=tracking.registered_models.{s}={n}"
                                                     for s, n in NAMES.items())]


@pytest.fixture(scope="module")
def evaluation(services, sources, tmp_path_factory, one_thread):
    """`coltran evaluate` as a user types it: every resource setting left at its default (the plan sizes the
    pools from the cluster); only the counts, the grid width, the cache and the registry are given."""
    server, runs = services
    out = tmp_path_factory.mktemp("report")
    args = build_parser("evaluate").parse_args([
        "evaluate", str(sources[0]), "--reference", str(sources[1]), "--models", "models:/@candidate", "--out",
        str(out), "--num-images", "5", "--num-reference", "6", "--num-samples", "1", "--parent-run-id",
        runs.parent_id, "--set=grid_images=3", f"--set=cache_dir={out.parent / 'fid-cache'}",
        *_registry_args(server.uri)])
    settings = settings_from_args(args)
    assert all(getattr(settings, name).num_cpus is None and getattr(settings, name).pool_max is None
               for name in POOLS), "the defaults leave the pools to the resource plan"
    return run_evaluation(settings), out


def test_brief_training_lowered_every_loss(trained):
    losses = trained[1]
    print("training losses (bits/dim):", {s: (round(v[0], 3), round(v[-1], 3)) for s, v in losses.items()})
    for stage in ("colorizer", "color_upsampler"):
        assert np.mean(losses[stage][-3:]) < losses[stage][0] - 1.0, (stage, losses[stage])
    assert losses["spatial_upsampler"][-1] < losses["spatial_upsampler"][0]


def test_figures_of_the_trained_model(evaluation, sources, trained):
    result, _ = evaluation
    m = result.metrics
    print("evaluation figures:", json.dumps({k: round(v, 3) for k, v in m.items()}), result.counts,
          f"{result.seconds:.0f} s, per image {result.seconds_per_image}")
    assert result.counts == {"evaluated": 5, "colour": 4, "reference": 6, "reference_colour": 6, "num_samples": 1}
    assert result.grayscale_keys == [_gray_files()[0]] and result.missing == [] and not result.untrained
    assert m["fid/grayscale"] > m["fid/ground_truth"]  # the anchor rows in their paper order
    assert m["fid/colorized"] > m["fid/ground_truth"]
    photos = [prepare_example(decode_image(p.read_bytes()).rgb) for p in sorted(sources[0].glob("*.JPEG"))]
    colour = [ex for ex in photos if not (ex["rgb_256"][..., 0] == ex["rgb_256"][..., 2]).all()]
    assert m["colourfulness/ground_truth"] == pytest.approx(colourfulness(np.stack([e["rgb_256"] for e in colour]))
                                                            .mean())
    colorizer = load_checkpoint(trained[0] / "colorizer").model  # EMA weights, as evaluated
    with torch.no_grad():
        direct = [float(colorizer.loss({k: torch.from_numpy(ex[k][None]) for k in ("gray_64", "rgb_64")})[1]["loss"])
                  for ex in photos]
    assert m["bits_per_dim/colorizer"] == pytest.approx(np.mean(direct), rel=1e-5)
    assert m["bits_per_dim/colorizer"] < 8.0  # uniform over 512 colours is 9 bits
    assert m["bits_per_dim/color_upsampler"] < 7.5  # uniform over 256 values is 8 bits
    assert 7.0 < m["bits_per_dim/spatial_upsampler"] < 8.5  # 3 steps: still close to uniform


def test_report_shows_the_table_the_grid_and_the_plan(evaluation, sources):
    result, out = evaluation
    kind = "shared" if CPUS < 6 else "dedicated"  # five pools of a whole CPU each and a 1-CPU task need 6
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        for needle in ("ColTran samples (this model)", "Grayscale inputs (anchor)", "Real held-out images (anchor)",
                       "19.37", "30.19", "14.68", f"{result.metrics['fid/colorized']:.2f}", "bits/dim",
                       "Colourfulness", _gray_files()[0], f"resource plan for evaluate: {kind}",
                       f"{CPUS} CPUs"):
            assert needle in text, needle
    assert "![gray / samples / ground truth](grid.png)" in md and "<img src='grid.png'" in page
    grid = decode_image((out / "grid.png").read_bytes()).rgb
    assert grid.shape == (3 * 256, 3 * 256 + 2 * GAP, 3)  # rows: gray, sample, truth; 3 columns
    first = prepare_example(decode_image((sources[0] / result.grid_keys[0]).read_bytes()).rgb)
    assert np.array_equal(grid[:256, :256, 0], first["gray_256"]) and np.array_equal(grid[-256:, :256],
                                                                                     first["rgb_256"])
    assert result.grid_keys == sorted(p.name for p in sources[0].glob("*.JPEG"))[:3]


def test_logged_as_a_child_of_the_training_run(evaluation, services, trained):
    result, _ = evaluation
    server, runs = services
    client = server.client()
    run = client.get_run(result.run_id)
    assert run.data.tags[PARENT_TAG] == runs.parent_id and run.info.status == "FINISHED"
    assert run.info.experiment_id == runs.experiment_id
    for key in ("fid/colorized", "fid/grayscale", "fid/ground_truth", "bits_per_dim/spatial_upsampler",
                "colourfulness/colorized"):
        assert run.data.metrics[key] == pytest.approx(result.metrics[key])
        assert client.get_metric_history(run.info.run_id, key)[0].step == TRAINING["colorizer"][0]  # its step
    assert run.data.tags["coltran.model.colorizer"] == f"models:/{NAMES['colorizer']}/1"
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/grid.png", "report/metrics.json"} <= artifacts
    assert any(a.path.startswith("images") for a in client.list_artifacts(result.run_id))  # log_image


def test_reference_statistics_come_from_the_cache_the_second_time(evaluation):
    result, out = evaluation
    assert not result.reference_cached
    assert json.loads((out / "metrics.json").read_text())["reference_stats_key"] == result.reference_stats_key
    found = {p.name: (hashlib.sha1(prepare_example(decode_image(p.read_bytes()).rgb)["rgb_256"].tobytes())
                      .hexdigest(), False) for p in _colour_files(20, 6)}
    # no rows to run Inception on: only a cache hit (same keys, same pixels) can answer
    stats, cached, colour, key = _reference_stats(result.settings, None, found, "cpu", None)
    assert cached and colour == 6 and stats.count == 6 and key == result.reference_stats_key


def test_reference_with_the_same_pixels_is_refused(services, sources, trained, tmp_path):
    settings = load_settings(data={"data": [str(sources[0])], "reference": [str(sources[2])],
                                   "models": str(trained[0]), "out": str(tmp_path), "num_images": 2,
                                   "num_reference": 2, "device": "cpu", "tracking": {"enabled": False}})
    with pytest.raises(ValueError, match="2 evaluated images also appear .* must be disjoint"):
        run_evaluation(settings)


def test_settings_cli_and_job_file(tmp_path):
    job = load_settings(Path(__file__).resolve().parents[1] / "jobs" / "evaluate.yaml")
    assert job.num_images == 5000 and job.models == "models:/@candidate" and job.inception.micro_batch == 32
    with pytest.raises(ConfigError, match="valid keys"):
        load_settings(data={"data": ["x"], "models": "m", "out": "o", "num_imagez": 3})
    with pytest.raises(ConfigError, match="num_reference"):
        load_settings(data={"data": ["x"], "models": "m", "out": "o", "num_reference": 1})
    args = build_parser("evaluate").parse_args(
        ["evaluate", "photos", "--models", "DIR", "--out", str(tmp_path), "--num-images", "7", "--parent-run-id",
         "abc", "--set", "inception.micro_batch=4", "--no-mlflow"])
    settings = settings_from_args(args)
    assert (settings.data, settings.models, settings.num_images, settings.inception.micro_batch) == (
        ["photos"], "DIR", 7, 4)
    assert settings.tracking.parent_run_id == "abc" and not settings.tracking.enabled
    with pytest.raises(ConfigError, match="num_images"):  # the `ray job submit` entry point, strict the same way
        evaluate_main([str(Path(__file__).resolve().parents[1] / "jobs" / "evaluate.yaml"), "--set", "num_images=1"])
    # a cluster job file's explicit pools are kept as written; without them the plan sizes every pool
    assert (job.colorizer.num_cpus, job.colorizer.pool_min, job.colorizer.pool_max) == (1, 1, 8)
    assert all((getattr(settings, n).num_cpus, getattr(settings, n).num_gpus, getattr(settings, n).pool_min,
                getattr(settings, n).pool_max) == (None,) * 4 for n in POOLS)
    with pytest.raises(ConfigError, match="colorizer.pool_max"):
        load_settings(data={"data": ["x"], "models": "m", "out": "o", "colorizer": {"pool_min": 3, "pool_max": 2}})
    named = settings_from_args(build_parser("evaluate").parse_args(
        ["evaluate", "photos", "--models", "models:/@candidate", "--out", str(tmp_path),
         "--set", "tracking.registered_models.colorizer=my-colorizer"]))
    assert (named.tracking.registered_models.colorizer, named.tracking.registered_models.spatial_upsampler) == (
        "my-colorizer", "coltran-spatial-upsampler")


def test_the_command_the_demo_prints_writes_the_report(services, tmp_path):
    """The `coltran evaluate ...` line of the demo's summary, run as printed on a demo-shaped folder (generated
    photos preprocessed to DIR/data, models in DIR/models, the MLflow store DIR/mlflow.db), with its defaults."""
    import mlflow

    from pipelines.demo.photos import generate_dataset
    from pipelines.preprocess.job import PreprocessSettings, run_preprocess

    root = tmp_path / "coltran-demo"
    generate_dataset(root / "photos", per_class=5)
    manifest = run_preprocess(PreprocessSettings(sources=[str(root / "photos" / "train")], dest=str(root / "data"),
                                                 heldout_fraction=0.3, min_rows_per_file=32))  # 4 held out
    init_models(root / "models", "test")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("coltran-demo", artifact_location=(root / "mlartifacts").as_uri())
    words = shlex.split(evaluate_command(root, manifest, uri))
    assert words[0] == f"MLFLOW_TRACKING_URI={uri}" and words[1:3] == ["coltran", "evaluate"]
    with env_vars({"MLFLOW_TRACKING_URI": uri}):
        assert coltran_main(words[2:]) == 0
    metrics = json.loads((root / "evaluation" / "metrics.json").read_text())
    splits = manifest["splits"]
    assert metrics["counts"]["evaluated"] == splits["heldout"]["images"] >= 2
    assert metrics["counts"]["reference"] == splits["train"]["images"]
    assert {"fid/colorized", "fid/grayscale", "fid/ground_truth", "bits_per_dim/colorizer"} <= set(metrics["metrics"])
    page = (root / "evaluation" / "report.html").read_text()
    assert "Grayscale inputs (anchor)" in page and "Real held-out images (anchor)" in page and "UNTRAINED" in page
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("coltran-demo").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["fid/colorized"] == pytest.approx(metrics["metrics"]["fid/colorized"])
