"""The model stages of the batch colorization and evaluation jobs as Ray Data actors: one class per stage wrapping
the matching ColTranPipeline step, each loading only its own checkpoint, once. The CPU tasks around them (decode +
prepare, restore + encode + write) are in pipelines/batch/tasks.py."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch

from coltran.pipeline import ColTranPipeline


class StageActor:
    """Base of the per-stage actors: load `checkpoint` (a directory or models:/<name>/<version>) once."""

    STAGE: ClassVar[str] = ""

    def __init__(self, checkpoint: str, device: str, weights: str, num_threads: int, micro_batch: int,
                 step_kwargs: dict[str, Any] | None = None, tracking_uri: str | None = None,
                 compile_sampler: bool = False):
        if device == "cpu":
            torch.set_num_threads(num_threads)
        if checkpoint.startswith("models:/"):
            from pipelines.tracking.registry import resolve_models

            checkpoint = str(resolve_models(checkpoint, tracking_uri=tracking_uri))
        self.pipe = ColTranPipeline.for_stage(self.STAGE, checkpoint, device=device, weights=weights,
                                              upsampler_batch_size=micro_batch, compile_sampler=compile_sampler)
        if self.STAGE == "colorizer":
            self.pipe.warm_up_sampler()  # compiles now (when asked to), not inside the first batch
        self.step_kwargs = step_kwargs or {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.run(batch) if len(batch["key"]) else self.empty(batch)
        out[f"{self.STAGE}_s"] = np.full(len(batch["key"]), (time.perf_counter() - start) / max(1, len(batch["key"])))
        return out


class ColorizerActor(StageActor):
    STAGE = "colorizer"

    def run(self, batch):
        num_samples = self.step_kwargs["num_samples"]
        colors3 = self.pipe.colorize(batch["gray_64"], batch["seed"].tolist(), **self.step_kwargs)
        return {**batch, "colors3": colors3.reshape(len(batch["key"]), num_samples, 64, 64, 3)}  # image-major

    def empty(self, batch):
        return {**batch, "colors3": np.zeros((0, self.step_kwargs["num_samples"], 64, 64, 3), np.uint8)}


class ColorUpsamplerActor(StageActor):
    STAGE = "color_upsampler"

    def run(self, batch):
        count, num_samples = batch["colors3"].shape[:2]
        gray = np.repeat(batch["gray_64"], num_samples, axis=0)  # (B * S, 64, 64), image-major like colors3
        rgb = self.pipe.upsample_colors(gray, batch["colors3"].reshape(-1, 64, 64, 3))
        return {**_without(batch, "colors3", "gray_64"), "rgb_64": rgb.reshape(count, num_samples, 64, 64, 3)}

    def empty(self, batch):
        shape = (0, batch["colors3"].shape[1], 64, 64, 3)
        return {**_without(batch, "colors3", "gray_64"), "rgb_64": np.zeros(shape, np.uint8)}


class SpatialUpsamplerActor(StageActor):
    STAGE = "spatial_upsampler"

    def run(self, batch):
        count, num_samples = batch["rgb_64"].shape[:2]
        gray = np.repeat(batch["gray_256"], num_samples, axis=0)  # (B * S, 256, 256)
        rgb = self.pipe.upsample_spatial(gray, batch["rgb_64"].reshape(-1, 64, 64, 3))
        return {**_without(batch, "rgb_64", "gray_256"), "rgb_256": rgb.reshape(count, num_samples, 256, 256, 3)}

    def empty(self, batch):
        shape = (0, batch["rgb_64"].shape[1], 256, 256, 3)
        return {**_without(batch, "rgb_64", "gray_256"), "rgb_256": np.zeros(shape, np.uint8)}


STAGE_ACTORS = {cls.STAGE: cls for cls in (ColorizerActor, ColorUpsamplerActor, SpatialUpsamplerActor)}


def _without(batch: dict[str, np.ndarray], *names: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items() if k not in names}
