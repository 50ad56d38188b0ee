"""`coltran demo`: the main job end to end on this machine, with nothing downloaded.

1. photos:     procedural scenes generated into DIR/photos (pipelines.demo.photos, CC0, PROVENANCE.json)
2. preprocess: Ray Data -> DIR/data/{train,heldout}/*.parquet
3. train:      the colorizer, colour upsampler and spatial upsampler at the same time (Ray Train, `test`
               presets), tracked in a local MLflow store DIR/mlflow.db, EMA models registered as @candidate
4. colorize:   the held-out photos (copied to DIR/heldout/<class>/) through the registry (models:/@candidate) with
               the Ray Data batch job -> DIR/colorized/<class>/<name>_s<k>.png and DIR/colorized/contact_sheet.png
The console shows one line per step and progress lines; Ray's and MLflow's own logs go to DIR/demo.log
(`--verbose` shows them instead). The summary says where everything is, how far the colourings' chroma is from the
originals next to a gray image's, each stage's held-out bits/dim, and the one `coltran evaluate` command that
reports FID for these models (not run here: it adds minutes).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import time
import traceback
from pathlib import Path

# The 2-core budget (about 10 minutes in all). The spatial upsampler maps each of 256 coarse intensities to one of
# 256 outputs through the test preset's 32-wide embedding: at the official 1e-3 it is still near 8 bits/dim after 60
# steps (7.8 at step 50 in a plain loop on these photos) and returns noise, which the chroma transfer turns gray; at
# 1e-2 it copies the coarse colours somewhere between step 60 and 120 (chroma error 9.4 vs 37.4 for gray on an
# unseen photo, given its true 64x64 colours, in one run at step 75; another demo run was still at 7.1 bits/dim
# there). It is the slowest per step (256x256, batch 1) but finishes 150 steps well before the colorizer's 300, so
# it gets 250: a margin past its slowest runs for a few more seconds of wall time. The colour upsampler's 8 coarse
# values learn at 1e-3.
# The colorizer at 1e-3 was still at 4.8 held-out bits/dim after 150 steps, and its samples put off colours in
# every other 64x64 cell (chroma error 1.00x a gray image's at half this budget); at 3e-3 it reached 2.3 bits/dim
# and 0.45x in the same 150 steps (2026-12-07, 10 photos per class, 3 held-out photos).
STEPS = {"colorizer": 300, "color_upsampler": 300, "spatial_upsampler": 250}
LEARNING_RATES = {"colorizer": 3e-3, "color_upsampler": 1e-3, "spatial_upsampler": 1e-2}
# Colorizer sampling temperature of the demo's pictures: T=1 draws from the model's distribution (the paper's
# choice for FID, which scores diversity); a small model trained for minutes puts visible mass on off colours, so
# single pictures look better at a lower temperature. Override with --temperature 1.0.
TEMPERATURE = 0.6
EXPERIMENT = "coltran-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="coltran-demo", help="where everything goes (default: ./coltran-demo)")
    parser.add_argument("--photos-per-class", type=int, default=24)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's training steps")
    parser.add_argument("--colorize", type=int, default=6, help="held-out photos to colorize at the end")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE,
                        help=f"colorizer sampling temperature of the pictures (default {TEMPERATURE})")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's logs instead of DIR/demo.log")
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
            "train": {"batch_size": batch, "max_steps": steps, "lr": LEARNING_RATES[stage],
                      "checkpoint_every_steps": steps, "checkpoint_every_seconds": 0, "eval_every_steps": steps,
                      "eval_batches": 2, "sample_images": 2, "log_every_steps": 10, "keep_checkpoints": 1,
                      "max_failures": 1},
        }
    return job_from_dict({
        "run_name": f"demo-{time.strftime('%Y%m%d-%H%M%S')}", "storage_path": str(root / "runs"),
        "dataset": str(root / "data"), "models_dir": str(root / "models"),
        "mlflow": {"tracking_uri": tracking_uri, "experiment": EXPERIMENT, "alias": "candidate"},
        "stages": stages,
    })


def run(args: argparse.Namespace) -> int:
    from pipelines.demo.console import Console

    root = Path(args.dir).resolve()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "demo.log"
    with Console(log, args.verbose) as console:
        if not args.verbose:
            console.say(f"coltran demo in {root} (Ray's and MLflow's logs: {log}; --verbose shows them here)")
        try:
            return _run(args, root, log, console)
        except Exception as err:
            traceback.print_exc()  # into the log
            console.say(f"error: {type(err).__name__}: {err} (traceback in {log})")
            return 1


def _run(args: argparse.Namespace, root: Path, log: Path, console) -> int:
    import mlflow
    import ray

    from pipelines.demo.photos import generate_dataset
    from pipelines.train.driver import local_cpus_needed

    say = console.say
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    client = mlflow.MlflowClient(tracking_uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:  # keep the artifacts inside DIR too
        client.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())
    start = time.perf_counter()

    say(f"1/4 generating {4 * args.photos_per_class} photos in {root / 'photos'}")
    generate_dataset(root / "photos", per_class=args.photos_per_class)
    job = train_job(root, tracking_uri, args.steps_scale)
    ray.init(_node_ip_address="127.0.0.2", include_dashboard=False, object_store_memory=400_000_000,
             num_cpus=max(os.cpu_count() or 1, local_cpus_needed(job)))
    try:
        manifest = _preprocess(root, say)
        if not _train(job, tracking_uri, say):
            return 1
        summary, sources = _colorize(args, root, console)
    finally:
        ray.shutdown()
    _summarise(args, root, log, job, manifest, summary, sources, client, time.perf_counter() - start, say)
    return summary.exit_code


def _preprocess(root: Path, say) -> dict:
    from pipelines.preprocess.job import PreprocessSettings, run_preprocess

    tic = time.perf_counter()
    photos = sum(1 for _ in (root / "photos" / "train").rglob("*.jpg"))
    say(f"2/4 preprocessing {photos} photos to Parquet with Ray Data")
    manifest = run_preprocess(PreprocessSettings(sources=[str(root / "photos" / "train")], dest=str(root / "data"),
                                                 heldout_fraction=0.1, min_rows_per_file=32))
    splits = ", ".join(f"{s} {v['images']}" for s, v in manifest["splits"].items())
    failed = (manifest.get("failures") or {}).get("count", 0)
    say(f"    {splits} images, {failed} unusable, in {time.perf_counter() - tic:.0f} s")
    return manifest


def _train(job, tracking_uri: str, say) -> bool:
    from pipelines.demo.progress import TrainingProgress
    from pipelines.train.driver import run_job

    steps = {s: job.stage(s).train.max_steps for s in job.enabled_stages()}
    say("3/4 training the three stages at once (Ray Train), tracked in MLflow: "
        + ", ".join(f"{s} {n} steps" for s, n in steps.items()))
    tic = time.perf_counter()
    with TrainingProgress(tracking_uri, EXPERIMENT, job.run_name, steps, say):
        outcomes = run_job(job)
    failed = [s for s, o in outcomes.items() if not o.ok]
    if failed:
        say(f"error: stage(s) {failed} failed: " + "; ".join(str(outcomes[s].error) for s in failed))
        return False
    say(f"    trained and registered in {time.perf_counter() - tic:.0f} s: "
        + ", ".join(f"{s} v{o.version}" for s, o in outcomes.items()))
    return True


def _colorize(args: argparse.Namespace, root: Path, console):
    from pipelines.batch.job import run_batch
    from pipelines.batch.settings import load_settings

    heldout = stage_heldout(root, args.colorize)
    say = console.say
    say(f"4/4 colorizing {len(heldout)} held-out photos (2 colourings each, temperature {args.temperature}) "
        "through the registry (models:/@candidate)")
    sources = [str(root / "heldout")]
    with console.passing("colorize:"):
        summary = run_batch(load_settings(data={
            "sources": sources, "models": "models:/@candidate", "out": str(root / "colorized"), "num_samples": 2,
            "seed": 0, "temperature": args.temperature, "progress_every_s": 20}))
    return summary, sources


def stage_heldout(root: Path, count: int) -> list[Path]:
    """Copy up to `count` held-out photos (keys preprocessing put in the held-out split: the models never trained
    on them), one class after another, to DIR/heldout/<class>/, so their outputs mirror the classes."""
    import json

    keys = json.loads((root / "data" / "manifest.json").read_text()).get("heldout_keys") or []
    photos = [root / "photos" / "train" / k for k in sorted(keys) if (root / "photos" / "train" / k).is_file()]
    by_class: dict[str, list[Path]] = {}
    for photo in photos:
        by_class.setdefault(photo.parent.name, []).append(photo)
    chosen = [p for group in zip(*by_class.values(), strict=False) for p in group]  # round robin over the classes
    chosen += [p for p in photos if p not in chosen]
    target = root / "heldout"
    if target.exists():
        shutil.rmtree(target)
    copied = []
    for photo in chosen[:count]:
        (target / photo.parent.name).mkdir(parents=True, exist_ok=True)
        copied.append(Path(shutil.copy2(photo, target / photo.parent.name / photo.name)))
    return copied


def _summarise(args, root: Path, log: Path, job, manifest: dict, summary, sources: list[str], client,
               seconds: float, say) -> None:
    import pyarrow.parquet as pq

    from pipelines.batch.outputs import write_contact_sheet
    from pipelines.demo.check import chroma_check, heldout_bits_per_dim, submission_run_id

    dest = root / "colorized"
    sheet = write_contact_sheet(str(dest), sources)
    parent = submission_run_id(client, EXPERIMENT, job.run_name)
    if sheet and parent:
        client.log_artifact(parent, sheet, "contact_sheet")
    rows = [r for r in pq.read_table(dest / "manifest.parquet").to_pylist() if r["status"] == "done"]
    counts = summary.counts
    say(f"\ndone in {seconds:.0f} s: {counts['done']} photos colorized, {counts['failed']} failed")
    say(f"contact sheet:    {sheet}  (also in the MLflow run {job.run_name})")
    say(f"colorized images: {dest}  (manifest: {dest / 'manifest.parquet'})")
    if rows:
        check = chroma_check(rows, dest)
        say(f"held-out colour:  mean |CbCr - original| {check.colour_error:.1f} vs {check.gray_error:.1f} for a gray "
            f"image ({check.ratio:.2f}x) over {check.images} colourings")
    bpd = heldout_bits_per_dim(client, EXPERIMENT, job.run_name)
    say("held-out bits/dim (registered EMA weights): " + ", ".join(f"{s} {v:.2f}" for s, v in sorted(bpd.items())))
    say(f"trained models:   {root / 'models'}  (registered as coltran-*@candidate)")
    say(f"compare runs:     mlflow ui --backend-store-uri {client.tracking_uri} --port 5000  -> http://127.0.0.1:5000")
    if manifest["splits"].get("heldout", {}).get("images", 0) >= 2:  # FID needs two images on each side
        say(f"evaluate them:    {evaluate_command(root, manifest, client.tracking_uri)}")
        say(f"                  FID (with the grayscale and real-image anchor rows), bits/dim and colourfulness "
            f"-> {root / 'evaluation' / 'report.html'}, and a run in MLflow")
    say(f"logs:             {log}")


def evaluate_command(root: Path, manifest: dict, tracking_uri: str) -> str:
    """The `coltran evaluate` command for the demo's models: every held-out photo colorized and scored, the
    training split's images (other photos: disjoint by content) as the FID reference, the run in the demo's store."""
    splits = manifest["splits"]
    words = ["coltran", "evaluate", str(root / "data"), "--reference", str(root / "data" / "train"), "--models",
             str(root / "models"), "--out", str(root / "evaluation"), "--num-images", str(splits["heldout"]["images"]),
             "--num-reference", str(splits["train"]["images"]), "--num-samples", "1", "--experiment", "coltran-demo"]
    return f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} " + shlex.join(words)
