"""`coltran demo`, the README's main job on the embedded default, end to end in a subprocess (its own local Ray
on loopback, a local MLflow store), at 0.4x its training steps: it must leave colorized images named by the one
output rule, a manifest with every photo done, a contact sheet logged to MLflow, three registered models at
@candidate in three concurrent child runs, a short console with Ray's logs in the log file, every stage's held-out
bits/dim with the registered weights below 9.0 - 0.5 (9.0: the colorizer's uniform guess over 512 colours; the
upsamplers' is 8.0), and colour: the held-out photos' chroma error against their originals below 0.8x a gray
image's, the same threshold as the full demo's. 0.4x is about the least that shows colour reliably: the spatial
upsampler starts copying colours somewhere between step 60 and 120 (at 75 steps one run measured 0.45x, another
0.83x, still at 7.6 bits/dim), so the demo gives it 250 steps, 100 here (two runs alone at 0.4x, 2026-12-08: 0.36x
and 0.42x, its held-out bits/dim 5.35 and 5.13; at 0.5x the session's run measured 0.39x)."""

from __future__ import annotations

import json

import mlflow
import pyarrow.parquet as pq
import pytest
from demo_run import STEPS_SCALE
from PIL import Image

from pipelines.demo.check import chroma_check, heldout_bits_per_dim
from pipelines.tracking.names import REGISTERED_NAMES

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(2500)]
CHROMA_LIMIT = 0.8  # colourings' chroma error / a gray image's, on the held-out photos
BPD_LIMIT = 9.0 - 0.5  # every stage's registered (EMA) weights on the held-out split


@pytest.fixture(scope="module")
def demo(demo_run):
    """The session's demo run (tests/demo_run.py: started with the session, in the background), waited for."""
    done = demo_run.wait()
    print(f"coltran demo (steps x{STEPS_SCALE}, niced, beside the session): {done.seconds:.1f} s, "
          f"{len(done.stdout.splitlines())} lines printed")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert not done.left, f"coltran demo left processes {done.left} running"
    return done.root, done.stdout


def test_demo_prints_where_everything_is(demo):
    root, out = demo
    for step in ("1/4 generating", "2/4 preprocessing", "3/4 training", "4/4 colorizing"):
        assert step in out
    assert f"colorized images: {root / 'colorized'}" in out
    assert f"contact sheet:    {root / 'colorized' / 'contact_sheet.png'}" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}" in out
    assert f"logs:             {root / 'demo.log'}" in out
    assert len(out.splitlines()) <= 60, out  # Ray's and MLflow's own logs went to the log file
    assert not any(mark in out for mark in ("raylet", "INFO", "WARNING", "pid=")), out
    assert "Started a local Ray instance" in (root / "demo.log").read_text()


def test_demo_colorized_held_out_photos(demo):
    root, _ = demo
    heldout = json.loads((root / "data" / "manifest.json").read_text())["heldout_keys"]
    rows = pq.read_table(root / "colorized" / "manifest.parquet").to_pylist()
    assert len(rows) == min(6, len(heldout)) >= 3 and all(r["status"] == "done" for r in rows), rows
    for row in rows:
        assert row["key"] in heldout  # DIR/heldout/<class>/<name> mirrors the photo's key
        stem = row["key"].rsplit(".", 1)[0]
        assert row["outputs"] == [f"{stem}_s0.png", f"{stem}_s1.png"]  # two colourings, named by the one rule
        for output in row["outputs"]:
            with Image.open(root / "colorized" / output) as image:
                assert image.mode == "RGB" and image.size == (row["width"], row["height"])
    with Image.open(root / "colorized" / "contact_sheet.png") as sheet:  # gray, 2 samples, original per photo
        assert sheet.size == (4 + 4 * 164, 18 + len(rows) * 138)  # 160 x 120 cells


def test_demo_colours_and_bits_per_dim(demo):
    """The figures the summary prints, recomputed: chroma error of the colourings vs gray, bits/dim per stage."""
    root, out = demo
    rows = [r for r in pq.read_table(root / "colorized" / "manifest.parquet").to_pylist() if r["status"] == "done"]
    check = chroma_check(rows, root / "colorized")
    print(f"chroma error {check.colour_error:.1f} vs gray {check.gray_error:.1f} ({check.ratio:.2f}x)")
    assert f"{check.colour_error:.1f} vs {check.gray_error:.1f} for a gray image ({check.ratio:.2f}x)" in out
    assert check.images == 2 * len(rows) and check.gray_error > 5  # the photos have colour to recover
    assert check.ratio < CHROMA_LIMIT, f"the colourings are no better than gray: {check}"
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run_name = client.search_runs([client.get_experiment_by_name("coltran-demo").experiment_id],
                                  "tags.`coltran.kind` = 'submission'")[0].data.tags["coltran.run_name"]
    bpd = heldout_bits_per_dim(client, "coltran-demo", run_name)
    print(f"held-out bits/dim: {bpd}")
    assert sorted(bpd) == sorted(REGISTERED_NAMES) and max(bpd.values()) < BPD_LIMIT, bpd


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
    assert [a.path for a in client.list_artifacts(parents[0].info.run_id, "contact_sheet")] == [
        "contact_sheet/contact_sheet.png"]
