"""Batch colorization on Ray Data: folders, archives, S3 prefixes or preprocessed Parquet -> colour images under
DEST mirroring the input keys, and DEST/manifest.parquet with one row per input (pipelines.batch.manifest).

Streaming: read -> decode + prepare (CPU tasks) -> colorizer, colour upsampler and spatial upsampler, each on its
own actor pool that loads its checkpoint once -> restore + encode + write (CPU tasks), nothing materialised. At full
resolution the model tensors travel with the input's luma or its file, whichever is smaller (batch.tasks). The
pools are sized from the cluster (pipelines.inference.plan: the plan is printed at start, and one that can never be
placed is refused before DEST is touched).

Resume: each write batch records its items in a manifest part as soon as its files are in place; the driver
compacts the parts as the job goes (pipelines.batch.manifest). Re-running the same command (same settings: checked
against DEST/_batch_state.json) reads the parts first (one dataset call) and never reads an input already done:
loose files are dropped from the listing, archive members are skipped before their bytes are extracted, Parquet
rows before they are decoded (the finished keys reach the tasks as an object-store reference: pipelines.batch.
resume). Those inputs appear in the new manifest as status `skipped`, reason `already_done`, with the outputs, seed
and timings of the attempt that made them (column `attempt`). `skipped` thus means "done by an earlier attempt into
this DEST, not redone now"; inputs that failed before are tried again. done + failed + skipped = inputs. One run
per DEST at a time.

Run: `coltran colorize SRC... --models DIR|models:/@alias --out DEST [--set stage.key=value]`, or
`ray job submit --working-dir . -- python -m pipelines.batch jobs/colorize.yaml [--set key=value ...]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from coltran.configs import STAGE_NAMES
from pipelines.batch.manifest import (
    begin_attempt,
    compact_parts,
    counts,
    done_identities,
    finish_attempt,
    read_parts,
)
from pipelines.batch.outputs import source_labels, write_contact_sheet
from pipelines.batch.resume import DoneKeys
from pipelines.batch.settings import BatchSettings, load_settings, settings_from_args
from pipelines.batch.sources import build_inputs
from pipelines.batch.tasks import JobContext, write_batch
from pipelines.inference.plan import (
    READ_TASK_CPUS,
    STAGE_ASKS,
    PlanError,
    ResourcePlan,
    job_device,
    make_plan,
)
from pipelines.inference.stages import STAGE_ACTORS
from pipelines.io.s3 import resolve_path
from pipelines.io.shared_path import (
    SharedPathError,
    require_on_every_node,
    require_shared_path,
    require_shared_tracking_uri,
)


@dataclass
class StageModel:
    ref: str  # what an actor loads: a checkpoint directory, or models:/<name>/<version> (pinned)
    label: str  # what the manifest records: <name>/<version>, or <directory>@step<N>, "(untrained)" if so
    untrained: bool


@dataclass
class BatchSummary:
    dest: str
    attempt: int
    counts: dict[str, int]
    seconds: float
    images_per_s: float  # images colorized by this attempt per second of its wall time

    max_failed_fraction: float = 1.0

    @property
    def exit_code(self) -> int:
        """0 when the job finished, unusable inputs included (each is a manifest row); 1 when more than
        `max_failed_fraction` of the inputs failed. (Refusals exit 2; a crash is non-zero anyway.)"""
        total = sum(self.counts.values())
        return 1 if total and self.counts["failed"] / total > self.max_failed_fraction else 0


def resolve_stage_models(spec: str, tracking_uri: str | None = None,
                         names: dict[str, str] | None = None) -> dict[str, StageModel]:
    """Each stage's checkpoint (only its meta.json is read here). `models:/@alias` is resolved once on the driver
    (against `tracking_uri`, default MLflow's current one; registered `names` per stage, default coltran-<stage>)
    and pinned to versions, so every actor loads the same versions even if the alias moves during the run."""
    if spec.startswith("models:/"):
        from pipelines.tracking.registry import resolve_models

        root = resolve_models(spec, tracking_uri=tracking_uri, names=names)
    else:
        root = Path(spec).expanduser().resolve()
    models = {}
    for stage in STAGE_NAMES:
        meta_path = root / stage / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"models {spec!r}: no {stage} checkpoint at {root / stage}; expected a models "
                                    "directory DIR/{colorizer,color_upsampler,spatial_upsampler} or models:/@<alias>")
        meta = json.loads(meta_path.read_text())
        untrained = bool(meta.get("untrained"))
        if meta.get("registered_name") and spec.startswith("models:/"):  # written by tracking.resolve_models
            ref = label = f"models:/{meta['registered_name']}/{meta['registered_version']}"
        else:
            ref, label = str(root / stage), f"{root / stage}@step{meta.get('step', 0)}"
        models[stage] = StageModel(ref, label + (" (untrained)" if untrained else ""), untrained)
    return models


def require_models_on_every_node(models: dict[str, StageModel], spec: str) -> None:
    """Stage actors load a models directory on whichever node they land: on machines that share no disk it must
    exist on every node, else actors elsewhere fail one by one after the job started. Refused up front instead
    (registry refs are fetched by each node from MLflow and always pass)."""
    require_on_every_node([m.ref for m in models.values() if not m.ref.startswith("models:/")], f"the models {spec}",
                          "Use the MLflow registry (models:/@<alias>, with a tracking server every node reaches) or "
                          "a folder mounted on every node.")


def resource_plan(settings: BatchSettings, device: str) -> ResourcePlan:
    """The job's actor pools and task share sized from the connected cluster (printed; PlanError if unplaceable)."""
    return make_plan("colorize", {stage: getattr(settings, stage) for stage in STAGE_NAMES}, STAGE_ASKS,
                     task_cpus=max(READ_TASK_CPUS, settings.prepare.num_cpus, settings.write.num_cpus), device=device,
                     task_pool=settings.prepare.pool)


def registry_uri(settings: BatchSettings) -> str:
    """The one MLflow tracking URI of the job: the setting, else MLFLOW_TRACKING_URI / MLflow's default."""
    import mlflow

    return settings.tracking_uri or mlflow.get_tracking_uri()


def stage_actor_kwargs(settings: BatchSettings, stage: str, models: dict[str, StageModel], device: str) -> dict:
    """Constructor arguments of `stage`'s actor (what the job and benchmarks/batch.py build it with)."""
    spec = getattr(settings, stage)
    step = {"num_samples": settings.num_samples, "temperature": settings.temperature, "mode": settings.mode}
    tracking_uri = None
    if models[stage].ref.startswith("models:/"):
        tracking_uri = registry_uri(settings)  # actors on other nodes download from the same server
    return {"checkpoint": models[stage].ref, "device": device, "weights": settings.weights,
            "num_threads": spec.num_threads, "micro_batch": spec.micro_batch,
            "step_kwargs": step if stage == "colorizer" else None, "tracking_uri": tracking_uri,
            "compile_sampler": settings.compile_sampler and stage == "colorizer"}


def build_pipeline(settings: BatchSettings, ctx: JobContext, models: dict[str, StageModel], device: str,
                   plan: ResourcePlan):
    """The streaming dataset of (key, status) rows; iterating it runs the job; `plan` places the actor pools."""
    ds, parquet_sources = build_inputs(settings, ctx, plan.task_args())
    if parquet_sources and settings.resolution == "full":
        print(f"note: {parquet_sources} are preprocessed Parquet, which holds no full-resolution pixels: their "
              "outputs are 256x256 of the crops stored there (manifest column resolution='256')", file=sys.stderr)
    for stage in STAGE_NAMES:
        spec = getattr(settings, stage)
        # Blocks of one batch: each stage hands on every batch as soon as it is done (Ray Data would otherwise
        # bundle a task's outputs up to 128 MB, and the next stage would wait for the whole bundle).
        ds = ds.repartition(target_num_rows_per_block=spec.batch_size)
        ds = ds.map_batches(STAGE_ACTORS[stage], batch_size=spec.batch_size, batch_format="numpy",
                            fn_constructor_kwargs=stage_actor_kwargs(settings, stage, models, device),
                            **plan.pools[stage].map_args())
    return ds.map_batches(write_batch, batch_size=settings.write.batch_size, batch_format="numpy",
                          num_cpus=settings.write.num_cpus, **plan.task_args(), fn_kwargs={"ctx": ctx})


@dataclass
class Compactor:
    """Compacts the manifest parts while the job runs, once `every_rows` more inputs have been written, so the
    parts that start and finish read stay few: about one per `every_rows` inputs, not one per write batch."""

    fs: object
    dest: str
    attempt: int
    every_rows: int = 2048
    _pending: int = 0

    def written(self, rows: int) -> None:
        self._pending += rows
        if self._pending >= self.every_rows:
            self._pending = 0
            compact_parts(self.fs, self.dest, self.attempt)


def _consume(ds, every_s: float, compactor: Compactor | None = None) -> tuple[int, float]:
    """Run the job; print a progress line with images/s every `every_s` seconds. Returns (done, seconds)."""
    start = last = time.monotonic()
    done = failed = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        statuses = list(batch["status"])
        done += statuses.count("done")
        failed += statuses.count("failed")
        if compactor is not None:
            compactor.written(len(statuses))
        if every_s and time.monotonic() - last >= every_s:
            last = time.monotonic()
            print(f"colorize: {done} images done ({failed} failed at write), "
                  f"{done / (last - start):.2f} images/s, {last - start:.0f} s", file=sys.stderr, flush=True)
    return done, time.monotonic() - start


def run_batch(settings: BatchSettings, *, ray_address: str | None = None) -> BatchSummary:
    """Run (or resume) the job on the connected Ray cluster, or on `ray_address`, or a new local one."""
    started = time.monotonic()
    fs, dest = resolve_path(settings.out, s3_endpoint=settings.s3_endpoint)
    registry = registry_uri(settings) if settings.models.startswith("models:/") else None
    models = resolve_stage_models(settings.models, tracking_uri=registry)
    if any(m.untrained for m in models.values()):
        print("warning: these models are UNTRAINED (coltran init-models): colours will be meaningless",
              file=sys.stderr)
    if not ray.is_initialized():
        ray.init(address=ray_address)
    device = job_device(settings.device)
    plan = resource_plan(settings, device)  # before DEST is touched: a plan that cannot be placed stops here
    require_models_on_every_node(models, settings.models)  # before OUT is made
    require_shared_path(settings.out, "batch OUT")  # every node's write tasks put images there
    if registry:
        require_shared_tracking_uri(registry)  # every node's actors download the pinned versions from it
    attempt = begin_attempt(fs, dest, settings.fingerprint({s: m.label for s, m in models.items()}))
    done = DoneKeys.from_identities(done_identities(read_parts(fs, dest)[0]))
    ctx = JobContext(fs=fs, dest=dest, attempt=attempt, seed=settings.seed, num_samples=settings.num_samples,
                     resolution=settings.resolution, crop=settings.crop, format=settings.format,
                     jpeg_quality=settings.jpeg_quality, max_pixels=settings.max_pixels, min_side=settings.min_side,
                     models={s: m.label for s, m in models.items()}, labels=source_labels(settings.sources),
                     done=done)
    colorized, seconds = _consume(build_pipeline(settings, ctx, models, device, plan), settings.progress_every_s,
                                  Compactor(fs, dest, attempt))
    found = counts(finish_attempt(fs, dest, attempt))
    summary = BatchSummary(settings.out, attempt, found, time.monotonic() - started, colorized / max(seconds, 1e-9),
                           settings.max_failed_fraction)
    print(f"colorize: {sum(found.values())} inputs: {found['done']} done, {found['failed']} failed, "
          f"{found['skipped']} skipped (done by an earlier attempt); attempt {attempt} on {device}, "
          f"{summary.seconds:.1f} s, {summary.images_per_s:.2f} images/s; manifest: {settings.out.rstrip('/')}/"
          "manifest.parquet", file=sys.stderr, flush=True)
    return summary


def run_cli(args: argparse.Namespace) -> int:
    """`coltran colorize` for folders, archives, prefixes, Parquet, models:/ URIs or --batch; 2 when the
    resource plan is refused (the message says what it needs)."""
    try:
        settings = settings_from_args(args)
        summary = run_batch(settings, ray_address=args.ray_address)
    except (PlanError, SharedPathError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if getattr(args, "contact_sheet", False):
        sheet = write_contact_sheet(settings.out, settings.sources, s3_endpoint=settings.s3_endpoint)
        print(f"contact sheet: {sheet or '(none: no image was colorized)'}", file=sys.stderr, flush=True)
    return summary.exit_code


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.batch JOB.yaml [--set key=value ...]` (the `ray job submit` entry point)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.batch", description=__doc__.splitlines()[0],
                                     epilog="exit status: 0 when the job finished, unusable inputs included (each is a manifest row); 1 when more "
                                     "than max_failed_fraction of the inputs failed, or the job failed; 2 when refused "
                                     "before any work (resource plan, OUT not shared by every node)")
    parser.add_argument("job", help="YAML job file (see jobs/colorize.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ray-address", default=None, help="default: the job's cluster, else a new local one")
    args = parser.parse_args(argv)
    try:
        return run_batch(load_settings(args.job, overrides=args.overrides), ray_address=args.ray_address).exit_code
    except (PlanError, SharedPathError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
