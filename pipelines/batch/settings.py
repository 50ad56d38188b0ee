"""Settings of a batch colorization job (`jobs/colorize.yaml`, `coltran colorize ... --batch`), loaded strictly:
defaults <- the YAML <- command-line options <- `--set dotted.key=value`; an unknown key is an error listing the
valid keys. Also the run fingerprint: the settings that decide what an output looks like (resume checks it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coltran.configs import ConfigError
from coltran.imageio import SUPPORTED_OUTPUT_FORMATS as FORMATS
from coltran.inputs import CROPS, RESOLUTIONS
from pipelines.job_config import load_strict

# (coltran.sampling says MODES too, but importing it loads torch, which the CPU tasks that import this never need)
MODES, DEVICES = ("sample", "argmax"), ("auto", "cpu", "cuda")


@dataclass
class TaskSpec:
    """A CPU stage run as Ray tasks (decode + prepare, restore + encode + write)."""

    batch_size: int = 8  # images per task batch (the write stage writes one manifest part per batch)
    num_cpus: float = 0.25
    pool: str | None = None  # node label pool=<this> for the job's CPU tasks (null: `cpu` when the cluster has it)


@dataclass
class PoolSpec:
    """A model stage run on an actor pool: each actor loads its stage's checkpoint once. Null resource settings
    are sized from the cluster by the job's resource plan (pipelines.inference.plan); numbers are kept if they fit."""

    batch_size: int = 8  # images per actor call (each image brings num_samples colourings)
    pool_min: int | None = None  # actors; pool_min < pool_max lets Ray Data autoscale the pool (null: 1)
    pool_max: int | None = None  # null: as many as the cluster's spare CPUs/GPUs allow (by stage weight)
    num_cpus: float | None = None  # logical CPUs reserved per actor (null: 1, or a share of one node's CPUs)
    num_gpus: float | None = None  # GPUs per actor when the job runs on CUDA (ignored on CPU; null: per stage)
    num_threads: int = 1  # torch CPU threads per actor (the colorizer's pixel loop is single-threaded anyway)
    micro_batch: int = 4  # upsamplers: images per forward pass (their logits are large: 200 MB/image at 256)
    pool: str | None = None  # node label pool=<this> for the actors (null: the stage's own name when a node has it)

    def problems(self, name: str) -> list[str]:
        """The out-of-range settings of this pool, named `name.key`."""
        checks = [("batch_size", self.batch_size >= 1), ("num_threads", self.num_threads >= 1),
                  ("micro_batch", self.micro_batch >= 1), ("pool_min", self.pool_min is None or self.pool_min >= 1),
                  ("pool_max", self.pool_max is None or self.pool_max >= max(1, self.pool_min or 1)),
                  ("num_cpus", self.num_cpus is None or self.num_cpus >= 0),
                  ("num_gpus", self.num_gpus is None or self.num_gpus >= 0)]
        return [f"{name}.{key}" for key, ok in checks if not ok]


@dataclass
class BatchSettings:
    sources: list[str] = field(default_factory=list)  # folders, images, archives, s3:// prefixes, Parquet datasets
    models: str = ""  # models directory (DIR/<stage>) or models:/@<alias> (MLflow registry)
    out: str = ""  # output folder or s3:// prefix
    num_samples: int = 1  # colourings per image
    seed: int = 0  # base seed; image seeds derive from it and the image key (see pipelines.batch.outputs.image_seed)
    temperature: float = 1.0
    mode: str = "sample"  # sample | argmax
    resolution: str = "full"  # full: the input's own size and luma; 256: the model's output (always for Parquet)
    crop: str = "full"  # full: the whole frame; center: the centre square
    format: str = "png"  # png | jpeg
    jpeg_quality: int = 95
    device: str = "auto"  # auto: cuda when the cluster has GPUs, else cpu
    weights: str = "ema"  # ema | model
    max_pixels: int = 64_000_000  # larger inputs fail as too_large (decompression bombs)
    min_side: int = 8  # smaller inputs fail as too_small
    s3_endpoint: str | None = None  # S3-compatible endpoint URL; default AWS_ENDPOINT_URL or AWS
    tracking_uri: str | None = None  # MLflow for models:/ URIs (driver and every actor); default MLFLOW_TRACKING_URI
    max_failed_fraction: float = 1.0  # exit 1 when more inputs than this fraction failed (1.0: bad inputs never do)
    compile_sampler: bool = False  # torch.compile the colorizer's steps in each colorizer actor (docs/sampling.md)
    progress_every_s: float = 10.0  # seconds between progress lines (0: none)
    prepare: TaskSpec = field(default_factory=TaskSpec)
    colorizer: PoolSpec = field(default_factory=PoolSpec)
    color_upsampler: PoolSpec = field(default_factory=PoolSpec)
    spatial_upsampler: PoolSpec = field(default_factory=lambda: PoolSpec(batch_size=4, micro_batch=2))
    write: TaskSpec = field(default_factory=TaskSpec)

    def validate(self) -> None:
        if not self.sources or not all(isinstance(s, str) and s for s in self.sources):
            raise ConfigError(f"sources must be a non-empty list of paths or URIs, got {self.sources!r}")
        for name in ("models", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required (a path or URI), got {getattr(self, name)!r}")
        for name, value, allowed in (("mode", self.mode, MODES), ("resolution", self.resolution, RESOLUTIONS),
                                     ("crop", self.crop, CROPS), ("format", self.format, FORMATS),
                                     ("device", self.device, DEVICES), ("weights", self.weights, ("ema", "model"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
        checks = [("num_samples", self.num_samples >= 1), ("seed", self.seed >= 0),
                  ("temperature", self.temperature > 0), ("jpeg_quality", 1 <= self.jpeg_quality <= 100),
                  ("max_pixels", self.max_pixels >= 1), ("min_side", self.min_side >= 1),
                  ("max_failed_fraction", 0 <= self.max_failed_fraction <= 1),
                  ("compile_sampler", isinstance(self.compile_sampler, bool)),
                  ("write.pool", self.write.pool in (None, self.prepare.pool))]  # one placement for all tasks
        for stage in ("prepare", "write"):
            spec = getattr(self, stage)
            checks += [(f"{stage}.batch_size", spec.batch_size >= 1), (f"{stage}.num_cpus", spec.num_cpus >= 0)]
        checks += [(name, False) for stage in ("colorizer", "color_upsampler", "spatial_upsampler")
                   for name in getattr(self, stage).problems(stage)]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"setting {name} is out of range; see the comments in jobs/colorize.yaml")

    def fingerprint(self, models: dict[str, str]) -> dict[str, Any]:
        """What decides the outputs: a resumed run must match the earlier attempts on every item."""
        keys = ("sources", "num_samples", "seed", "temperature", "mode", "resolution", "crop", "format",
                "jpeg_quality", "weights", "max_pixels", "min_side")
        return {**{k: getattr(self, k) for k in keys}, "models": models}


CLI_KEYS = ("sources", "models", "out", "num_samples", "seed", "temperature", "mode", "resolution", "crop",
            "format")


def load_settings(path: str | Path | None = None, data: dict[str, Any] | None = None,
                  overrides: list[str] | None = None) -> BatchSettings:
    """Settings from a job YAML (or a dict; its keys win), then `dotted.key=value` overrides; validated."""
    settings = load_strict(BatchSettings(), path, data, overrides)
    settings.validate()
    return settings


def settings_from_args(args) -> BatchSettings:
    """`coltran colorize` arguments (argparse namespace) -> settings; `--set` applies last."""
    data = {k: getattr(args, k) for k in CLI_KEYS}
    if getattr(args, "device", None):
        data["device"] = args.device
    return load_settings(data=data, overrides=list(getattr(args, "set", None) or []))


def settings_dict(settings: BatchSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)
