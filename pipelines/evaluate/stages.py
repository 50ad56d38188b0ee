"""Ray Data actors of the evaluation job besides the batch job's colorization stages: held-out bits/dim of the
three stages (teacher-forced, EMA weights, all channels) and the Inception stage (FID features of the samples,
grayscale inputs and ground truth, colourfulness, content digests and the report's image-grid strips)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from coltran.checkpoint import load_checkpoint
from coltran.configs import STAGE_NAMES
from coltran.imageio import encode_image
from coltran.metrics import InceptionFeatures, colourfulness
from coltran.pipeline import to_tensor
from coltran.transforms import rgb_to_gray
from pipelines.inference.columns import objects

IMAGE_COLUMNS = ("gray_64", "gray_256", "rgb_64", "rgb_256", "truth_256", "colors3")


def _local_checkpoint(ref: str, tracking_uri: str | None) -> str:
    if ref.startswith("models:/"):
        from pipelines.tracking.registry import resolve_models

        return str(resolve_models(ref, tracking_uri=tracking_uri))
    return ref


class BitsPerDimActor:
    """Held-out bits/dim of every stage per image (model.loss with random_channel=False: all channels)."""

    def __init__(self, checkpoints: dict[str, str], device: str, weights: str, num_threads: int,
                 tracking_uri: str | None = None):
        if device == "cpu":
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.models = {stage: load_checkpoint(_local_checkpoint(checkpoints[stage], tracking_uri), weights=weights, stage=stage,
                                              device=self.device).model for stage in STAGE_NAMES}

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = {stage: np.zeros(len(batch["key"])) for stage in STAGE_NAMES}
        for i in range(len(batch["key"])):  # one image at a time: the spatial upsampler's logits are ~200 MB
            row = {name: to_tensor(batch[src][i:i + 1], self.device) for name, src in (
                ("gray_64", "gray_64"), ("rgb_64", "rgb_64"), ("gray_256", "gray_256"), ("rgb_256", "truth_256"))}
            for stage, model in self.models.items():
                values[stage][i] = float(model.loss(row, random_channel=False)[1]["loss"])
        return {**batch, **{f"bpd_{stage}": v for stage, v in values.items()}}


def grid_strip(gray: np.ndarray, samples: np.ndarray, truth: np.ndarray) -> bytes:
    """PNG of one image's column in the report grid: gray input, each sample, ground truth, top to bottom."""
    parts = [np.repeat(gray[..., None], 3, axis=-1), *samples, truth]
    return encode_image(np.concatenate(parts, axis=0), "png")


class InceptionActor:
    """Pool3 features (float32) and colourfulness of evaluation rows after colorization (`role='eval'`), or of
    reference rows (`role='reference'`: ground truth only). Image columns are dropped from the output."""

    def __init__(self, device: str, batch_size: int, num_threads: int, role: str,
                 grid_keys: frozenset[str] = frozenset()):
        if role not in ("eval", "reference"):
            raise ValueError(f"role must be 'eval' or 'reference', got {role!r}")
        if device == "cpu":
            torch.set_num_threads(num_threads)
        self.features = InceptionFeatures(device=device, batch_size=batch_size)
        self.role, self.grid_keys = role, grid_keys

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        truth = batch["truth_256"]
        out: dict[str, Any] = {k: v for k, v in batch.items() if k not in IMAGE_COLUMNS}
        out["digest"] = objects([hashlib.sha1(np.ascontiguousarray(t).tobytes()).hexdigest() for t in truth])
        out["feat_truth"] = self.features(truth).astype(np.float32)
        if self.role == "reference":
            return out
        samples = batch["rgb_256"]  # (B, S, 256, 256, 3)
        count, num_samples = samples.shape[:2]
        gray = rgb_to_gray(truth)  # = the model's gray_256 input (prepare_example: gray of rgb_256)
        out["feat_gray"] = self.features(gray).astype(np.float32)
        flat = samples.reshape(count * num_samples, *samples.shape[2:])  # (B * S, 256, 256, 3), image-major
        out["feat_samples"] = self.features(flat).astype(np.float32).reshape(count, num_samples, -1)
        out["colourfulness_samples"] = colourfulness(flat).reshape(count, num_samples) if count else \
            np.zeros((0, num_samples))
        out["colourfulness_truth"] = colourfulness(truth) if count else np.zeros(0)
        out["grid_png"] = objects([grid_strip(gray[i], samples[i], truth[i]) if str(batch["key"][i]) in self.grid_keys
                                   else b"" for i in range(count)])
        return out
