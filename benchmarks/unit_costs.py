"""Costs that unit tests used to assert as wall-clock bounds (a timed unit test fails on a loaded machine and
proves nothing on an idle one), measured here against a baseline taken in the same run:

- one training step (forward + backward) of each stage's `test` preset at batch 1, against its forward alone;
- `coltran.transforms.prepare_example` on a 500x375 photo (centre crop, area resizes, TF-exact gray, 3-bit
  colours), against one Pillow resize of the same photo to 256x256, the least work any preprocessing does.

    python benchmarks/unit_costs.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from PIL import Image

from coltran import transforms as T
from coltran.configs import preset
from coltran.models import build_model


def best_of(fn, repeats: int) -> tuple[float, float]:
    """Fastest wall and CPU seconds of `repeats` calls after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def random_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for side in (64, 256):
        rgb = torch.randint(0, 256, (1, side, side, 3), generator=g, dtype=torch.uint8)
        batch[f"rgb_{side}"], batch[f"gray_{side}"] = rgb, torch.as_tensor(T.rgb_to_gray(rgb))
    return batch


def training_steps(repeats: int) -> None:
    print("stage              forward s   fwd+bwd s   fwd+bwd CPU s   ratio to forward")
    for stage in ("colorizer", "color_upsampler", "spatial_upsampler"):
        torch.manual_seed(0)
        model = build_model(preset(stage, "test")).train()
        batch = random_batch(1)

        def forward(model=model, batch=batch):
            with torch.no_grad():
                model.loss(batch)

        def step(model=model, batch=batch):
            model.zero_grad(set_to_none=True)
            model.loss(batch)[0].backward()

        fwd, _ = best_of(forward, repeats)
        both, cpu = best_of(step, repeats)
        print(f"{stage:<18} {fwd:>9.3f}   {both:>9.3f}   {cpu:>13.3f}   {both / fwd:>16.2f}x")


def prepare_example(repeats: int) -> None:
    img = np.random.default_rng(6).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    pil = Image.fromarray(img)
    base, _ = best_of(lambda: pil.resize((256, 256), Image.Resampling.BOX), repeats)
    ours, _ = best_of(lambda: T.prepare_example(img), repeats)
    print(f"prepare_example 500x375: {ours * 1e3:.2f} ms; one Pillow resize to 256: {base * 1e3:.2f} ms; "
          f"ratio {ours / base:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"best of {args.repeats}")
    training_steps(args.repeats)
    prepare_example(args.repeats)


if __name__ == "__main__":
    main()
