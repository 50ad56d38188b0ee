"""Batch colorization throughput: end-to-end images/s of the Ray Data job (pipelines.batch) against each model
stage's standalone images/s, measured in the same run with the same batch sizes and thread counts, for the
`test` and `mid` presets (untrained init-models weights: speed does not depend on training).

End-to-end "steady" images/s counts the images finished after the first one over the time between the first and
the last finish (from the manifest's finished_at), so Ray start-up, model loading and pipeline fill are left out;
"wall" includes them. A stage's standalone rate is its actor class called in this process, alone, on the same
inputs. Target: end-to-end steady >= 0.8 x the slowest stage. On a shared machine the load can change several-fold
between the two measurements, so the table also gives the slowest stage's busy share inside the end-to-end run
(its per-image compute times from the manifest over the run's window): near 1 means the pipeline kept it fed.

    .venv/bin/python benchmarks/batch.py [--presets test,mid] [--images test=16,mid=2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from coltran.configs import STAGE_NAMES
from coltran.imageio import decode_image
from coltran.init_models import init_models
from coltran.inputs import prepare_image
from pipelines.batch.job import resolve_stage_models, run_batch, stage_actor_kwargs
from pipelines.batch.settings import BatchSettings, load_settings
from pipelines.inference.stages import STAGE_ACTORS

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-500"
# One image per call for the spatial stage and the writer, so every image has its own finish time (on CPU the
# spatial upsampler gains nothing from larger batches); the colorizer keeps its batch of 8.
DEFAULT_SETS = ["spatial_upsampler.batch_size=1", "write.batch_size=1", "progress_every_s=0"]


def write_images(folder: Path, count: int) -> list[bytes]:
    """`count` real ImageNet JPEGs when the shared sample is here, else synthetic 500x375 photos-like images."""
    folder.mkdir(parents=True, exist_ok=True)
    real = sorted(SAMPLE.glob("*.JPEG"))[:count] if SAMPLE.is_dir() else []
    rng = np.random.default_rng(0)
    for k in range(count):
        if k < len(real):
            (folder / real[k].name).write_bytes(real[k].read_bytes())
            continue
        y, x = np.mgrid[0:375, 0:500]
        rgb = np.stack([x / 2, y / 1.5, (x + y) / 3.5], -1) + rng.normal(0, 12, (375, 500, 3))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"synthetic_{k}.jpg", quality=90)
    return [p.read_bytes() for p in sorted(folder.iterdir())]


def end_to_end(settings: BatchSettings, count: int) -> dict[str, float]:
    start = time.monotonic()
    summary = run_batch(settings)
    wall = time.monotonic() - start
    if summary.counts["done"] != count:
        raise RuntimeError(f"end-to-end run finished {summary.counts} of {count} images")
    rows = sorted(pq.read_table(f"{settings.out}/manifest.parquet").to_pylist(), key=lambda r: r["finished_at"])
    span = (rows[-1]["finished_at"] - rows[0]["finished_at"]).total_seconds()
    out = {"wall": count / wall, "steady": (count - 1) / span if count > 1 and span > 0 else count / wall}
    for stage in STAGE_NAMES:  # share of the run's window in which the stage's actor was computing
        out[f"busy_{stage}"] = sum(r[f"{stage}_s"] for r in rows) / (span + rows[0][f"{stage}_s"])
    return out


def standalone(settings: BatchSettings, images: list[bytes]) -> dict[str, float]:
    """Each stage's actor class, in this process, on real inputs (the previous stage's outputs)."""
    models = resolve_stage_models(settings.models)
    prepared = [prepare_image(decode_image(data).rgb, settings.crop) for data in images]
    batch = {"key": np.array([f"k{i}" for i in range(len(images))], dtype=object),
             "seed": np.arange(len(images), dtype=np.int64),
             "gray_64": np.stack([p.gray_64 for p in prepared]), "gray_256": np.stack([p.gray_256 for p in prepared])}
    rates = {}
    for stage in STAGE_NAMES:
        actor = STAGE_ACTORS[stage](**stage_actor_kwargs(settings, stage, models, "cpu"))
        size, outputs = getattr(settings, stage).batch_size, []
        start = time.perf_counter()
        for lo in range(0, len(images), size):
            outputs.append(actor({k: v[lo : lo + size] for k, v in batch.items()}))
        rates[stage] = len(images) / (time.perf_counter() - start)
        batch = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    return rates


def run_preset(preset: str, count: int, workdir: Path, overrides: list[str]) -> dict[str, float]:
    models = init_models(workdir / f"models-{preset}", preset)
    images = write_images(workdir / f"images-{preset}", count)
    settings = load_settings(data={"sources": [str(workdir / f"images-{preset}")], "models": str(models),
                                   "out": str(workdir / f"out-{preset}")}, overrides=DEFAULT_SETS + overrides)
    load = os.getloadavg()[0]
    e2e = end_to_end(settings, count)
    stages = standalone(settings, images)
    slowest = min(stages, key=stages.get)
    return {"images": count, **{f"e2e_{k}": v for k, v in e2e.items()}, **stages, "slowest": slowest,
            "ratio": e2e["steady"] / stages[slowest], "ratio_wall": e2e["wall"] / stages[slowest],
            "busy": e2e[f"busy_{slowest}"], "load": f"{load:.0f}-{os.getloadavg()[0]:.0f}"}


def print_table(rows: dict[str, dict]) -> None:
    head = (f"{'preset':<7}{'images':>7}{'e2e wall':>10}{'e2e steady':>12}{'colorizer':>11}{'col_up':>9}"
            f"{'spat_up':>9}  {'slowest':<18}{'steady/slowest':>15}{'wall/slowest':>13}{'busy':>6}{'load':>9}")
    print("images/s on CPU; stages standalone in-process with the job's batch sizes and threads; busy: share of the "
          "end-to-end window in which the slowest stage's actor computed; load: 1-min load average before-after")
    print(head)
    for preset, r in rows.items():
        print(f"{preset:<7}{r['images']:>7}{r['e2e_wall']:>10.3f}{r['e2e_steady']:>12.3f}{r['colorizer']:>11.3f}"
              f"{r['color_upsampler']:>9.3f}{r['spatial_upsampler']:>9.3f}  {r['slowest']:<18}"
              f"{r['ratio']:>15.2f}{r['ratio_wall']:>13.2f}{r['busy']:>6.2f}{r['load']:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="test,mid")
    parser.add_argument("--images", default="test=16,mid=2", help="images per preset")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    counts = dict(item.split("=") for item in args.images.split(","))
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(_node_ip_address="127.0.0.2", num_cpus=args.num_cpus, object_store_memory=300_000_000,
             include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # keep the table readable
    rows = {}
    try:
        with tempfile.TemporaryDirectory(prefix="coltran-batch-bench-") as tmp:
            for preset in args.presets.split(","):
                started = time.monotonic()
                rows[preset] = run_preset(preset, int(counts[preset]), Path(tmp), args.overrides)
                print(f"{preset}: measured in {time.monotonic() - started:.0f} s", flush=True)
    finally:
        ray.shutdown()
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
