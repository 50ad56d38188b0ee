"""A training worker's EMA across checkpoints: the warm-up switch reaches the EMA, the update count is saved and
restored, and a checkpoint written before counts were saved resumes with its step as the count."""

from __future__ import annotations

import shutil

import pytest
import ray.train
import torch

from coltran.configs import apply_overrides, preset
from coltran.models import build_model
from pipelines.train.config import TrainSpec
from pipelines.train.state import restore, save_and_report
from pipelines.train.worker import initial_state

STAGE = "color_upsampler"


def _model():
    torch.manual_seed(0)
    return build_model(apply_overrides(preset(STAGE, "test"), {"resolution": [8, 8]}))


def _nudge(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("warmup", [True, False])
def test_initial_state_takes_the_ema_settings_from_the_job(warmup):
    model = _model()
    state = initial_state(model, TrainSpec(ema_decay=0.99, ema_warmup=warmup), rank=0)
    assert (state.ema.decay, state.ema.warmup, state.ema.num_updates) == (0.99, warmup, 0)
    assert state.ema.current_decay() == (pytest.approx(0.1) if warmup else 0.99)


@pytest.fixture
def checkpointed(tmp_path, monkeypatch):
    """A state after 3 EMA updates at step 5 (so count and step differ), saved through save_and_report."""
    model = _model()
    state = initial_state(model, TrainSpec(), rank=0)
    for seed in range(3):
        _nudge(model, seed)
        state.ema.update(model)
    state.step = 5
    reported = tmp_path / "reported"

    def report(metrics, checkpoint=None):
        shutil.copytree(checkpoint.path, reported)  # the temporary directory is gone after the call

    monkeypatch.setattr(ray.train, "report", report)
    save_and_report(state, {"step": 5}, rank=0, world=1, meta={})
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(reported)))
    return state, reported


def _resumed():
    state = initial_state(_model(), TrainSpec(), rank=0)
    _nudge(state.model, 99)  # the fresh shadow differs from the saved one
    assert restore(state, state.model.config, rank=0, world=1)
    return state


def test_restore_brings_back_the_ema_count_and_the_warmup_continues_identically(checkpointed):
    saved, _ = checkpointed
    state = _resumed()
    assert (state.step, state.ema.num_updates) == (5, 3)
    assert all(torch.equal(state.ema.shadow[n], t) for n, t in saved.ema.shadow.items())
    for s in (saved, state):
        _nudge(s.model, 7)
        s.ema.update(s.model)
    assert all(torch.equal(state.ema.shadow[n], t) for n, t in saved.ema.shadow.items())


def test_a_checkpoint_without_the_count_resumes_with_its_step_as_the_count(checkpointed):
    _, reported = checkpointed
    extras = torch.load(reported / "trainer_state.pt", weights_only=True)
    del extras["ema_updates"]  # as written before the count was saved
    torch.save(extras, reported / "trainer_state.pt")
    state = _resumed()
    assert (state.step, state.ema.num_updates) == (5, 5)
    assert state.ema.current_decay() == pytest.approx(6 / 15)
