"""Scale of the batch job's bookkeeping, simulated on a small machine (issue 20): how the driver's time and peak
memory for the manifest and resume machinery grow from 1k to 10k to 100k inputs, and how many bytes per image the
full-resolution batch path moves through the object store.

Bookkeeping (one fresh process per N, so peaks do not mix; synthetic keys, no model): a first attempt writes half
the inputs' manifest parts, one per write batch as the write tasks do (the writes are the tasks' work, not timed),
while the driver compacts them as pipelines.batch.job does; it is then "killed" (no finish). The resume starts:
state check, all parts read in one dataset call, finished keys hashed into the object store (pipelines.batch.resume),
and the finished keys are filtered out of the listing; the second attempt writes the other half, compacting, and
finishes (merge into manifest.parquet, parts compacted to one). Driver time = start + compaction + finish; peak
memory = the driver's resident-set high-water mark above what it held before (VmHWM, reset through clear_refs).
The same run without compaction (one part per write batch left for start and finish) is the baseline. Target:
100k costs at most 12x what 10k costs.

Object store bytes (real photos of the shared sample as JPEG files and re-encoded as PNG, the real decode + prepare
task and the test-preset model actors): the bytes of every column of each block the full-resolution path hands
from one stage to the next, per image, against the photo's decoded luma (H x W bytes) plus chroma (2 x H x W);
also what carrying always the file (the earlier design) or always the luma would have moved.

Preprocessing throughput (section `preprocess`): a generated ImageNet-shaped tar of tars (25, 50, 100 inner tars
of 4 small JPEGs made from the sample, the generator of tests/test_preprocess_scale.py) and a folder tree of the
same images, each through the real job (pipelines.preprocess) on one local Ray with all of the machine's CPUs,
alternated in the same run (order swapped every repeat, after an untimed warm-up), fastest of --repeats runs each;
images/s of both, their ratio, and seconds and seconds per image at each size (how the time grows with inner tars).

    .venv/bin/python benchmarks/scale.py [--sections bookkeeping,object_store,preprocess]
        [--sizes 1000,10000,100000] [--write-batch 8] [--images 8] [--inner-tars 25,50,100] [--per-inner 4]
        [--repeats 3]

Sections are functions called by main(), one entry each in SECTIONS; --sections runs a subset, in the given order.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-500"
RAY_ARGS = {"_node_ip_address": "127.0.0.2", "num_cpus": 2, "object_store_memory": 300_000_000,
            "include_dashboard": False, "log_to_driver": False}


# --- peak memory ------------------------------------------------------------------------------------------------

def reset_peak() -> int:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs 5); returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_since(baseline: int) -> int:
    return max(0, _status("VmHWM") - baseline)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


class Phase:
    """Wall time and peak memory above the start of one driver phase (accumulates over several `with` blocks)."""

    def __init__(self):
        self.seconds, self.peak = 0.0, 0

    def __enter__(self):
        self._base, self._start = reset_peak(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start
        self.peak = max(self.peak, peak_since(self._base))


# --- bookkeeping at N inputs (runs in its own process) ------------------------------------------------------------

def synthetic_rows(keys: list[str], attempt: int) -> list[dict]:
    """Manifest rows of finished inputs as the write task records them (outputs, seed, sizes, timings)."""
    from pipelines.batch.manifest import now

    stamp = now()
    return [{"key": k, "source": "/data/shots.tar", "status": "done", "stage": "done", "outputs": [f"{k[:-5]}_s0.png"],
             "seed": i, "num_samples": 1, "height": 375, "width": 500, "out_height": 375, "out_width": 500,
             "was_grayscale": False, "resolution": "full", "colorizer_model": "m/1", "color_upsampler_model": "m/1",
             "spatial_upsampler_model": "m/1", "finished_at": stamp, "prepare_s": 0.01, "colorizer_s": 1.0,
             "color_upsampler_s": 0.1, "spatial_upsampler_s": 0.5, "write_s": 0.02} for i, k in enumerate(keys)]


def write_attempt(fs, dest: str, keys: list[str], attempt: int, batch: int, compactor, compaction: Phase) -> None:
    """The write tasks' parts (untimed stand-in work) and the driver's compaction after each batch (timed)."""
    from pipelines.batch.manifest import write_part

    for start in range(0, len(keys), batch):
        write_part(fs, dest, synthetic_rows(keys[start:start + batch], attempt), attempt)
        if compactor is not None:
            with compaction:
                compactor.written(len(keys[start:start + batch]))


def bookkeeping(n: int, batch: int, compact: bool) -> dict:
    """Driver cost of a killed first attempt, its resume and finish at `n` inputs (see the module docstring)."""
    import pyarrow.fs as pafs
    import ray

    from pipelines.batch.job import Compactor
    from pipelines.batch.manifest import begin_attempt, done_identities, finish_attempt, read_parts
    from pipelines.batch.resume import DoneKeys
    from pipelines.batch.sources import NotDone

    ray.init(**RAY_ARGS)
    fs, keys = pafs.LocalFileSystem(), [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(n)]
    start, compaction, finish = Phase(), Phase(), Phase()
    with tempfile.TemporaryDirectory(prefix="coltran-scale-") as dest:
        fingerprint = {"sources": ["/data/shots.tar"], "seed": 0}
        begin_attempt(fs, dest, fingerprint)
        first = Compactor(fs, dest, 1) if compact else None
        write_attempt(fs, dest, keys[: n // 2], 1, batch, first, compaction)  # killed here: no finish
        parts_at_start = len(read_parts(fs, dest)[1])
        with start:
            attempt = begin_attempt(fs, dest, fingerprint)
            done = DoneKeys.from_identities(done_identities(read_parts(fs, dest)[0]))
            keep = NotDone("", done)
            todo = [k for k in keys if keep(k)]  # the reader's listing filter (on the driver for loose files)
        task_bytes = len(pickle.dumps(keep))  # what every reading and prepare task receives of the finished keys
        assert len(todo) == n - n // 2, "the resume must leave exactly the unfinished inputs"
        second = Compactor(fs, dest, attempt) if compact else None
        write_attempt(fs, dest, todo, attempt, batch, second, compaction)
        parts_at_finish = len(read_parts(fs, dest)[1])
        with finish:
            manifest = finish_attempt(fs, dest, attempt)
        assert manifest.num_rows == n and len(manifest.column("key").unique()) == n, "one row per input"
    ray.shutdown()
    return {"n": n, "compact": compact, "start_s": start.seconds, "compaction_s": compaction.seconds,
            "finish_s": finish.seconds, "driver_s": start.seconds + compaction.seconds + finish.seconds,
            "peak_mb": max(start.peak, compaction.peak, finish.peak) / 1e6, "parts_at_start": parts_at_start,
            "parts_at_finish": parts_at_finish, "task_bytes": task_bytes}


def run_bookkeeping(sizes: list[int], batch: int) -> list[dict]:
    """Each (N, compaction on/off) in a fresh process of its own; prints a table and the growth ratios."""
    results = []
    for compact in (True, False):
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps([n, batch, compact])], check=True,
                                 capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nmanifest and resume bookkeeping on the driver ({batch} inputs per write batch; killed at half, resumed)")
    print(f"{'inputs':>8} {'compact':>7} {'start s':>8} {'compact s':>9} {'finish s':>8} {'driver s':>8} "
          f"{'peak MB':>8} {'parts@start':>11} {'parts@finish':>12} {'task B':>7}")
    for r in results:
        print(f"{r['n']:>8} {'yes' if r['compact'] else 'no':>7} {r['start_s']:>8.3f} {r['compaction_s']:>9.3f} "
              f"{r['finish_s']:>8.3f} {r['driver_s']:>8.3f} {r['peak_mb']:>8.1f} {r['parts_at_start']:>11} "
              f"{r['parts_at_finish']:>12} {r['task_bytes']:>7}")
    for compact in (True, False):
        rows = {r["n"]: r for r in results if r["compact"] == compact}
        for small, large in zip(sizes, sizes[1:], strict=False):
            a, b = rows[small], rows[large]
            print(f"growth {small} -> {large} ({'compacted' if compact else 'baseline: no compaction'}): driver "
                  f"time x{b['driver_s'] / max(a['driver_s'], 1e-9):.1f}, finish x{b['finish_s'] / max(a['finish_s'], 1e-9):.1f}, "
                  f"peak memory x{b['peak_mb'] / max(a['peak_mb'], 1e-3):.1f} (inputs x{large / small:.0f}; "
                  f"target for compacted 10k -> 100k: <= x12)")
    return results


# --- object store bytes of the full-resolution path ------------------------------------------------------------------

def block_bytes(batch: dict[str, np.ndarray]) -> int:
    """Bytes a numpy batch carries: arrays' buffers, plus the payload of object columns (bytes, strings)."""
    total = 0
    for column in batch.values():
        if column.dtype != object:
            total += column.nbytes
        else:
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in column)
    return total


def _as_png(data: bytes) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def object_store_bytes(images: int, encoding: str) -> dict:
    """Per image bytes handed between the stages of the full-resolution path, on real photos (as JPEG files, or
    re-encoded as PNG like lossless scans) through the real prepare task and test-preset model actors."""
    import pyarrow.fs as pafs

    from coltran.init_models import init_models
    from pipelines.batch.job import resolve_stage_models, stage_actor_kwargs
    from pipelines.batch.resume import DoneKeys
    from pipelines.batch.settings import load_settings
    from pipelines.batch.tasks import JobContext, prepare_batch
    from pipelines.inference.columns import objects
    from pipelines.inference.stages import STAGE_ACTORS

    files = sorted(SAMPLE.glob("*.JPEG"))[:images]
    raw = [p.read_bytes() if encoding == "jpeg" else _as_png(p.read_bytes()) for p in files]
    with tempfile.TemporaryDirectory(prefix="coltran-scale-") as tmp:
        models = init_models(Path(tmp) / "models", "test")
        settings = load_settings(data={"sources": [str(SAMPLE)], "models": str(models), "out": f"{tmp}/out"})
        ctx = JobContext(fs=pafs.LocalFileSystem(), dest=f"{tmp}/out", attempt=1, seed=0, num_samples=1,
                         resolution="full", crop="full", format="png", jpeg_quality=95, max_pixels=64_000_000,
                         min_side=8, models={}, labels={}, done=DoneKeys())
        batch = prepare_batch({"key": objects([p.name for p in files]), "bytes": objects(raw),
                               "error": objects([None] * len(raw)), "source": objects([str(SAMPLE)] * len(raw))},
                              ctx=ctx)
        carried = sum(len(v) for v in batch["full_res"])
        kinds = sorted(set(batch["full_res_kind"]))
        decoded = int(np.sum(batch["height"].astype(np.int64) * batch["width"]))
        boundaries = {"prepare -> colorizer": block_bytes(batch)}
        resolved = resolve_stage_models(str(models))
        for stage, actor in STAGE_ACTORS.items():
            batch = actor(**stage_actor_kwargs(settings, stage, resolved, "cpu"))(batch)
            boundaries[f"{stage} -> {'write' if stage == 'spatial_upsampler' else 'next'}"] = block_bytes(batch)
    count = len(files)
    return {"images": count, "encoding": encoding, "kinds": kinds, "decoded_luma": decoded / count,
            "decoded_luma_chroma": 3 * decoded / count, "carried": carried / count,
            "original": sum(map(len, raw)) / count, "boundaries": {k: v / count for k, v in boundaries.items()}}


def run_object_store(images: int) -> list[dict]:
    results = []
    for encoding in ("jpeg", "png"):
        r = object_store_bytes(images, encoding)
        print(f"\nfull-resolution path, bytes per image through the object store: {r['images']} photos of the sample "
              f"as {encoding.upper()} files, 1 colouring each, test-preset models; full-resolution payload carried "
              f"as: {', '.join(r['kinds'])}")
        for name, size in r["boundaries"].items():
            print(f"  {name:<28} {size:>10,.0f} B  (full-resolution payload {r['carried']:>9,.0f} B)")
        worst, model = max(r["boundaries"].values()), sum(r["boundaries"].values()) - 4 * r["carried"]
        print(f"  decoded luma (H x W) {r['decoded_luma']:,.0f} B; decoded luma + chroma (3 x H x W) "
              f"{r['decoded_luma_chroma']:,.0f} B; the file {r['original']:,.0f} B")
        print(f"  largest hand-over {worst:,.0f} B = {worst / r['decoded_luma_chroma']:.2f} x decoded luma + chroma "
              f"(target <= 1)")
        print(f"  four hand-overs together: {sum(r['boundaries'].values()):,.0f} B; with the file always (earlier "
              f"design) {model + 4 * r['original']:,.0f} B; with the luma always {model + 4 * r['decoded_luma']:,.0f} B")
        results.append(r)
    return results


# --- preprocessing throughput: a tar of tars against a folder of the same images ------------------------------------

def build_tar_of_tars(path: Path, inner: int, per_inner: int) -> dict[str, bytes]:
    """An ImageNet-shaped ILSVRC2012_img_train.tar of `inner` class tars of `per_inner` small JPEGs made from the
    sample (the generator tests/test_preprocess_scale.py uses, without truncated members); returns key -> bytes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from corpus import build_tar_of_tars as build

    images, _ = build(path, sorted(SAMPLE.glob("*.JPEG")), inner, per_inner)
    return images


def write_folder(root: Path, images: dict[str, bytes]) -> None:
    """The same images as a folder tree <root>/<wnid>/<file> (class folders, the same keys)."""
    for key, data in images.items():
        target = root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def preprocess_once(source: Path, dest: Path, settings: dict) -> float:
    """Seconds of one run of the real preprocessing job (a fresh DEST), checked: rows + failures = inputs."""
    import shutil

    from pipelines.preprocess.job import PreprocessSettings, run_preprocess

    start = time.perf_counter()
    manifest = run_preprocess(PreprocessSettings(sources=[str(source)], dest=str(dest), **settings))
    seconds = time.perf_counter() - start
    stored = sum(s["images"] for s in manifest["splits"].values())
    assert stored + manifest["failures"]["count"] == manifest["inputs"], manifest
    assert manifest["failures"]["count"] == 0 and all(s["images"] > 0 for s in manifest["splits"].values())
    shutil.rmtree(dest)
    return seconds


def run_preprocess_throughput(inner_sizes: list[int], per_inner: int, repeats: int) -> list[dict]:
    """For each number of inner tars: the tar of tars and a folder of the same images, each through
    pipelines.preprocess on one local Ray (all of this machine's CPUs), alternated (the order swapped every repeat)
    after an untimed warm-up of both; the fastest of `repeats` runs of each. Work items have the same size on both
    sides (min_rows_per_file = images per inner tar: a folder item holds as many files as an inner tar)."""
    import ray

    cpus = os.cpu_count() or 1
    settings = {"heldout_fraction": 0.2, "train_crops": 1, "seed": 0, "min_rows_per_file": per_inner,
                "batch_size": min(16, per_inner)}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_DATA_LOG_LEVEL"] = "WARNING"  # Ray Data re-reads it whenever it reconfigures its logger
    os.environ.pop("RAY_ADDRESS", None)
    results = []
    with tempfile.TemporaryDirectory(prefix="coltran-scale-") as tmp:
        work = Path(tmp)
        inputs = {}
        for n in inner_sizes:
            tar = work / f"in{n}" / "ILSVRC2012_img_train.tar"
            tar.parent.mkdir()
            images = build_tar_of_tars(tar, n, per_inner)
            write_folder(work / f"in{n}" / "train", images)
            inputs[n] = {"tar": tar, "folder": work / f"in{n}" / "train", "images": len(images),
                         "tar_bytes": tar.stat().st_size}
        ray.init(**{**RAY_ARGS, "num_cpus": cpus})
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset progress lines between tables
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            smallest = inputs[min(inner_sizes)]
            for kind in ("tar", "folder"):  # warm-up: worker start-up and imports, not timed
                preprocess_once(smallest[kind], work / f"warm-{kind}", settings)
            runs = {(n, kind): [] for n in inner_sizes for kind in ("tar", "folder")}
            for r in range(repeats):
                for n in inner_sizes:
                    for kind in (("tar", "folder") if r % 2 == 0 else ("folder", "tar")):
                        runs[n, kind].append(preprocess_once(inputs[n][kind], work / f"out-{n}-{kind}-{r}", settings))
        finally:
            ray.shutdown()
    load = os.getloadavg()
    print(f"\npreprocessing throughput: ImageNet-shaped tar of tars (inner tars of {per_inner} small JPEGs, 40-63 x "
          f"32-48 px) vs a folder tree of the same images, pipelines.preprocess on a local Ray with {cpus} CPUs; "
          f"fastest of {repeats} alternating runs each; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'inner tars':>10} {'images':>7} {'tar s':>7} {'tar s/img':>9} {'tar img/s':>9} {'folder s':>8} "
          f"{'folder s/img':>12} {'folder img/s':>12} {'tar/folder':>10}")
    for n in inner_sizes:
        tar_s, folder_s, images = min(runs[n, "tar"]), min(runs[n, "folder"]), inputs[n]["images"]
        results.append({"inner": n, "images": images, "tar_bytes": inputs[n]["tar_bytes"], "tar_s": tar_s,
                        "folder_s": folder_s, "tar_runs": runs[n, "tar"], "folder_runs": runs[n, "folder"]})
        print(f"{n:>10} {images:>7} {tar_s:>7.2f} {tar_s / images:>9.4f} {images / tar_s:>9.1f} {folder_s:>8.2f} "
              f"{folder_s / images:>12.4f} {images / folder_s:>12.1f} {folder_s / tar_s:>9.2f}x")
    for small, large in zip(results, results[1:], strict=False):
        print(f"growth {small['inner']} -> {large['inner']} inner tars (images x{large['images'] / small['images']:.1f}):"
              f" tar time x{large['tar_s'] / small['tar_s']:.2f}, folder time x{large['folder_s'] / small['folder_s']:.2f}")
    for r in results:
        print(f"runs, s, {r['inner']} inner tars: tar " + " ".join(f"{t:.2f}" for t in r["tar_runs"]) + " | folder "
              + " ".join(f"{t:.2f}" for t in r["folder_runs"]))
    return results


SECTIONS = {"bookkeeping": lambda a: run_bookkeeping(a.sizes, a.write_batch),
            "object_store": lambda a: run_object_store(a.images),
            "preprocess": lambda a: run_preprocess_throughput(a.inner_tars, a.per_inner, a.repeats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--write-batch", type=int, default=8, help="inputs per write batch (the job's default)")
    parser.add_argument("--images", type=int, default=8, help="photos for the object-store measurement")
    parser.add_argument("--inner-tars", default="25,50,100", type=lambda s: [int(x) for x in s.split(",")],
                        help="sizes of the generated tar of tars, in inner tars (preprocess section)")
    parser.add_argument("--per-inner", type=int, default=4, help="small JPEGs per inner tar (preprocess section)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating timed runs of the tar and the folder per size (preprocess section)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, any of {', '.join(SECTIONS)}")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one bookkeeping run, JSON on stdout
    args = parser.parse_args(argv)
    if args.one:
        n, batch, compact = json.loads(args.one)
        print(json.dumps(bookkeeping(n, batch, compact)))
        return 0
    print(f"benchmarks/scale.py on {platform.node()} ({os.cpu_count()} CPUs), "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    names = args.sections.split(",")
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; sections are {', '.join(SECTIONS)}")
    for name in names:
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
