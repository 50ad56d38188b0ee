"""Axial attention kernels on this device: `scaled_dot_product_attention` with ColTran's additive bias passed as a
3-D (h, L, L) mask, which the CPU serves with its math kernel, against the 4-D (1, h, L, L) mask that
`coltran.nn.AxialAttention` passes, which lets the CPU use its fused flash kernel; plus the spatial upsampler's
argmax prediction at 256x256, the stage that dominates batch and serve cost on a CPU, against the same argmax taken
after each channel's whole logits tensor. Each pair in the same run.

    python benchmarks/attention.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from coltran.configs import preset
from coltran.models import build_model


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def attention_seconds(mask_dims: int, batch: int, heads: int, length: int, head_size: int, repeats: int) -> float:
    q, k, v = (torch.randn(batch, heads, length, head_size) for _ in range(3))
    bias = torch.randn(heads, length, length)
    mask = bias if mask_dims == 3 else bias[None]
    with torch.no_grad():
        return best_of(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the batch job's actors use 1)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); best of {args.repeats}")
    # one row (or column) attention of the spatial upsampler over a 256x256 image: 256 sequences of 256 per channel
    for name, shape in {"spatial test (h=1, C=32)": (768, 1, 256, 32),
                        "spatial full (h=4, C=128)": (256, 4, 256, 128)}.items():
        math, flash = (attention_seconds(dims, *shape, args.repeats) for dims in (3, 4))
        print(f"{name:<28} 3-D mask {math * 1e3:8.1f} ms   4-D mask {flash * 1e3:8.1f} ms   {math / flash:5.2f}x")
    model = build_model(preset("spatial_upsampler", "test")).eval()
    gray = torch.randint(0, 255, (1, 256, 256))
    colors = torch.randint(0, 256, (1, 256, 256, 3))
    seconds = best_of(lambda: model.predict(gray, colors), args.repeats)
    whole = best_of(lambda: whole_logits_argmax(model, gray, colors), args.repeats)
    print(f"spatial upsampler `test` predict, 1 image, 3 channels at 256x256: {seconds:.3f} s; with each "
          f"channel's whole logits tensor before the argmax {whole:.3f} s ({whole / seconds:.2f}x)")


@torch.no_grad()
def whole_logits_argmax(model, gray, colors):
    """The argmax prediction as the model's forward gives it: all of a channel's logits first (the baseline of
    the sliced final dense + argmax in `predict`)."""
    for c in range(colors.shape[-1]):
        model.channel_logits(gray, colors, c).argmax(-1)


if __name__ == "__main__":
    main()
