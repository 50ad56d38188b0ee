"""The three model stages as Ray Serve deployments: Colorizer (batched with @serve.batch) and the two
upsamplers (ColorUpsampler, SpatialUpsampler), each loading only its own checkpoint in its replica and calling
the matching `ColTranPipeline` step (steps 2, 3 and 4)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray import serve

from coltran.configs import STAGE_NAMES
from coltran.pipeline import ColTranPipeline

UPSAMPLER_AUTO_BATCH = {True: 4, False: 1}  # on a GPU?: max_batch_size when the app's args leave it out
UPSAMPLER_STEPS = {"color_upsampler": "upsample_colors", "spatial_upsampler": "upsample_spatial"}
# A stopping replica (Ctrl-C, SIGTERM, a redeploy) sleeps this long, then checks for requests in flight, until none
# are left (at most Serve's graceful_shutdown_timeout_s, 20 s): Serve's default 2 s made `coltran serve` take
# 7 s to stop when idle, one loop per tier of deployments.
DRAIN_CHECK_S = 0.25


def stage_checkpoint_dir(models: str | dict, stage: str, tracking_uri: str | None = None) -> Path:
    """Local checkpoint directory of `stage` from the app's `models` setting:
    - a models directory DIR (uses DIR/<stage>), or `models:/@<alias>` (the registered set at that alias);
    - a dict stage -> a checkpoint directory or `models:/<name>@<alias>` / `models:/<name>/<version>`."""
    if stage not in STAGE_NAMES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGE_NAMES}")
    spec = str(models[stage] if isinstance(models, dict) else models)
    if spec.startswith("models:/"):
        from pipelines.tracking.names import REGISTERED_NAMES
        from pipelines.tracking.registry import resolve_models  # MLflow only where a registry is named

        if spec.startswith("models:/@"):  # the whole registered set: this stage's own name at that alias
            spec = f"models:/{REGISTERED_NAMES[stage]}{spec.removeprefix('models:/')}"
        return resolve_models(spec, tracking_uri=tracking_uri)
    path = Path(spec).expanduser()
    return path if isinstance(models, dict) else path / stage


@dataclass
class ColorizeCall:
    gray_64: np.ndarray  # (64, 64) uint8
    seed: int
    num_samples: int
    temperature: float
    mode: str


def run_colorize_calls(steps: ColTranPipeline, calls: list[ColorizeCall]) -> list[np.ndarray]:
    """One colorizer pass per group of calls sharing (num_samples, temperature, mode): (S, 64, 64, 3) each.

    Every image draws from its own seeded stream, so an image's colouring does not depend on its batch."""
    results: list[np.ndarray | None] = [None] * len(calls)
    groups: dict[tuple, list[int]] = {}
    for k, call in enumerate(calls):
        groups.setdefault((call.num_samples, call.temperature, call.mode), []).append(k)
    for (num_samples, temperature, mode), members in groups.items():
        gray = np.stack([calls[k].gray_64 for k in members])  # (B, 64, 64)
        colors = steps.colorize(gray, [calls[k].seed for k in members], num_samples, temperature, mode)
        colors = colors.reshape(len(members), num_samples, *colors.shape[1:])  # (B, S, 64, 64, 3), image-major
        for j, k in enumerate(members):
            results[k] = colors[j]
    return results


@serve.deployment(name="Colorizer", max_ongoing_requests=32, max_queued_requests=64,
                  graceful_shutdown_wait_loop_s=DRAIN_CHECK_S, ray_actor_options={"num_cpus": 0.25})
class Colorizer:
    """Step 2. Concurrent requests are gathered into one sampling pass (the autoregressive loop costs nearly
    the same for 1 or 16 images on a GPU, and its per-pixel overhead dominates on a CPU)."""

    def __init__(self, models: str | dict, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05,
                 device: str | None = None, tracking_uri: str | None = None, compile_sampler: bool = False):
        self.steps = ColTranPipeline.for_stage("colorizer", stage_checkpoint_dir(models, "colorizer", tracking_uri),
                                                device=device, compile_sampler=compile_sampler)
        self.steps.warm_up_sampler()  # compiles here, before the replica takes requests
        self.colorize_batch.set_max_batch_size(int(max_batch_size))
        self.colorize_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.max_batch_size = int(max_batch_size)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self.batch_seconds: deque[float] = deque(maxlen=10_000)
        self.cancelled = 0

    async def colorize(self, gray_64: np.ndarray, seed: int, num_samples: int, temperature: float,
                       mode: str) -> np.ndarray:
        """gray (64, 64) uint8 -> 3-bit colours (num_samples, 64, 64, 3) uint8. A call cancelled by its caller
        (time budget, client gone) while waiting for its batch is left out of the batch."""
        try:
            return await self.colorize_batch(ColorizeCall(np.asarray(gray_64), int(seed), int(num_samples),
                                                          float(temperature), str(mode)))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def colorize_batch(self, calls: list[ColorizeCall]) -> list[np.ndarray]:
        self.batch_sizes.append(len(calls))
        start = time.perf_counter()
        try:  # in a thread, so the replica still answers stats/info calls during a long pass
            return await asyncio.to_thread(run_colorize_calls, self.steps, calls)
        finally:
            self.batch_seconds.append(time.perf_counter() - start)

    def stats(self) -> dict:
        """This replica's batching record: the number of requests in each sampling pass, oldest first."""
        return {"max_batch_size": self.max_batch_size, "batch_sizes": list(self.batch_sizes),
                "batch_seconds": [round(s, 4) for s in self.batch_seconds], "cancelled": self.cancelled}

    def reset_stats(self) -> None:
        self.batch_sizes.clear()
        self.batch_seconds.clear()
        self.cancelled = 0

    def info(self) -> dict:
        return self.steps.model_info


@serve.deployment(max_ongoing_requests=16, max_queued_requests=64, graceful_shutdown_wait_loop_s=DRAIN_CHECK_S,
                  ray_actor_options={"num_cpus": 0.25})
class Upsampler:
    """Step 3 (deployed as ColorUpsampler) or step 4 (SpatialUpsampler): parallel argmax prediction, with
    concurrent requests gathered into one call (on a GPU; on a CPU batching costs more than it saves, so the
    default there is one request at a time)."""

    def __init__(self, stage: str, models: str | dict, max_batch_size: int | None = None,
                 batch_wait_timeout_s: float = 0.01, device: str | None = None, tracking_uri: str | None = None):
        if stage not in UPSAMPLER_STEPS:
            raise ValueError(f"Upsampler stage must be one of {sorted(UPSAMPLER_STEPS)}, got {stage!r}")
        self.steps = ColTranPipeline.for_stage(stage, stage_checkpoint_dir(models, stage, tracking_uri),
                                               device=device)
        if max_batch_size is None:  # auto: the device this replica got decides
            max_batch_size = UPSAMPLER_AUTO_BATCH[self.steps.device.type == "cuda"]
        self.max_batch_size = self.steps.upsampler_batch_size = int(max_batch_size)
        self.step = getattr(self.steps, UPSAMPLER_STEPS[stage])
        self.upsample_batch.set_max_batch_size(self.max_batch_size)
        self.upsample_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.batch_sizes: deque[int] = deque(maxlen=10_000)

    async def upsample(self, gray: np.ndarray, colors: np.ndarray) -> np.ndarray:
        """One image's gray (H, W) and its samples' colours (S, h, w, 3) -> (S, H', W', 3) uint8."""
        return await self.upsample_batch((np.asarray(gray), np.asarray(colors)))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def upsample_batch(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        self.batch_sizes.append(len(items))
        counts = [len(colors) for _, colors in items]
        gray = np.concatenate([np.repeat(g[None], n, axis=0) for (g, _), n in zip(items, counts, strict=True)])
        out = self.step(gray, np.concatenate([colors for _, colors in items]))  # (sum S, H', W', 3)
        return np.split(out, np.cumsum(counts)[:-1])

    def stats(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "batch_sizes": list(self.batch_sizes)}

    def info(self) -> dict:
        return {stage: {**info, "max_batch_size": self.max_batch_size}
                for stage, info in self.steps.model_info.items()}
