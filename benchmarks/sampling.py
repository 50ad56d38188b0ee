"""Colorizer sampling speed: eager and compiled steppers against one teacher-forced forward of the same batch.

Prints, per batch size of the `mid` preset (fp32): seconds of one teacher-forced forward; the eager and the
compiled sampler's seconds, images/s and ratio to that forward; the compiled sampler's first call in the process
for that batch shape ("1st call": compiling plus one run); and at batch 1 the sampler of `--baseline-rev` (the
stepper before issue 21), run in a child process on the same weights in the same run. Then the `full` preset, compiled, fp32 and bf16 autocast, seconds per image
(sampling `--full-rows` rows and extrapolating to the whole image when fewer than all). Each figure is the fastest
of `--repeats` runs; every ratio compares figures of this run.

    python benchmarks/sampling.py [--batches 1 8 32] [--full-batches 1 8] [--full-rows 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from coltran.configs import preset
from coltran.models import build_model
from coltran.sampling import cached as sampler
from coltran.sampling import make_uniforms, sample_colorizer

BASELINE_REV = "e4e826e"  # the last commit with the sampler issue 21 replaced
BASELINE_CHILD = """
import json, sys, time, torch
from coltran.configs import preset
from coltran.models import build_model
from coltran.sampling import sample_colorizer
state, batch, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
model = build_model(preset("colorizer", "mid")).eval()
model.load_state_dict(torch.load(state))
gray = torch.load(state + ".gray")[:batch]
sample_colorizer(model, gray[:1], seeds=[0])  # warm-up
times = []
for _ in range(repeats):
    start = time.perf_counter()
    sample_colorizer(model, gray, seeds=range(batch))
    times.append(time.perf_counter() - start)
print(json.dumps(min(times)))
"""


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def fastest(fn, device, repeats: int) -> float:
    return min(timed(fn, device) for _ in range(repeats))


def baseline_seconds(model, gray, batch: int, rev: str, repeats: int) -> float | None:
    """The sampler of git revision `rev` on the same weights and inputs, in a child process."""
    if not rev:
        return None
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev, "coltran"], capture_output=True)
        if archive.returncode != 0:
            print(f"baseline {rev} unavailable: {archive.stderr.decode().strip()}")
            return None
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        state = os.path.join(tmp, "state.pt")
        torch.save(model.state_dict(), state)
        torch.save(gray.cpu(), state + ".gray")
        env = {**os.environ, "PYTHONPATH": tmp}
        out = subprocess.run([sys.executable, "-c", BASELINE_CHILD, state, str(batch), str(repeats),
                              str(torch.get_num_threads())], env=env,
                             capture_output=True, text=True, cwd=tmp, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def bench_batch(model, gray, device, repeats: int) -> dict[str, float]:
    """Seconds of one teacher-forced forward, the compiled sampler's first call (compiling) and the fastest of
    `repeats` rounds that each time the forward, the compiled and the eager sampler in turn (a shared machine's
    load changes within seconds; interleaving exposes all three to it alike)."""
    colors3 = torch.randint(0, 8, (*gray.shape, 3), device=device)
    seeds = range(len(gray))
    runs = {
        "forward": partial(model, gray, colors3),
        "compiled": partial(sample_colorizer, model, gray, seeds=seeds, compile=True),
        "eager": partial(sample_colorizer, model, gray, seeds=seeds),
    }
    with torch.no_grad():
        model(gray, colors3)
        out = {"first": timed(runs["compiled"], device)}
        rounds = [{name: timed(fn, device) for name, fn in runs.items()} for _ in range(repeats)]
    return out | {name: min(r[name] for r in rounds) for name in runs}


def bench_mid(batches, device, repeats: int, baseline_rev: str | None) -> None:
    torch.manual_seed(0)
    model = build_model(preset("colorizer", "mid")).to(device).eval()
    gray_all = torch.randint(0, 256, (max(batches), 64, 64), device=device)
    print(f"{'batch':>5} {'forward s':>10} {'eager s':>8} {'img/s':>7} {'/fwd':>6} {'compiled s':>10} "
          f"{'img/s':>7} {'/fwd':>6} {'1st call s':>10} {'baseline s':>10} {'base/comp':>9}")
    for batch in batches:
        reps = repeats if batch <= 8 else 1
        t = bench_batch(model, gray_all[:batch], device, reps)
        base = baseline_seconds(model, gray_all[:batch], batch, baseline_rev, reps) if batch == 1 else None
        base_cols = ("-", "-") if base is None else (f"{base:.3f}", f"{base / t['compiled']:.2f}x")
        print(f"{batch:5d} {t['forward']:10.4f} {t['eager']:8.3f} {batch / t['eager']:7.2f} "
              f"{t['eager'] / t['forward']:6.2f} {t['compiled']:10.3f} {batch / t['compiled']:7.2f} "
              f"{t['compiled'] / t['forward']:6.2f} {t['first']:10.1f} {base_cols[0]:>10} {base_cols[1]:>9}",
              flush=True)


def sample_rows(model, gray, rows: int, compile: bool) -> None:
    """The first `rows` rows of a sample (all of it when rows == H), through the sampler's own loop."""
    z = model.encode(gray.long())
    uniforms = make_uniforms(range(len(gray)), 1, z.shape[1] * z.shape[2], gray.device)
    sampler.sample_rows(model, z, uniforms, "sample", 1.0, False, False, compile, rows)


def bench_full(batches, device, rows: int, repeats: int) -> None:
    torch.manual_seed(0)
    model = build_model(preset("colorizer", "full")).to(device).eval()
    scale = 64 / min(rows, 64)
    note = "" if rows >= 64 else f" (the first {rows} of 64 rows, times {scale:g})"
    print(f"full preset, compiled, seconds per image{note}:")
    print(f"{'batch':>5} {'dtype':>6} {'s/image':>8} {'1st call s':>10}")
    for dtype in ("fp32", "bf16"):
        for batch in batches:
            gray = torch.randint(0, 256, (batch, 64, 64), device=device)
            with torch.no_grad(), autocast(device, dtype):
                first = timed(partial(sample_rows, model, gray, rows, True), device)
                seconds = fastest(partial(sample_rows, model, gray, rows, True), device, repeats)
            print(f"{batch:5d} {dtype:>6} {seconds * scale / batch:8.2f} {first:10.1f}", flush=True)


def autocast(device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--full-batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--full-rows", type=int, default=64, help="rows of the full preset to time (then scale)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline sampler; '' skips")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}); mid preset, fp32")
    bench_mid(args.batches, device, args.repeats, args.baseline_rev)
    if args.full_batches:
        bench_full(args.full_batches, device, args.full_rows, max(1, args.repeats - 2))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
