"""Colorizer sampling speed: the cached sampler against the naive oracle and a teacher-forced forward.

Prints, per batch size: images/s of the cached sampler; images/s of the naive sampler (timed on a prefix of
pixels and extrapolated to 4096, which is stated in the table); their ratio; and sampling time divided by one
teacher-forced forward pass of the same batch. On CPU the `mid` preset in fp32; on CUDA the `full` preset in bf16.

    python benchmarks/sampling.py [--preset mid] [--batches 1 8 32] [--naive-pixels 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time

import torch

from coltran.configs import preset
from coltran.models import build_model
from coltran.sampling import make_uniforms, naive_sample_colorizer, sample_colorizer


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_batch(model, batch: int, device, naive_pixels: int) -> tuple[float, float, float]:
    """Seconds for: the cached sampler, the naive sampler (extrapolated to 4096 pixels), one forward pass."""
    pixels = 64 * 64
    gray = torch.randint(0, 256, (batch, 64, 64), device=device)
    sample_colorizer(model, gray[:1], mode="sample")  # warm-up
    t_cached = timed(lambda: sample_colorizer(model, gray, mode="sample", seeds=range(batch)), device)
    colors3 = torch.randint(0, 8, (batch, 64, 64, 3), device=device)
    model(gray, colors3)
    t_forward = min(timed(lambda: model(gray, colors3), device) for _ in range(3))
    uniforms = make_uniforms(range(batch), 1, pixels, device)
    t_naive = timed(lambda: naive_sample_colorizer(model, gray, uniforms, num_pixels=naive_pixels), device)
    return t_cached, t_naive * pixels / naive_pixels, t_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="default: mid on CPU, full on CUDA")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--naive-pixels", type=int, default=64, help="pixels the naive sampler is timed on")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.preset or ("full" if device.type == "cuda" else "mid")
    batches = args.batches or ([8, 64, 256] if device.type == "cuda" else [1, 8, 32])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    torch.manual_seed(0)
    model = build_model(preset("colorizer", size)).to(device).eval()
    pixels = 64 * 64
    print(f"device={device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}), preset={size}, dtype={'bf16' if device.type == 'cuda' else 'fp32'}")
    print(f"{'batch':>5} {'cached img/s':>13} {'naive img/s*':>13} {'cached/naive':>13} "
          f"{'forward s':>10} {'sample/forward':>15}")
    n_pix = min(args.naive_pixels, pixels)
    with torch.no_grad(), autocast:
        for batch in batches:
            t_cached, t_naive, t_forward = bench_batch(model, batch, device, n_pix)
            print(f"{batch:5d} {batch / t_cached:13.3f} {batch / t_naive:13.5f} {t_naive / t_cached:13.1f} "
                  f"{t_forward:10.3f} {t_cached / t_forward:15.2f}")
    print(f"* naive timed on the first {n_pix} of {pixels} pixels and extrapolated linearly")


if __name__ == "__main__":
    main()
