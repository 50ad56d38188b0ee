"""Checkpoint directories: exact round trips, atomic replacement, and a loud CheckpointError (never random
weights) for every missing, truncated or mismatched piece."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import coltran.checkpoint as ckpt_mod
from coltran.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from coltran.configs import apply_overrides, preset
from coltran.models import build_model
from coltran.optim import EMA, make_optimizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spin-waits on a shared machine
    yield
    torch.set_num_threads(threads)


def _trained(stage="color_upsampler", res=(8, 8)):
    """A model after one optimiser step, so raw weights, EMA weights and optimizer state all differ from init."""
    torch.manual_seed(0)
    model = build_model(apply_overrides(preset(stage, "test"), {"resolution": list(res)}))
    ema, opt = EMA(model), make_optimizer(model.parameters())
    g = torch.Generator().manual_seed(1)
    rgb = torch.randint(0, 256, (2, *res, 3), generator=g, dtype=torch.uint8)
    gray = torch.randint(0, 256, (2, *res), generator=g, dtype=torch.uint8)
    loss, _ = model.loss({"rgb_64": rgb, "gray_64": gray})
    loss.backward()
    opt.step()
    ema.update(model)
    return model, ema, opt


@pytest.fixture
def saved(tmp_path):
    model, ema, opt = _trained()
    path = save_checkpoint(tmp_path / "ckpt", model, ema_state=ema.state_dict(), optimizer=opt, step=7,
                           trainer_state={"epoch": 3, "rng": torch.tensor([1, 2, 3])}, meta={"run": "r1"})
    return path, model, ema, opt


def _same_params(model, reference: dict):
    return all(torch.equal(p, reference[n]) for n, p in model.named_parameters())


def test_round_trip(saved):
    path, model, ema, opt = saved
    raw = {n: p.detach() for n, p in model.named_parameters()}
    assert not _same_params(model, ema.shadow)  # the two weight sets differ, so the test can tell them apart
    got = load_checkpoint(path, weights="model", stage="color_upsampler", expected_config=model.config)
    assert _same_params(got.model, raw) and not got.model.training
    assert got.config == model.config and got.step == 7 and got.meta["run"] == "r1" and got.weights == "model"
    assert got.meta["untrained"] is False and got.meta["stage"] == "color_upsampler"
    assert _same_params(load_checkpoint(path).model, ema.shadow)  # EMA weights are the default
    full = load_checkpoint(path, with_training_state=True)
    assert full.ema_state.keys() == ema.shadow.keys()
    assert all(torch.equal(full.ema_state[n], t) for n, t in ema.shadow.items())
    assert full.trainer_state["epoch"] == 3 and torch.equal(full.trainer_state["rng"], torch.tensor([1, 2, 3]))
    fresh = make_optimizer(full.model.parameters())
    fresh.load_state_dict(full.optimizer_state)
    for a, b in zip(fresh.state.values(), opt.state.values(), strict=True):
        assert torch.equal(a["square_avg"], b["square_avg"]) and a["step"] == b["step"]


def test_colorizer_round_trip(tmp_path):
    model, ema, _ = _trained("colorizer", (4, 6))
    save_checkpoint(tmp_path / "c", model, ema_state=ema.state_dict())
    got = load_checkpoint(tmp_path / "c", weights="model")
    assert _same_params(got.model, dict(model.named_parameters())) and got.config.resolution == (4, 6)
    assert got.optimizer_state is None and got.step == 0


def test_overwrite_is_atomic_and_leaves_nothing_behind(saved, monkeypatch):
    path, model, ema, _ = saved
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(path, model, ema_state=ema.state_dict(), step=8)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]
    assert load_checkpoint(path).step == 8
    assert _same_params(load_checkpoint(path, weights="model").model, dict(model.named_parameters()))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=9)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]
    assert load_checkpoint(path).step == 8  # the old checkpoint is intact


def test_missing_pieces(saved, tmp_path):
    path = saved[0]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (path / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ema.safetensors is missing"):
        load_checkpoint(path)
    load_checkpoint(path, weights="model")  # raw weights alone are still loadable on request
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors is missing"):
        load_checkpoint(path, weights="model")
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"meta.json is missing: .* is not a ColTran checkpoint"):
        load_checkpoint(path, weights="model")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_checkpoint(path, weights="best")


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors"])
def test_truncated_weights(saved, name):
    path = saved[0]
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{name} cannot be read \(truncated or corrupt\?\)"):
        load_checkpoint(path, weights=name.split(".")[0])


def test_damaged_metadata_and_config(saved):
    path = saved[0]
    (path / "config.yaml").write_text("stage: color_upsampler\nhidden_size: [32\n")
    with pytest.raises(CheckpointError, match="config.yaml: .*not valid YAML"):
        load_checkpoint(path)
    (path / "meta.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(CheckpointError, match="format 'something-else'"):
        load_checkpoint(path)
    (path / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_config_and_stage_mismatch(saved):
    path, model, _, _ = saved
    other = apply_overrides(model.config, {"num_heads": 2, "ff_size": 64})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, expected_config=other)
    assert "num_heads: checkpoint 1 != expected 2" in str(err.value) and "ff_size" in str(err.value)
    assert "hidden_size" not in str(err.value)
    with pytest.raises(CheckpointError, match="holds a color_upsampler checkpoint, expected colorizer"):
        load_checkpoint(path, stage="colorizer")
    with pytest.raises(CheckpointError, match="stage"):
        load_checkpoint(path, expected_config=preset("spatial_upsampler", "test"))


@pytest.mark.parametrize("weights", ["model", "ema"])
def test_tensor_mismatches_are_listed(saved, weights):
    path = saved[0]
    file = path / f"{weights}.safetensors"
    good = load_file(str(file))
    state = dict(good)
    state["extra.weight"] = torch.zeros(2)
    del state["final_dense.bias"]
    state["input_dense.weight"] = torch.zeros(3, 3)
    save_file(state, str(file))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, weights=weights)
    msg = str(err.value)
    assert "missing: ['final_dense.bias']" in msg and "unexpected: ['extra.weight']" in msg
    assert "input_dense.weight: (3, 3) != expected (32, 64)" in msg and weights in msg
    save_file({k: v for k, v in good.items() if k != "gray_embed.weight"}, str(file))
    with pytest.raises(CheckpointError, match=r"missing: \['gray_embed.weight'\]"):
        load_checkpoint(path, weights=weights)  # an EMA gap must not be filled from the raw weights
