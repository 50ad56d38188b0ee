"""The training job file: strict loading, precedence (defaults <- paper stage defaults / preset <- YAML <- --set),
errors that name the bad key or value, and the committed job files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coltran.configs import ConfigError, config_to_dict, preset
from pipelines.job_config import parse_overrides
from pipelines.train.config import (
    PAPER_BATCH,
    PAPER_STEPS,
    JobConfig,
    flatten,
    job_from_dict,
    job_to_dict,
    load_job,
)

JOBS = Path(__file__).resolve().parents[1] / "jobs"
REQUIRED = {"run_name": "r", "storage_path": "/tmp/runs", "dataset": "/tmp/data"}


def test_committed_paper_job_is_the_paper_setup():
    job = load_job(JOBS / "train_all.yaml")
    for stage in ("colorizer", "color_upsampler", "spatial_upsampler"):
        spec = job.stage(stage)
        assert spec.enabled and spec.model.preset == "full"
        assert (spec.train.batch_size, spec.train.max_steps) == (PAPER_BATCH[stage], PAPER_STEPS[stage])
        assert (spec.train.lr, spec.train.ema_decay, spec.train.ema_warmup) == (3e-4, 0.999, True)
        assert spec.scaling.pool == stage and spec.scaling.use_gpu and spec.scaling.gpus_per_worker == 1
        assert config_to_dict(spec.model_config(stage)) == config_to_dict(preset(stage, "full"))
    assert (PAPER_BATCH["colorizer"], PAPER_BATCH["color_upsampler"], PAPER_BATCH["spatial_upsampler"]) == \
        (224, 768, 32)
    assert job.mlflow.alias == "candidate"
    assert job.mlflow.registered_models.color_upsampler == "coltran-color-upsampler"


def test_local_job_runs_anywhere_on_cpu_with_test_presets():
    job = load_job(JOBS / "train_local.yaml")
    for stage in job.enabled_stages():
        spec = job.stage(stage)
        assert spec.scaling.pool is None and not spec.scaling.use_gpu and spec.model.preset == "test"
        assert spec.train.max_steps <= 100
    assert len(job.enabled_stages()) == 3


def test_precedence_defaults_yaml_then_set():
    data = {**REQUIRED, "stages": {"colorizer": {"train": {"max_steps": 50}, "model": {"preset": "test"}}}}
    job = load_job(data=data, overrides=["stages.colorizer.train.max_steps=7",
                                         "stages.colorizer.model.overrides.hidden_size=64"])
    spec = job.stages.colorizer
    assert spec.train.max_steps == 7  # --set beats the YAML
    assert spec.train.batch_size == PAPER_BATCH["colorizer"]  # the stage's paper default where nothing says
    assert job.stages.spatial_upsampler.train.batch_size == 32
    cfg = spec.model_config("colorizer")
    assert cfg.hidden_size == 64 and cfg.num_encoder_layers == preset("colorizer", "test").num_encoder_layers


def test_unknown_keys_are_errors_that_list_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bogus'\] in stages.colorizer.train; valid keys: "
                                          r"\['batch_size', 'max_steps'"):
        load_job(data={**REQUIRED, "stages": {"colorizer": {"train": {"bogus": 1}}}})
    with pytest.raises(ConfigError, match=r"\['colourizer'\] in stages; valid keys: \['colorizer', "):
        load_job(data={**REQUIRED, "stages": {"colourizer": {}}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['nope'\] in the job file"):
        load_job(data={**REQUIRED, "nope": 1})
    with pytest.raises(ConfigError, match=r"stages.colorizer.model: unknown colorizer config key\(s\) \['width'\]"):
        load_job(data=REQUIRED, overrides=["stages.colorizer.model.overrides.width=3"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['max_step'\]"):
        load_job(data=REQUIRED, overrides=["stages.spatial_upsampler.train.max_step=3"])


@pytest.mark.parametrize("override, message", [
    ("stages.colorizer.train.max_steps=ten", r"stages.colorizer.train.max_steps must be an integer, got 'ten'"),
    ("stages.colorizer.train.max_steps=true", r"must be an integer, got True"),
    ("stages.colorizer.enabled=1", r"stages.colorizer.enabled must be true or false, got 1"),
    ("stages.colorizer.train.lr=fast", r"stages.colorizer.train.lr must be a number, got 'fast'"),
    ("stages.colorizer.train.ema_warmup=1", r"stages.colorizer.train.ema_warmup must be true or false, got 1"),
    ("stages.colorizer.train.ema_warmup=constant", r"train.ema_warmup must be true or false, got 'constant'"),
    ("stages.colorizer.train.batch_size=10", r"batch_size 10 is not divisible by scaling.num_workers 4"),
    ("stages.colorizer.train.max_steps=0", r"stages.colorizer.train.max_steps must be positive, got 0"),
    ("stages.colorizer.model.preset=huge", r"size must be one of \['full', 'mid', 'test'\], got 'huge'"),
    ("mlflow.experiment=null", r"mlflow.experiment must not be null"),
    ("stages=3", r"stages must be a mapping, got 3"),
    ("run_name=a/b", r"run_name must be letters, digits, '.', '_' or '-' .*got 'a/b'"),
    ("run_name=\"it's\"", r"run_name must be letters, digits"),
])
def test_bad_values_name_the_key_and_the_expectation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_job(data=REQUIRED, overrides=["stages.colorizer.scaling.num_workers=4", override])


def test_ema_warmup_is_on_by_default_and_one_switch_turns_it_off(tmp_path):
    assert all(load_job(JOBS / "train_local.yaml").stage(s).train.ema_warmup for s in PAPER_BATCH)
    job = load_job(data=REQUIRED, overrides=["stages.colorizer.train.ema_warmup=false"])
    assert job.stages.colorizer.train.ema_warmup is False and job.stages.color_upsampler.train.ema_warmup is True
    assert job_from_dict(job_to_dict(job)).stages.colorizer.train.ema_warmup is False  # what a worker rebuilds
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**REQUIRED, "stages": {"spatial_upsampler": {"train": {"ema_warmup": False}}}}))
    assert load_job(path).stages.spatial_upsampler.train.ema_warmup is False


def test_required_fields_and_malformed_overrides(tmp_path):
    with pytest.raises(ConfigError, match="dataset is required"):
        load_job(data={"run_name": "r", "storage_path": "/x"})
    with pytest.raises(ConfigError, match=r"--set 'stages' is not of the form dotted.key=value"):
        parse_overrides(["stages"])
    with pytest.raises(ConfigError, match=r"job file .*missing.yaml does not exist"):
        load_job(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping, got list"):
        load_job(tmp_path / "list.yaml")
    all_off = {f"stages.{s}.enabled": "false" for s in ("colorizer", "color_upsampler", "spatial_upsampler")}
    with pytest.raises(ConfigError, match="every stage is disabled"):
        load_job(data=REQUIRED, overrides=[f"{k}={v}" for k, v in all_off.items()])


def test_yaml_1_1_exponent_strings_are_numbers(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(REQUIRED) + "stages:\n  colorizer:\n    train:\n      lr: 3e-4\n")
    assert yaml.safe_load(path.read_text())["stages"]["colorizer"]["train"]["lr"] == "3e-4"  # PyYAML's reading
    assert load_job(path).stages.colorizer.train.lr == 3e-4


def test_plain_dict_round_trip_is_what_workers_rebuild():
    job = load_job(data=REQUIRED, overrides=["stages.color_upsampler.scaling.pool=null",
                                             "stages.color_upsampler.model.overrides.num_heads=2"])
    data = job_to_dict(job)
    yaml.safe_dump(data)  # plain types only
    assert job_from_dict(data) == job
    assert job_from_dict(data).stages.color_upsampler.scaling.pool is None
    flat = flatten(data)
    assert flat["stages.color_upsampler.model.overrides.num_heads"] == 2
    assert flat["stages.colorizer.train.batch_size"] == 224
    assert isinstance(JobConfig(), JobConfig)
