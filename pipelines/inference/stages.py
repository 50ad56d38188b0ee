"""The stages of the batch colorization job as Ray Data batch functions: decode + prepare (CPU tasks), one actor
class per model stage wrapping the matching ColTranPipeline step (each loads only its own checkpoint, once), and
restore + encode + write (CPU tasks). Items that fail are recorded in manifest parts, never raised."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow.fs as pafs
import torch

from coltran.imageio import ImageDecodeError, decode_image, encode_image
from coltran.inputs import prepare_image
from coltran.pipeline import ColTranPipeline
from pipelines.batch.manifest import identity, now, write_part
from pipelines.batch.outputs import image_seed, output_relpath, put_bytes
from pipelines.io.sources import split_error

GRAY_SHAPES = {"gray_64": (64, 64), "gray_256": (256, 256)}


@dataclass(frozen=True)
class JobContext:
    """What the CPU stages need to know about the run (picklable; travels in fn_kwargs)."""

    fs: pafs.FileSystem
    dest: str
    attempt: int
    seed: int
    num_samples: int
    resolution: str
    crop: str
    format: str
    jpeg_quality: int
    max_pixels: int
    min_side: int
    models: dict[str, str]  # stage -> model label for the manifest
    labels: dict[str, str]  # source -> key prefix ("" for a single source)
    done: frozenset[str]  # identities finished by earlier attempts (see batch_manifest.identities)

    def key(self, source: str, key: str) -> str:
        label = self.labels.get(source, "")
        return f"{label}/{key}" if label else key

    def record(self, key: str, source: str, status: str, stage: str, reason: str | None = None,
               message: str | None = None, **extra) -> dict[str, Any]:
        """A manifest row (batch_manifest.MANIFEST_SCHEMA) for one input."""
        return {"key": key, "source": source, "status": status, "stage": stage, "reason": reason,
                "message": message, "num_samples": self.num_samples, "resolution": self.resolution,
                "finished_at": now(), **{f"{s}_model": m for s, m in self.models.items()}, **extra}

    def failure(self, key: str, source: str, stage: str, reason: str, message: str, **extra) -> dict[str, Any]:
        return self.record(key, source, "failed", stage, reason, message, **extra)


def objects(values: list) -> np.ndarray:
    """A 1-d object array (numpy would turn equal-length sequences into a 2-d array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _columns(rows: list[dict[str, Any]], with_bytes: bool) -> dict[str, np.ndarray]:
    """Prepared rows -> a numpy batch (fixed column set, also when empty)."""
    out = {name: objects([r[name] for r in rows]) for name in ("key", "source", "resolution")}
    out["seed"] = np.array([r["seed"] for r in rows], np.int64)
    out["height"] = np.array([r["height"] for r in rows], np.int32)
    out["width"] = np.array([r["width"] for r in rows], np.int32)
    out["was_grayscale"] = np.array([r["was_grayscale"] for r in rows], bool)
    out["prepare_s"] = np.array([r["prepare_s"] for r in rows], np.float64)
    for name, shape in GRAY_SHAPES.items():
        out[name] = np.stack([r[name] for r in rows]) if rows else np.zeros((0, *shape), np.uint8)
    if with_bytes:
        out["bytes"] = objects([r["bytes"] for r in rows])
    return out


def prepare_batch(batch: dict[str, np.ndarray], *, ctx: JobContext) -> dict[str, np.ndarray]:
    """Source rows {key, bytes, error, source} -> prepared rows; unusable inputs become failed manifest rows."""
    rows, failures = [], []
    for raw_key, data, error, source in zip(batch["key"], batch["bytes"], batch["error"], batch["source"],
                                            strict=True):
        key, start = ctx.key(source, raw_key), time.perf_counter()
        if error is not None:
            reason, message = split_error(error)
            if identity(key, reason) not in ctx.done:
                failures.append(ctx.failure(key, source, "read", reason, message))
            continue
        if key in ctx.done:
            continue
        try:
            decoded = decode_image(data, max_pixels=ctx.max_pixels, min_side=ctx.min_side)
            prepared = prepare_image(decoded.rgb, ctx.crop)
        except ImageDecodeError as err:
            failures.append(ctx.failure(key, source, "decode", err.reason, str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - one bad item never stops the job
            failures.append(ctx.failure(key, source, "decode", "prepare_error", f"{type(err).__name__}: {err}"))
            continue
        height, width = prepared.size
        rows.append({"key": key, "source": source, "resolution": ctx.resolution, "seed": image_seed(ctx.seed, raw_key),
                     "height": height, "width": width, "was_grayscale": decoded.was_grayscale,
                     "gray_64": prepared.gray_64, "gray_256": prepared.gray_256, "bytes": data,
                     "prepare_s": time.perf_counter() - start})
    if failures:
        write_part(ctx.fs, ctx.dest, failures, ctx.attempt)
    return _columns(rows, with_bytes=ctx.resolution == "full")


class StageActor:
    """Base of the per-stage actors: load `checkpoint` (a directory or models:/<name>/<version>) once."""

    STAGE: ClassVar[str] = ""

    def __init__(self, checkpoint: str, device: str, weights: str, num_threads: int, micro_batch: int,
                 step_kwargs: dict[str, Any] | None = None, tracking_uri: str | None = None):
        if device == "cpu":
            torch.set_num_threads(num_threads)
        if checkpoint.startswith("models:/"):
            from pipelines.tracking.registry import resolve_models

            checkpoint = str(resolve_models(checkpoint, tracking_uri=tracking_uri))
        self.pipe = ColTranPipeline.for_stage(self.STAGE, checkpoint, device=device, weights=weights,
                                              upsampler_batch_size=micro_batch)
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


def _finished_images(ctx: JobContext, row: dict[str, Any], rgb_256: np.ndarray) -> list[np.ndarray]:
    """Step 5 (restore) at full resolution from the input bytes, else the 256x256 colourings as they are."""
    if row["resolution"] != "full" or not row.get("bytes"):
        return list(rgb_256)
    prepared = prepare_image(decode_image(row["bytes"], max_pixels=ctx.max_pixels, min_side=ctx.min_side).rgb,
                             ctx.crop)
    return [ColTranPipeline.restore(prepared, rgb) for rgb in rgb_256]


def write_batch(batch: dict[str, np.ndarray], *, ctx: JobContext) -> dict[str, np.ndarray]:
    """Restore, encode and write every colouring; one manifest part for the batch. Returns key/status rows."""
    records = []
    for i in range(len(batch["key"])):
        row = {k: v[i] for k, v in batch.items() if k != "rgb_256"}
        start = time.perf_counter()
        base = {"seed": int(row["seed"]), "height": int(row["height"]), "width": int(row["width"]),
                "was_grayscale": bool(row["was_grayscale"]), "resolution": str(row["resolution"]),
                **{name: float(row[name]) for name in ("prepare_s", "colorizer_s", "color_upsampler_s",
                                                      "spatial_upsampler_s")}}
        try:
            images, outputs = _finished_images(ctx, row, batch["rgb_256"][i]), []
            for s, image in enumerate(images):
                outputs.append(output_relpath(row["key"], s, ctx.format))
                put_bytes(ctx.fs, ctx.dest, outputs[-1], encode_image(image, ctx.format, ctx.jpeg_quality))
        except Exception as err:  # noqa: BLE001 - a write error fails this item, not the job
            records.append(ctx.failure(row["key"], row["source"], "write", "write_error",
                                       f"{type(err).__name__}: {err}", **base, write_s=time.perf_counter() - start))
            continue
        records.append(ctx.record(row["key"], row["source"], "done", "done", **base, outputs=outputs,
                                  out_height=images[0].shape[0], out_width=images[0].shape[1],
                                  write_s=time.perf_counter() - start))
    if records:
        write_part(ctx.fs, ctx.dest, records, ctx.attempt)
    return {"key": objects([r["key"] for r in records]), "status": objects([r["status"] for r in records])}
