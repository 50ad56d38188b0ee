"""Evaluation job: FID by the paper's protocol (with the grayscale and ground-truth anchor rows measured in the same
run), held-out bits/dim per stage and colourfulness, on Ray Data with the batch job's stage actors; a report
(pipelines.evaluate.report) logged to an MLflow run, the child of a training parent run when one is given.

Protocol: the first `num_images` held-out images in sorted key order (centre crop, area resize to 256x256) are
colorized; FID compares the samples, the grayscale inputs and the real images each with the statistics of a
DISJOINT set of `num_reference` real images (checked by content), cached per reference set. Images whose pixels
are all gray (R=G=B, e.g. GRAYSCALE_FILES.txt) are colorized but left out of the colour metrics (FID,
colourfulness) on both sides; bits/dim covers every evaluated image.

Resources: the actor pools (bits/dim, the three stages, Inception) are sized from the cluster Ray reports
(pipelines.inference.plan); the plan is printed at start and written in the report, and one that can never be placed
is refused before any image is read.

Run: `coltran evaluate DATA... --models DIR|models:/@alias --out REPORT_DIR [--set key=value]`, or
`ray job submit --working-dir . -- python -m pipelines.evaluate jobs/evaluate.yaml [--set key=value ...]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import ray

from coltran.configs import STAGE_NAMES
from coltran.metrics import StatsCache, feature_statistics, frechet_distance, inception_path, stats_key
from pipelines.batch.job import require_models_on_every_node, resolve_stage_models
from pipelines.evaluate.data import PREPARE, digests, list_candidates, rows_dataset, select
from pipelines.evaluate.report import EvalResult, compose_grid, log_to_mlflow, write_report
from pipelines.evaluate.settings import POOLS, EvalSettings, load_settings
from pipelines.evaluate.stages import BitsPerDimActor, InceptionActor
from pipelines.inference.plan import (
    READ_TASK_CPUS,
    STAGE_ASKS,
    PlanError,
    ResourcePlan,
    StageAsk,
    job_device,
    make_plan,
)
from pipelines.inference.stages import STAGE_ACTORS
from pipelines.io.s3 import resolve_path
from pipelines.io.shared_path import SharedPathError, is_local_path, require_shared_tracking_uri

# The dedicated asks and weights of the evaluation's own pools (pipelines.inference.plan): bits/dim scores each image
# once per stage, teacher-forced, so it is cheap; Inception runs on the samples, the grayscale and the real images.
ASKS = {**STAGE_ASKS, "bits": StageAsk(gpus=0.25, weight=1), "inception": StageAsk(gpus=0.5, weight=1)}


def _steps(models, registry: str) -> dict[str, int]:
    """Training step of each stage's checkpoint (its meta.json; models:/ refs are already in the local cache)."""
    from pipelines.tracking.registry import resolve_models

    return {stage: int(json.loads((resolve_models(m.ref, tracking_uri=registry) / "meta.json").read_text()).get("step", 0))
            for stage, m in models.items()}


def resource_plan(settings: EvalSettings, device: str) -> ResourcePlan:
    """The job's actor pools sized from the connected cluster (printed; PlanError at once if unplaceable)."""
    pools = [name for name in POOLS if name != "bits" or settings.bits_per_dim]
    return make_plan("evaluate", {name: getattr(settings, name) for name in pools}, ASKS,
                     task_cpus=max(READ_TASK_CPUS, settings.prepare.num_cpus), device=device,
                     task_pool=settings.prepare.pool)


def _pool(ds, actor, settings: EvalSettings, name: str, plan: ResourcePlan, **kwargs):
    """`actor` on the plan's pool `name`, built with `kwargs` (which hold the device) once per actor."""
    return ds.map_batches(actor, batch_size=getattr(settings, name).batch_size, batch_format="numpy",
                          fn_constructor_kwargs=kwargs, **plan.pools[name].map_args())


def _collect(ds) -> dict[str, dict[str, np.ndarray]]:
    """key -> that row's columns (the features are small; the images were dropped by the Inception stage)."""
    rows = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, key in enumerate(batch["key"]):
            rows[str(key)] = {name: values[i] for name, values in batch.items()}
    return rows


def _select_sets(settings: EvalSettings):
    candidates = list_candidates(settings.data, settings.split, settings.s3_endpoint)
    evaluated = select(candidates, 0, settings.num_images, "evaluated images")
    same = not settings.reference or sorted(settings.reference) == sorted(settings.data)
    pool = candidates if same else list_candidates(settings.reference, settings.split, settings.s3_endpoint)
    start = settings.reference_start if settings.reference_start is not None else (settings.num_images if same else 0)
    reference = select(pool, start, settings.num_reference, "reference images")
    return evaluated, reference


def _reference_stats(settings: EvalSettings, rows, found: dict, device: str, plan: ResourcePlan | None):
    """(statistics, from the cache?, colour images, cache key) of the colour reference images; the Inception
    pass over `rows` (on the plan's pool) runs only when this exact set (keys and pixels) has not been seen."""
    colour = sorted((key, digest) for key, (digest, gray) in found.items() if not gray)
    if len(colour) < 2:
        raise ValueError(f"the reference set has {len(colour)} colour images; need at least 2")
    key = stats_key(colour, {"prepare": PREPARE})
    spec = settings.inception

    def compute():
        features = _collect(_pool(rows, InceptionActor, settings, "inception", plan, device=device,
                                  batch_size=spec.micro_batch, num_threads=spec.num_threads, role="reference"))
        return feature_statistics(np.stack([features[k]["feat_truth"] for k, _ in colour]))

    stats, cached = StatsCache(settings.cache_dir).get_or_compute(key, compute)
    return stats, cached, len(colour), key


def _evaluated_rows(settings: EvalSettings, rows, models, device: str, grid_keys: frozenset[str],
                    registry: str, plan: ResourcePlan):
    refs = {stage: models[stage].ref for stage in STAGE_NAMES}
    if settings.bits_per_dim:
        rows = _pool(rows, BitsPerDimActor, settings, "bits", plan, checkpoints=refs, device=device,
                     weights=settings.weights, num_threads=settings.bits.num_threads, tracking_uri=registry)
    step_kwargs = {"colorizer": {"num_samples": settings.num_samples, "temperature": settings.temperature,
                                 "mode": settings.mode}}
    for stage in STAGE_NAMES:
        spec = getattr(settings, stage)
        rows = _pool(rows, STAGE_ACTORS[stage], settings, stage, plan, checkpoint=refs[stage], device=device,
                     weights=settings.weights, num_threads=spec.num_threads, micro_batch=spec.micro_batch,
                     step_kwargs=step_kwargs.get(stage), tracking_uri=registry)
    spec = settings.inception
    return _collect(_pool(rows, InceptionActor, settings, "inception", plan, device=device,
                          batch_size=spec.micro_batch, num_threads=spec.num_threads, role="eval",
                          grid_keys=grid_keys))


def _check_disjoint(found: dict, reference: dict) -> None:
    by_digest = {digest: key for key, (digest, _) in reference.items()}
    shared = sorted((key, by_digest[d]) for key, (d, _) in found.items() if d in by_digest)
    if shared:
        raise ValueError(f"{len(shared)} evaluated images also appear (same pixels) in the reference set, e.g. "
                         f"{shared[:3]}; the reference set must be disjoint (set reference or reference_start)")


def _metrics(rows: dict, ref_stats, settings: EvalSettings) -> dict[str, float]:
    colour = [r for r in rows.values() if not r["was_grayscale"]]
    if len(colour) < 2:
        raise ValueError(f"only {len(colour)} evaluated colour images; need at least 2 for FID")
    samples = np.concatenate([r["feat_samples"] for r in colour])  # (colour images * num_samples, 2048)
    metrics = {
        "fid/colorized": frechet_distance(feature_statistics(samples), ref_stats),
        "fid/grayscale": frechet_distance(feature_statistics(np.stack([r["feat_gray"] for r in colour])), ref_stats),
        "fid/ground_truth": frechet_distance(feature_statistics(np.stack([r["feat_truth"] for r in colour])),
                                             ref_stats),
        "colourfulness/colorized": float(np.mean([r["colourfulness_samples"] for r in colour])),
        "colourfulness/ground_truth": float(np.mean([r["colourfulness_truth"] for r in colour])),
    }
    if settings.bits_per_dim:
        metrics.update({f"bits_per_dim/{s}": float(np.mean([r[f"bpd_{s}"] for r in rows.values()]))
                        for s in STAGE_NAMES})
    return metrics


def run_evaluation(settings: EvalSettings, *, ray_address: str | None = None) -> EvalResult:
    """Evaluate, write the report to settings.out, log it to MLflow (unless disabled); return the result."""
    started = time.monotonic()
    inception_path()  # fail fast, naming `pip install coltran[eval]`, before any image is read
    registry = settings.tracking.tracking_uri or mlflow.get_tracking_uri()  # the actors resolve against it too
    models = resolve_stage_models(settings.models, tracking_uri=registry,
                                  names=dataclasses.asdict(settings.tracking.registered_models))
    if not ray.is_initialized():
        ray.init(address=ray_address)
    device = job_device(settings.device)
    plan = resource_plan(settings, device)  # before any image is read: a plan that cannot be placed stops here
    if settings.models.startswith("models:/"):
        require_shared_tracking_uri(registry)  # every node's actors download the pinned versions from it
    require_models_on_every_node(models, settings.models)
    evaluated, reference = _select_sets(settings)
    common = {"split": settings.split, "seed": settings.seed, "s3_endpoint": settings.s3_endpoint,
              "batch_size": settings.prepare.batch_size, "num_cpus": settings.prepare.num_cpus,
              "task_args": plan.task_args()}
    eval_rows, ref_rows = rows_dataset(evaluated, **common), rows_dataset(reference, **common)
    by_role = digests({"evaluated": eval_rows, "reference": ref_rows}, plan.task_args())
    found, ref_found = by_role["evaluated"], by_role["reference"]
    _check_disjoint(found, ref_found)
    ref_stats, cached, ref_colour, ref_key = _reference_stats(settings, ref_rows, ref_found, device, plan)
    grid_keys = [c.key for c in evaluated if c.key in found][: settings.grid_images]
    rows = _evaluated_rows(settings, eval_rows, models, device, frozenset(grid_keys), registry, plan)
    result = EvalResult(
        metrics=_metrics(rows, ref_stats, settings),
        counts={"evaluated": len(rows), "colour": sum(not r["was_grayscale"] for r in rows.values()),
                "reference": len(ref_found), "reference_colour": ref_colour, "num_samples": settings.num_samples},
        models={s: m.label for s, m in models.items()}, steps=_steps(models, registry),
        untrained=any(m.untrained for m in models.values()),
        grayscale_keys=sorted(k for k, r in rows.items() if r["was_grayscale"]),
        missing=sorted({c.key for c in evaluated} - set(found)) + sorted({c.key for c in reference} - set(ref_found)),
        reference_cached=cached, reference_stats_key=ref_key, grid=compose_grid([rows[k]["grid_png"] for k in grid_keys if k in rows]),
        grid_keys=grid_keys, seconds_per_image={s: float(np.mean([r[f"{s}_s"] for r in rows.values()]))
                                                for s in STAGE_NAMES},
        seconds=time.monotonic() - started, settings=settings, plan=plan.describe())
    publish(result)
    return result


def publish(result: EvalResult) -> None:
    """Write the report to `out` and log it to MLflow. Only the driver writes it, so a local `out` is the
    driver's node's disk (with `ray job submit`, the head's: read it from MLflow, or give an s3:// prefix); a URI
    gets a copy of the report folder, uploaded after MLflow has its own."""
    out = result.settings.out
    local = is_local_path(out)
    folder = Path(out).expanduser() if local else Path(tempfile.mkdtemp(prefix="coltran-report-"))
    try:
        write_report(result, folder)
        if result.settings.tracking.enabled:
            result.run_id = log_to_mlflow(result, folder)
        if not local:
            from pyarrow import fs as pafs

            dest_fs, dest = resolve_path(out, s3_endpoint=result.settings.s3_endpoint)
            pafs.copy_files(str(folder), dest, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=dest_fs)
    finally:
        if not local:
            shutil.rmtree(folder, ignore_errors=True)


def report_location(out: str) -> str:
    return f"{out.rstrip('/')}/report.html"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `coltran evaluate`; any setting of jobs/evaluate.yaml is reachable with --set."""
    parser.add_argument("data", nargs="*", help="held-out images: preprocessed dataset(s) (their --split), Parquet "
                        "files, folders, archives or s3:// prefixes (default: the job file's)")
    parser.add_argument("--job", default=None, help="YAML job file (see jobs/evaluate.yaml); options override it")
    parser.add_argument("--models", default=None, help="models directory or models:/@<alias> (MLflow registry)")
    parser.add_argument("--out", default=None, help="folder for the report")
    parser.add_argument("--reference", nargs="+", default=None, help="real images for the FID statistics "
                        "(default: the next images of DATA after the evaluated ones)")
    for name in ("num-images", "num-reference", "num-samples", "seed"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--split", default=None, help="split of preprocessed datasets (default heldout)")
    parser.add_argument("--parent-run-id", default=None, help="MLflow run to log under (e.g. the training run)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment when no parent run is given")
    parser.add_argument("--no-mlflow", action="store_true", help="write the report only")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: local)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    data = {k: v for k, v in {"data": args.data or None, "models": args.models, "out": args.out,
                              "reference": args.reference, "num_images": args.num_images,
                              "num_reference": args.num_reference, "num_samples": args.num_samples,
                              "seed": args.seed, "split": args.split}.items() if v is not None}
    tracking = {k: v for k, v in {"parent_run_id": args.parent_run_id, "experiment": args.experiment}.items()
                if v is not None}
    if args.no_mlflow:
        tracking["enabled"] = False
    if tracking:
        data["tracking"] = tracking
    return load_settings(args.job, data=data, overrides=args.overrides)


def run(args: argparse.Namespace) -> int:
    """`coltran evaluate`: run the job and print the figures and where the report is; 2 when the resource plan
    is refused (the message says what it needs)."""
    try:
        result = run_evaluation(settings_from_args(args), ray_address=args.ray_address)
    except (PlanError, SharedPathError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(result.metrics, indent=1))
    print(f"report: {report_location(result.settings.out)}" +
          (f"; MLflow run {result.run_id}" if result.run_id else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.evaluate JOB.yaml [--set key=value ...]` (the `ray job submit` entry point)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.splitlines()[0],
                                     epilog="exit status: 0 when the report was written (unusable inputs are counted in it, not fatal); 2 when "
                                     "the resource plan, the models directory or the MLflow store is refused before any work "
                                     "(a path some nodes lack); 1 when the job failed")
    parser.add_argument("job", help="YAML job file (see jobs/evaluate.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ray-address", default=None, help="default: the job's cluster, else a new local one")
    args = parser.parse_args(argv)
    try:
        result = run_evaluation(load_settings(args.job, overrides=args.overrides), ray_address=args.ray_address)
    except (PlanError, SharedPathError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(result.metrics, indent=1))
    print(f"report: {report_location(result.settings.out)}" + (f"; MLflow run {result.run_id}" if result.run_id else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
