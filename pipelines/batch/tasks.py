"""The CPU tasks of the batch colorization job: decode + prepare, and restore + encode + write (the model stages
between them are the actor pools of pipelines.inference.stages). Items that fail are recorded in manifest parts,
never raised.

Full resolution at the least cost in the object store: the write needs only the input's luma at its own size, so
prepare passes on whichever is smaller (column `full_res`, kind in `full_res_kind`): the input's 8-bit luma plane
(H x W bytes: PNG, TIFF and BMP scans, whose files are larger) or its encoded file when that is smaller (JPEG,
WebP), decoded again by the write. Either way a hand-over carries at most H x W bytes of it, never more than the
decoded luma. Quantising the luma to 8 bits costs at most half a grey level beside the rounding of the output's
RGB (docs/batch.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from coltran.chroma import luma, transfer_chroma
from coltran.imageio import ImageDecodeError, decode_image, encode_image
from coltran.inputs import prepare_image
from pipelines.batch.manifest import identity, now, write_part
from pipelines.batch.outputs import image_seed, output_relpath, put_bytes
from pipelines.batch.resume import DoneKeys
from pipelines.inference.columns import GRAY_SHAPES, objects
from pipelines.io.sources import split_error


@dataclass(frozen=True)
class JobContext:
    """What the CPU stages need to know about the run (picklable; travels in fn_kwargs: small, whatever N is)."""

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
    done: DoneKeys  # identities finished by earlier attempts: an object-store reference, not a set

    def key(self, source: str, key: str) -> str:
        label = self.labels.get(source, "")
        return f"{label}/{key}" if label else key

    def record(self, key: str, source: str, status: str, stage: str, reason: str | None = None,
               message: str | None = None, **extra) -> dict[str, Any]:
        """A manifest row (manifest.MANIFEST_SCHEMA) for one input."""
        return {"key": key, "source": source, "status": status, "stage": stage, "reason": reason,
                "message": message, "num_samples": self.num_samples, "resolution": self.resolution,
                "finished_at": now(), **{f"{s}_model": m for s, m in self.models.items()}, **extra}

    def failure(self, key: str, source: str, stage: str, reason: str, message: str, **extra) -> dict[str, Any]:
        return self.record(key, source, "failed", stage, reason, message, **extra)


def luma_bytes(rgb: np.ndarray) -> bytes:
    """The 8-bit luma plane (H * W bytes, row-major) that a full-resolution output keeps."""
    return np.clip(np.rint(luma(rgb)), 0, 255).astype(np.uint8).tobytes()


def full_res_payload(data: bytes, luma_source: np.ndarray) -> tuple[bytes, str]:
    """(payload, kind) the write restores from: the encoded file if it is smaller than the luma plane, else that."""
    height, width = luma_source.shape[:2]
    return (data, "file") if len(data) < height * width else (luma_bytes(luma_source), "luma")


def _columns(rows: list[dict[str, Any]], with_luma: bool) -> dict[str, np.ndarray]:
    """Prepared rows -> a numpy batch (fixed column set, also when empty)."""
    out = {name: objects([r[name] for r in rows]) for name in ("key", "source", "resolution")}
    out["seed"] = np.array([r["seed"] for r in rows], np.int64)
    out["height"] = np.array([r["height"] for r in rows], np.int32)
    out["width"] = np.array([r["width"] for r in rows], np.int32)
    out["was_grayscale"] = np.array([r["was_grayscale"] for r in rows], bool)
    out["prepare_s"] = np.array([r["prepare_s"] for r in rows], np.float64)
    for name, shape in GRAY_SHAPES.items():
        out[name] = np.stack([r[name] for r in rows]) if rows else np.zeros((0, *shape), np.uint8)
    if with_luma:
        out["full_res"] = objects([r["full_res"][0] for r in rows])
        out["full_res_kind"] = objects([r["full_res"][1] for r in rows])
    return out


def prepare_batch(batch: dict[str, np.ndarray], *, ctx: JobContext) -> dict[str, np.ndarray]:
    """Source rows {key, bytes, error, source} -> prepared rows; unusable inputs become failed manifest rows."""
    rows, failures, full = [], [], ctx.resolution == "full"
    for raw_key, data, error, source in zip(batch["key"], batch["bytes"], batch["error"], batch["source"],
                                            strict=True):
        key, start = ctx.key(source, raw_key), time.perf_counter()
        if error is not None:
            reason, message = split_error(error)
            if identity(key, reason) not in ctx.done:
                failures.append(ctx.failure(key, source, "read", reason, message))
            continue
        if key in ctx.done:  # the reader filters finished keys already; this catches a source read unfiltered
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
                     "gray_64": prepared.gray_64, "gray_256": prepared.gray_256,
                     "full_res": full_res_payload(data, prepared.luma_source) if full else None,
                     "prepare_s": time.perf_counter() - start})
    if failures:
        write_part(ctx.fs, ctx.dest, failures, ctx.attempt)
    return _columns(rows, with_luma=full)


def finished_images(ctx: JobContext, row: dict[str, Any], rgb_256: np.ndarray) -> list[np.ndarray]:
    """Step 5 (restore) at full resolution from the input's luma, else the 256x256 colourings as they are."""
    if row["resolution"] != "full" or not row.get("full_res"):
        return list(rgb_256)
    if row["full_res_kind"] == "file":  # decoded again, as prepare did (the same decoder gives the same pixels)
        decoded = decode_image(row["full_res"], max_pixels=ctx.max_pixels, min_side=ctx.min_side)
        y = prepare_image(decoded.rgb, ctx.crop).luma_source  # (H, W, 3): its luma is taken unrounded
    else:
        y = np.frombuffer(row["full_res"], np.uint8).reshape(int(row["height"]), int(row["width"]))  # (H, W)
    return [transfer_chroma(y, rgb) for rgb in rgb_256]


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
            images, outputs = finished_images(ctx, row, batch["rgb_256"][i]), []
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
