"""ColTranPipeline: colorizer -> colour upsampler -> spatial upsampler, in one process, one way to run it.

The CLI, batch jobs, Serve and evaluation all use this object; the batch job and Serve call the numbered
steps one stage at a time (each on its own actor pool or deployment), `__call__` chains them. No I/O, no Ray.

Steps (paper sec. 4, official `sample.py`):
  1. prepare:          image -> gray 64x64 and 256x256 (from the crop, area-resized as in training)
  2. colorize:         gray 64 -> 3-bit 64x64 colours, `num_samples` per image (autoregressive, cached)
  3. upsample_colors:  3-bit colours + gray 64 -> 8-bit 64x64 colours (parallel, argmax)
  4. upsample_spatial: blocky 256x256 colours + gray 256 -> 256x256 colours (parallel, argmax)
  5. restore:          256x256 chroma on the input's own luminance at the input's size (see coltran.chroma)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coltran.checkpoint import CheckpointError, load_checkpoint
from coltran.chroma import transfer_chroma
from coltran.configs import STAGE_NAMES
from coltran.inputs import RESOLUTIONS, PreparedImage, prepare_image
from coltran.sampling import sample_colorizer
from coltran.transforms import from_3bit, upsample_4x


def to_tensor(array, device: torch.device | str) -> torch.Tensor:
    """A tensor on `device`; read-only arrays (Ray's zero-copy batches) are copied first, which torch needs to
    share memory safely."""
    return torch.from_numpy(np.require(np.asarray(array), requirements=["C", "W"])).to(device)


@dataclass
class SampleResult:
    seed: int
    coarse_64: np.ndarray  # (64, 64, 3) uint8: the colorizer's 3-bit colours shown at 32k
    upsampled_64: np.ndarray  # (64, 64, 3) uint8 after the colour upsampler
    rgb_256: np.ndarray  # (256, 256, 3) uint8 after the spatial upsampler
    full: np.ndarray | None  # (H, W, 3) uint8 at the input's own size (resolution='full')


@dataclass
class ColorizedImage:
    size: tuple[int, int]  # (H, W) of the input (of the crop when crop='center')
    gray_256: np.ndarray
    samples: list[SampleResult]


class ColTranPipeline:
    """The three stages chained. A stage may be None: batch actors and Serve replicas hold one stage each and
    call only its step (`for_stage`, `from_models(..., stages=...)`); a step whose model is absent says so."""

    def __init__(self, colorizer=None, color_upsampler=None, spatial_upsampler=None, *,
                 device: str | torch.device | None = None, model_info: dict | None = None,
                 upsampler_batch_size: int = 4, compile_sampler: bool = False, bf16: bool | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        models = {"colorizer": colorizer, "color_upsampler": color_upsampler, "spatial_upsampler": spatial_upsampler}
        for stage, model in models.items():
            setattr(self, stage, None if model is None else model.to(self.device).eval())
        self.model_info = model_info or {}
        self.upsampler_batch_size = upsampler_batch_size
        self.compile_sampler = compile_sampler  # torch.compile the colorizer's steps (docs/sampling.md)
        # bf16 autocast (head and draw stay float32): default on CUDA; on a CPU with bf16 units it pays for large
        # models (docs/sampling.md), fp32 stays the exact default there
        self.bf16 = self.device.type == "cuda" if bf16 is None else bf16
        sides = {stage: tuple(m.config.resolution) for stage, m in models.items() if m is not None}
        low = {side for stage, side in sides.items() if stage != "spatial_upsampler"}
        if len(low) > 1 or (low and "spatial_upsampler" in sides
                            and sides["spatial_upsampler"][0] != 4 * next(iter(low))[0]):
            raise ValueError(f"stage resolutions do not chain: {sides}")

    @classmethod
    def from_models(cls, path: str | Path, *, device: str | torch.device | None = None, weights: str = "ema",
                    stages: Sequence[str] = STAGE_NAMES, **kwargs) -> ColTranPipeline:
        """Load a models directory (path/colorizer, path/color_upsampler, path/spatial_upsampler), or only
        `stages` of it."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"models directory {path} does not exist")
        return cls._from_checkpoints({stage: path / stage for stage in stages}, device, weights, **kwargs)

    @classmethod
    def for_stage(cls, stage: str, checkpoint_dir: str | Path, *, device: str | torch.device | None = None,
                  weights: str = "ema", **kwargs) -> ColTranPipeline:
        """One stage from its own checkpoint directory (what a batch actor or a Serve replica holds)."""
        return cls._from_checkpoints({stage: Path(checkpoint_dir)}, device, weights, **kwargs)

    @classmethod
    def _from_checkpoints(cls, dirs: dict[str, Path], device, weights: str, **kwargs) -> ColTranPipeline:
        unknown = set(dirs) - set(STAGE_NAMES)
        if unknown or not dirs:
            raise ValueError(f"stages must be a non-empty subset of {STAGE_NAMES}, got {sorted(dirs)}")
        ckpts = {stage: load_checkpoint(d, weights=weights, stage=stage) for stage, d in dirs.items()}
        info = {}
        for stage, ckpt in ckpts.items():  # the registry's name/version when resolved from MLflow
            info[stage] = {"step": ckpt.step, "untrained": bool(ckpt.meta.get("untrained")),
                           "source": str(ckpt.meta.get("source", dirs[stage])),
                           **{k.removeprefix("registered_"): str(ckpt.meta[k])
                              for k in ("registered_name", "registered_version") if k in ckpt.meta}}
        pipe = cls(**{stage: ckpt.model for stage, ckpt in ckpts.items()}, device=device, model_info=info, **kwargs)
        for stage_info in info.values():
            stage_info["device"] = str(pipe.device)
        return pipe

    def _model(self, stage: str) -> torch.nn.Module:
        model = getattr(self, stage)
        if model is None:
            raise RuntimeError(f"this pipeline was loaded without the {stage} stage")
        return model

    @property
    def untrained(self) -> bool:
        return any(info.get("untrained") for info in self.model_info.values())

    def _autocast(self):
        """bf16 autocast when `bf16` (by default on CUDA); exact fp32 otherwise."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # 1.
    def prepare(self, image, crop: str = "full") -> PreparedImage:
        return prepare_image(image, crop=crop)

    # 2.
    @torch.no_grad()
    def colorize(self, gray_64: np.ndarray, seeds: Sequence[int], num_samples: int = 1,
                 temperature: float = 1.0, mode: str = "sample", official_row_cln: bool = False) -> np.ndarray:
        """gray (B, 64, 64) uint8 -> 3-bit colours (B * num_samples, 64, 64, 3) uint8, image-major."""
        gray = to_tensor(gray_64, self.device)
        with self._autocast():
            out = sample_colorizer(self._model("colorizer"), gray, num_samples=num_samples, mode=mode,
                                   temperature=temperature, seeds=list(seeds), official_row_cln=official_row_cln,
                                   compile=self.compile_sampler)
        return out.colors3.cpu().numpy()

    def warm_up_sampler(self) -> None:
        """Compile the colorizer's steps now for batch 1 and for every batch above 1 (a long-lived process calls
        this at start, so no request pays the compile); nothing to do when the sampler is not compiled."""
        if self.compile_sampler:
            height, width = self._model("colorizer").config.resolution
            for batch in (1, 2):
                self.colorize(np.zeros((batch, height, width), np.uint8), seeds=range(batch), mode="argmax")

    # 3.
    @torch.no_grad()
    def upsample_colors(self, gray_64: np.ndarray, colors3: np.ndarray) -> np.ndarray:
        """gray (N, 64, 64), 3-bit colours (N, 64, 64, 3) -> 8-bit colours (N, 64, 64, 3) uint8."""
        return self._predict(self._model("color_upsampler"), gray_64, colors3)

    # 4.
    @torch.no_grad()
    def upsample_spatial(self, gray_256: np.ndarray, rgb_64: np.ndarray) -> np.ndarray:
        """gray (N, 256, 256), colours (N, 64, 64, 3) -> (N, 256, 256, 3) uint8."""
        return self._predict(self._model("spatial_upsampler"), gray_256, upsample_4x(np.asarray(rgb_64)))

    def _predict(self, model, gray: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        outs = []
        for start in range(0, len(gray), self.upsampler_batch_size):
            g = to_tensor(gray[start : start + self.upsampler_batch_size], self.device)
            t = to_tensor(tokens[start : start + self.upsampler_batch_size], self.device)
            with self._autocast():
                outs.append(model.predict(g, t, mode="argmax").cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, *tokens.shape[1:]), np.uint8)

    # 5.
    @staticmethod
    def restore(prepared: PreparedImage, rgb_256: np.ndarray) -> np.ndarray:
        """The input's own luma at its own size with the predicted chroma."""
        return transfer_chroma(prepared.luma_source, rgb_256)

    def __call__(self, images: Sequence, *, num_samples: int = 1, seeds: Sequence[int] | int = 0,
                 temperature: float = 1.0, mode: str = "sample", resolution: str = "full", crop: str = "full",
                 official_row_cln: bool = False, batch_size: int = 8) -> list[ColorizedImage]:
        """Colorize images (PIL images, numpy gray/RGB arrays or encoded bytes). `seeds`: one per image, or a
        base seed b giving image k the seed b + k. Colour inputs are converted to gray first."""
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        seeds = [seeds + k for k in range(len(images))] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(images):
            raise ValueError(f"got {len(seeds)} seeds for {len(images)} images")
        results = []
        for start in range(0, len(images), batch_size):
            chunk = [self.prepare(img, crop) for img in images[start : start + batch_size]]
            results += self._run(chunk, seeds[start : start + batch_size], num_samples, temperature, mode,
                                 resolution, official_row_cln)
        return results

    def _run(self, prepared, seeds, num_samples, temperature, mode, resolution, official_row_cln):
        gray_64 = np.stack([p.gray_64 for p in prepared])
        colors3 = self.colorize(gray_64, seeds, num_samples, temperature, mode, official_row_cln)
        gray_64_rep = np.repeat(gray_64, num_samples, axis=0)
        gray_256_rep = np.repeat(np.stack([p.gray_256 for p in prepared]), num_samples, axis=0)
        rgb_64 = self.upsample_colors(gray_64_rep, colors3)
        rgb_256 = self.upsample_spatial(gray_256_rep, rgb_64)
        out = []
        for k, prep in enumerate(prepared):
            samples = []
            for s in range(num_samples):
                n = k * num_samples + s
                full = self.restore(prep, rgb_256[n]) if resolution == "full" else None
                samples.append(SampleResult(seeds[k], from_3bit(colors3[n]), rgb_64[n], rgb_256[n], full))
            out.append(ColorizedImage(prep.size, prep.gray_256, samples))
        return out
