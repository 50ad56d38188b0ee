"""The training job file (`jobs/train_all.yaml`) as dataclasses, loaded strictly.

Precedence: field defaults <- the stage's paper defaults (batch, steps) and model preset <- the YAML <- `--set
key=value` overrides (dotted paths, values parsed as YAML). An unknown key is an error listing the valid keys.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coltran.configs import STAGE_NAMES, ConfigError, ModelConfig, apply_overrides, preset
from pipelines.job_config import flatten, load_strict, merge  # noqa: F401  (flatten: part of this module's API)
from pipelines.tracking.names import REGISTERED_NAMES

# Paper (reference sec. 5): global batch 224 / 768 / 32 and 450k / 300k / 300k steps.
PAPER_BATCH = {"colorizer": 224, "color_upsampler": 768, "spatial_upsampler": 32}
PAPER_STEPS = {"colorizer": 450_000, "color_upsampler": 300_000, "spatial_upsampler": 300_000}


@dataclass
class ScalingSpec:
    pool: str | None = None  # node label `pool=<value>` the stage's workers must run on; null: anywhere
    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0


@dataclass
class ModelSpec:
    preset: str = "full"  # full | mid | test (coltran.configs.preset)
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields on top of the preset


@dataclass
class TrainSpec:
    batch_size: int = 32  # global, split evenly over the workers
    max_steps: int = 300_000
    lr: float = 3e-4
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)) after n updates (TF); false: constant, official
    checkpoint_every_steps: int = 0  # 0: by time only
    checkpoint_every_seconds: float = 900.0  # 0: by steps only
    eval_every_steps: int = 5000  # 0: no evaluation
    eval_batches: int = 50  # held-out batches (of the per-worker batch size) per evaluation
    sample_images: int = 4  # held-out images in the logged sample grid
    log_every_steps: int = 100
    keep_checkpoints: int = 10
    max_failures: int = 3
    seed: int = 0


@dataclass
class StageSpec:
    enabled: bool = True
    model: ModelSpec = field(default_factory=ModelSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def model_config(self, stage: str) -> ModelConfig:
        """The stage's resolved model config: preset <- overrides."""
        return apply_overrides(preset(stage, self.model.preset), dict(self.model.overrides))


def _paper_stage(stage: str) -> StageSpec:
    return StageSpec(scaling=ScalingSpec(pool=stage),
                     train=TrainSpec(batch_size=PAPER_BATCH[stage], max_steps=PAPER_STEPS[stage]))


@dataclass
class Stages:
    colorizer: StageSpec = field(default_factory=lambda: _paper_stage("colorizer"))
    color_upsampler: StageSpec = field(default_factory=lambda: _paper_stage("color_upsampler"))
    spatial_upsampler: StageSpec = field(default_factory=lambda: _paper_stage("spatial_upsampler"))


@dataclass
class RegisteredModels:
    colorizer: str = REGISTERED_NAMES["colorizer"]
    color_upsampler: str = REGISTERED_NAMES["color_upsampler"]
    spatial_upsampler: str = REGISTERED_NAMES["spatial_upsampler"]


@dataclass
class MlflowSpec:
    tracking_uri: str | None = None  # null: MLFLOW_TRACKING_URI or MLflow's default
    experiment: str = "coltran"
    registered_models: RegisteredModels = field(default_factory=RegisteredModels)
    alias: str = "candidate"


@dataclass
class JobConfig:
    run_name: str | None = None  # re-submitting the same name resumes
    storage_path: str | None = None  # Ray Train run storage (checkpoints): local path or s3://
    dataset: str | None = None  # preprocessed dataset root (DEST of `coltran preprocess`): path or s3://
    train_split: str = "train"
    eval_split: str = "heldout"
    # a stage's training columns up to this size (MB) are materialised once in the object store instead of
    # re-read from Parquet every epoch (small datasets); 0: always stream
    cache_train_below_mb: float = 512.0
    models_dir: str | None = None  # where the final models directory is written; null: not written
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)
    stages: Stages = field(default_factory=Stages)

    def stage(self, name: str) -> StageSpec:
        if name not in STAGE_NAMES:
            raise ConfigError(f"unknown stage {name!r}; expected one of {list(STAGE_NAMES)}")
        return getattr(self.stages, name)

    def enabled_stages(self) -> list[str]:
        return [name for name in STAGE_NAMES if self.stage(name).enabled]

    def stage_run_name(self, stage: str) -> str:
        """The stage's Ray Train run: its folder under storage_path, the same at every re-submission."""
        return f"{self.run_name}-{stage}"

    def validate(self) -> None:
        for name in ("run_name", "storage_path", "dataset"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required in the job file (or --set {name}=...)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_name):
            raise ConfigError(f"run_name must be letters, digits, '.', '_' or '-' (it names runs and storage "
                              f"directories), got {self.run_name!r}")
        if not self.cache_train_below_mb >= 0:
            raise ConfigError(f"cache_train_below_mb must be >= 0, got {self.cache_train_below_mb}")
        if not self.enabled_stages():
            raise ConfigError("every stage is disabled; enable at least one of " + ", ".join(STAGE_NAMES))
        for name in self.enabled_stages():
            _validate_stage(name, self.stage(name))


def _validate_stage(name: str, spec: StageSpec) -> None:
    where = f"stages.{name}"
    try:
        spec.model_config(name)
    except ConfigError as err:
        raise ConfigError(f"{where}.model: {err}") from None
    s, t = spec.scaling, spec.train
    positive = {"scaling.num_workers": s.num_workers, "train.batch_size": t.batch_size,
                "train.max_steps": t.max_steps, "train.log_every_steps": t.log_every_steps,
                "train.keep_checkpoints": t.keep_checkpoints, "scaling.cpus_per_worker": s.cpus_per_worker}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}.{key} must be positive, got {value}")
    if t.batch_size % s.num_workers:
        raise ConfigError(f"{where}.train.batch_size {t.batch_size} is not divisible by "
                          f"scaling.num_workers {s.num_workers}")
    if t.checkpoint_every_steps <= 0 and t.checkpoint_every_seconds <= 0:
        raise ConfigError(f"{where}.train: set checkpoint_every_steps or checkpoint_every_seconds above 0")
    for key in ("checkpoint_every_steps", "checkpoint_every_seconds", "eval_every_steps", "eval_batches",
                "sample_images", "max_failures"):
        if getattr(t, key) < 0:
            raise ConfigError(f"{where}.train.{key} must be >= 0, got {getattr(t, key)}")
    if not 0.0 <= t.ema_decay < 1.0 or t.lr <= 0:
        raise ConfigError(f"{where}.train: need lr > 0 and 0 <= ema_decay < 1, got {t.lr}, {t.ema_decay}")
    if s.use_gpu and s.gpus_per_worker <= 0:
        raise ConfigError(f"{where}.scaling.gpus_per_worker must be positive with use_gpu, got {s.gpus_per_worker}")


def load_job(path: str | Path | None = None, overrides: list[str] | None = None,
             data: dict[str, Any] | None = None) -> JobConfig:
    """Load a job file (or a dict), apply `key=value` overrides, validate; raise ConfigError naming the problem."""
    cfg = load_strict(JobConfig(), path, data, overrides)
    cfg.validate()
    return cfg


def job_to_dict(cfg: JobConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-safe dict (what crosses into Ray workers and what MLflow logs)."""
    return dataclasses.asdict(cfg)


def job_from_dict(data: dict[str, Any]) -> JobConfig:
    cfg = merge(JobConfig(), data, "")
    cfg.validate()
    return cfg
