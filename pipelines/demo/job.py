"""`coltran demo`: the main job end to end on this machine, with nothing downloaded.

1. photos:     procedural scenes generated into DIR/photos (pipelines.demo.photos, CC0, PROVENANCE.json)
2. preprocess: Ray Data -> DIR/data/{train,heldout}/*.parquet
3. train:      the colorizer, colour upsampler and spatial upsampler at the same time (Ray Train, small
               presets), tracked in a local MLflow store DIR/mlflow.db, EMA models registered as @candidate
4. colorize:   held-out photos through the registry (models:/@candidate) with the Ray Data batch job
Everything runs on a local Ray on loopback; at the end it prints where the images are, how to open the
MLflow UI to compare runs, and the one `coltran evaluate` command that reports FID and bits/dim of these models
(not run here: it adds minutes).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

STEPS = {"colorizer": 300, "color_upsampler": 300, "spatial_upsampler": 60}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="coltran-demo", help="where everything goes (default: ./coltran-demo)")
    parser.add_argument("--photos-per-class", type=int, default=24)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's training steps")
    parser.add_argument("--colorize", type=int, default=6, help="held-out photos to colorize at the end")
    parser.add_argument("--fresh", action="store_true", help="delete DIR first")


def train_job(root: Path, tracking_uri: str, steps_scale: float):
    """The embedded default's job: `test` presets, one CPU worker per stage, anywhere on the local Ray."""
    from pipelines.train.config import job_from_dict

    stages = {}
    for stage, steps in STEPS.items():
        steps = max(2, int(steps * steps_scale))
        batch = 1 if stage == "spatial_upsampler" else 8
        stages[stage] = {
            "model": {"preset": "test"},
            "scaling": {"pool": None, "num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
            "train": {"batch_size": batch, "max_steps": steps, "lr": 1e-3, "checkpoint_every_steps": steps,
                      "checkpoint_every_seconds": 0, "eval_every_steps": steps, "eval_batches": 2,
                      "sample_images": 2, "log_every_steps": 10, "keep_checkpoints": 1, "max_failures": 1},
        }
    return job_from_dict({
        "run_name": f"demo-{time.strftime('%Y%m%d-%H%M%S')}", "storage_path": str(root / "runs"),
        "dataset": str(root / "data"), "models_dir": str(root / "models"),
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "coltran-demo", "alias": "candidate"},
        "stages": stages,
    })


def run(args: argparse.Namespace) -> int:
    import mlflow
    import ray

    from pipelines.batch.job import run_batch
    from pipelines.batch.settings import load_settings
    from pipelines.demo.photos import generate_dataset
    from pipelines.preprocess.job import PreprocessSettings, run_preprocess
    from pipelines.train.driver import local_cpus_needed, run_job

    root = Path(args.dir).resolve()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    client = mlflow.MlflowClient(tracking_uri)
    if client.get_experiment_by_name("coltran-demo") is None:  # keep the artifacts inside DIR too
        client.create_experiment("coltran-demo", artifact_location=(root / "mlartifacts").as_uri())
    start = time.perf_counter()

    _say(f"1/4 generating {4 * args.photos_per_class} photos in {root / 'photos'}")
    generate_dataset(root / "photos", per_class=args.photos_per_class)
    job = train_job(root, tracking_uri, args.steps_scale)
    ray.init(_node_ip_address="127.0.0.2", include_dashboard=False, object_store_memory=400_000_000,
             num_cpus=max(os.cpu_count() or 1, local_cpus_needed(job)))
    try:
        _say("2/4 preprocessing with Ray Data")
        manifest = run_preprocess(PreprocessSettings(sources=[str(root / "photos" / "train")],
                                                     dest=str(root / "data"), heldout_fraction=0.1,
                                                     min_rows_per_file=32))
        _say("    rows per split: " + ", ".join(f"{s}={v['images']}" for s, v in manifest["splits"].items()))
        _say("3/4 training the three stages at once (Ray Train), tracked in MLflow")
        outcomes = run_job(job)
        failed = [s for s, o in outcomes.items() if not o.ok]
        if failed:
            _say(f"error: stage(s) {failed} failed: " + "; ".join(str(outcomes[s].error) for s in failed))
            return 1
        _say(f"4/4 colorizing {args.colorize} held-out photos through the registry (models:/@candidate)")
        heldout = _heldout_photos(root, args.colorize)
        summary = run_batch(load_settings(data={
            "sources": [str(p) for p in heldout], "models": "models:/@candidate", "out": str(root / "colorized"),
            "num_samples": 2, "seed": 0, "progress_every_s": 0}))
    finally:
        ray.shutdown()
    _say(f"\ndone in {time.perf_counter() - start:.0f} s: {summary.counts}")
    _say(f"colorized images: {root / 'colorized'}  (manifest: {root / 'colorized' / 'manifest.parquet'})")
    _say(f"trained models:   {root / 'models'}  (registered as coltran-*@candidate)")
    _say(f"compare runs:     mlflow ui --backend-store-uri {tracking_uri} --port 5000  -> http://127.0.0.1:5000")
    if manifest["splits"].get("heldout", {}).get("images", 0) >= 2:  # FID needs two images on each side
        _say(f"evaluate them:    {evaluate_command(root, manifest, tracking_uri)}")
        _say(f"                  FID (with the grayscale and real-image anchor rows), bits/dim and colourfulness "
             f"-> {root / 'evaluation' / 'report.html'}, and a run in MLflow")
    return summary.exit_code


def evaluate_command(root: Path, manifest: dict, tracking_uri: str) -> str:
    """The `coltran evaluate` command for the demo's models: every held-out photo colorized and scored, the
    training split's images (other photos: disjoint by content) as the FID reference, the run in the demo's store."""
    splits = manifest["splits"]
    words = ["coltran", "evaluate", str(root / "data"), "--reference", str(root / "data" / "train"), "--models",
             str(root / "models"), "--out", str(root / "evaluation"), "--num-images", str(splits["heldout"]["images"]),
             "--num-reference", str(splits["train"]["images"]), "--num-samples", "1", "--experiment", "coltran-demo"]
    return f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} " + shlex.join(words)


def _heldout_photos(root: Path, count: int) -> list[Path]:
    """Photos whose keys preprocessing put in the held-out split (the models never trained on them)."""
    import json

    manifest = json.loads((root / "data" / "manifest.json").read_text())
    keys = manifest.get("heldout_keys") or []
    candidates = [Path(k) if Path(k).is_absolute() else root / "photos" / "train" / k for k in keys]
    photos = [p for p in candidates if p.is_file()]
    return (photos or sorted((root / "photos" / "train").rglob("*.jpg")))[:count]


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
