"""`coltran demo`, the README's main job on the embedded default, end to end in a subprocess (its own local Ray
on loopback, a local MLflow store), at a fraction of its training steps: it must leave colorized images, a
manifest with every photo done, and three registered models at @candidate in three concurrent child runs."""

from __future__ import annotations

import json
import subprocess
import time

import mlflow
import pyarrow.parquet as pq
import pytest
from PIL import Image
from services import VENV_BIN, marked_pids, reap, service_env

from pipelines.tracking.names import REGISTERED_NAMES

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, service_mark):
    root = tmp_path_factory.mktemp("demo")
    home = root / "home"
    home.mkdir()
    cmd = [str(VENV_BIN / "coltran"), "demo", "--dir", str(root / "run"), "--photos-per-class", "6",
           "--steps-scale", "0.03", "--colorize", "2"]
    start = time.monotonic()
    # a user's shell with a fresh HOME: the local ray.init() creates its own auth token there
    mark = f"{service_mark}/demo"  # the demo's own Ray processes carry it: reaped whatever happens
    env = service_env(mark, {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"},
                      drop=("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                            "MLFLOW_TRACKING_URI"))
    try:
        done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1100)
    finally:
        deadline = time.monotonic() + 20  # ray.shutdown() at the demo's end stops its processes
        while (left := marked_pids(mark)) and time.monotonic() < deadline:
            time.sleep(0.5)
        reap(mark)
    print(f"coltran demo (steps x0.03): {time.monotonic() - start:.1f} s")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert not left, f"coltran demo left processes {left} running"
    return root / "run", done.stdout


def test_demo_prints_where_everything_is(demo):
    root, out = demo
    for step in ("1/4 generating", "2/4 preprocessing", "3/4 training", "4/4 colorizing"):
        assert step in out
    assert f"colorized images: {root / 'colorized'}" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}" in out


def test_demo_colorized_held_out_photos(demo):
    root, _ = demo
    heldout = json.loads((root / "data" / "manifest.json").read_text())["heldout_keys"]
    rows = pq.read_table(root / "colorized" / "manifest.parquet").to_pylist()
    assert len(rows) == min(2, len(heldout)) >= 1 and all(r["status"] == "done" for r in rows), rows
    for row in rows:
        assert len(row["outputs"]) == 2  # two colourings per photo
        for output in row["outputs"]:
            with Image.open(root / "colorized" / output) as image:
                assert image.mode == "RGB" and image.size == (row["width"], row["height"])
    assert {r["source"] for r in rows} <= {str(root / "photos" / "train" / k) for k in heldout}


def test_demo_registered_three_models_from_concurrent_runs(demo):
    root, _ = demo
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("coltran-demo")
    parents = client.search_runs([exp.experiment_id], "tags.`coltran.kind` = 'submission'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(r.data.tags["coltran.stage"] for r in children) == sorted(REGISTERED_NAMES)
    windows = [(float(r.data.tags["coltran.attempt_started_at"]), float(r.data.tags["coltran.train_finished_at"]))
               for r in children]
    assert max(s for s, _ in windows) < min(e for _, e in windows), f"stages did not train at once: {windows}"
    for stage, name in REGISTERED_NAMES.items():
        version = client.get_model_version_by_alias(name, "candidate")
        assert version.run_id in {r.info.run_id for r in children}, stage
