"""Settings of the evaluation job (`jobs/evaluate.yaml`, `coltran evaluate`), loaded strictly like the batch job's:
defaults <- the YAML <- command-line options <- `--set dotted.key=value`; an unknown key lists the valid ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coltran.configs import ConfigError
from pipelines.batch.settings import DEVICES, MODES, PoolSpec, TaskSpec
from pipelines.job_config import load_strict
from pipelines.train.config import RegisteredModels

POOLS = ("bits", "colorizer", "color_upsampler", "spatial_upsampler", "inception")  # in pipeline order


@dataclass
class TrackingSpec:
    tracking_uri: str | None = None  # null: MLFLOW_TRACKING_URI or MLflow's default
    experiment: str = "coltran"  # used when no parent run is given (a child run goes to its parent's experiment)
    parent_run_id: str | None = None  # e.g. the training submission's parent run: the evaluation is its child
    run_name: str | None = None  # default: evaluate-<models>
    enabled: bool = True  # false: write the report only
    registered_models: RegisteredModels = field(default_factory=RegisteredModels)  # what models:/@<alias> names,
    # as in the training job's mlflow.registered_models


@dataclass
class EvalSettings:
    data: list[str] = field(default_factory=list)  # held-out images: preprocessed datasets, Parquet, image sources
    split: str = "heldout"  # the split read from preprocessed datasets (DEST/<split>)
    reference: list[str] = field(default_factory=list)  # real images for the FID statistics; []: same as data
    reference_start: int | None = None  # sorted position of the first reference image; null: right after the
    # evaluated ones when reference == data (disjoint), else 0
    models: str = ""  # models directory (DIR/<stage>) or models:/@<alias>
    out: str = ""  # local folder for the report (report.md, report.html, grid.png, metrics.json)
    num_images: int = 5000  # held-out images colorized (sorted key order, like the paper's first 5,000)
    num_reference: int = 5000  # reference images
    num_samples: int = 1  # colourings per image; FID pools every sample
    seed: int = 0  # image seed = stable hash of (seed, key), as in the batch job
    temperature: float = 1.0
    mode: str = "sample"  # sample | argmax
    weights: str = "ema"  # ema | model
    device: str = "auto"  # auto: cuda when the cluster has GPUs
    bits_per_dim: bool = True  # held-out bits/dim of each stage (teacher-forced)
    grid_images: int = 8  # columns of the report's image grid (the first evaluated keys)
    cache_dir: str | None = None  # reference statistics cache; null: $COLTRAN_FID_CACHE or ~/.cache/coltran/fid
    s3_endpoint: str | None = None
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    prepare: TaskSpec = field(default_factory=TaskSpec)
    # Actor pools; null resources (pool_min, pool_max, num_cpus, num_gpus) are sized from the cluster by the
    # job's resource plan (pipelines.inference.plan), numbers are kept when they fit.
    bits: PoolSpec = field(default_factory=lambda: PoolSpec(batch_size=4))
    colorizer: PoolSpec = field(default_factory=PoolSpec)
    color_upsampler: PoolSpec = field(default_factory=PoolSpec)
    spatial_upsampler: PoolSpec = field(default_factory=lambda: PoolSpec(batch_size=4))
    inception: PoolSpec = field(default_factory=lambda: PoolSpec(batch_size=16, micro_batch=16))

    def validate(self) -> None:
        if not self.data or not all(isinstance(s, str) and s for s in self.data):
            raise ConfigError(f"data must be a non-empty list of paths or URIs, got {self.data!r}")
        if not all(isinstance(s, str) and s for s in self.reference):
            raise ConfigError(f"reference must be a list of paths or URIs, got {self.reference!r}")
        for name in ("models", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required (a path or URI), got {getattr(self, name)!r}")
        for name, value, allowed in (("mode", self.mode, MODES), ("device", self.device, DEVICES),
                                     ("weights", self.weights, ("ema", "model"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
        checks = [("num_images", self.num_images >= 2), ("num_reference", self.num_reference >= 2),
                  ("num_samples", self.num_samples >= 1), ("seed", self.seed >= 0), ("temperature", self.temperature > 0),
                  ("grid_images", self.grid_images >= 0),
                  ("reference_start", self.reference_start is None or self.reference_start >= 0)]
        checks += [("prepare.batch_size", self.prepare.batch_size >= 1), ("prepare.num_cpus", self.prepare.num_cpus >= 0)]
        checks += [(name, False) for stage in POOLS for name in getattr(self, stage).problems(stage)]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"setting {name}={_get(self, name)!r} is out of range; see jobs/evaluate.yaml")


def _get(settings: EvalSettings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def load_settings(path: str | Path | None = None, data: dict[str, Any] | None = None,
                  overrides: list[str] | None = None) -> EvalSettings:
    """Settings from a job YAML (or a dict; its keys win), then `dotted.key=value` overrides; validated."""
    settings = load_strict(EvalSettings(), path, data, overrides)
    settings.validate()
    return settings


def settings_dict(settings: EvalSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)
