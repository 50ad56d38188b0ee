"""TF checkpoint conversion: the architecture-derived names, layouts and optimizer order, both optimizer layouts,
the CLI, and clear errors for truncated or mismatched checkpoints."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import needs_shared_data

from coltran.checkpoint import load_checkpoint
from coltran.configs import apply_overrides, config_from_dict, preset
from coltran.convert.convert import ConversionError, convert_tf_checkpoint, load_tf_checkpoint, main
from coltran.convert.tf_bundle import CheckpointFormatError
from coltran.convert.tf_keys import SLOT_MARK, VALUE_SUFFIX, escape, unescape, variable_key
from coltran.convert.tf_mapping import official_variables, to_tf_layout, to_torch_layout
from coltran.models import build_model, count_parameters
from coltran.nn import AxialAttention
from coltran.optim import make_optimizer

TEST_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "official-coltran-tf" / "test"
needs_data = needs_shared_data(TEST_DATA)
FOLDERS = {"colorizer": "colorizer", "color_upsampler": "color_upsampler",
           "spatial_upsampler_64": "spatial_upsampler", "spatial_upsampler_256": "spatial_upsampler"}
VELOCITY = re.compile(r"RMSprop velocity of trainable #(\d+) (.*):0$")


def _fixture_config(folder):
    cfg = preset(FOLDERS[folder], "test")
    return config_from_dict({"resolution": [64, 64]}, base=cfg) if folder.endswith("_64") else cfg


def _variables_txt(folder):
    """(model variable name -> shape, [trainable variable names in optimizer order]) from variables.txt."""
    shapes, order = {}, {}
    for line in (TEST_DATA / folder / "variables.txt").read_text().splitlines():
        if line.startswith("#") or not line:
            continue
        key, shape, _, role = line.split("\t")
        name = unescape(key[: -len(VALUE_SUFFIX)])
        if key.endswith(":0" + VALUE_SUFFIX) and "ExponentialMovingAverage" not in key and SLOT_MARK not in key:
            shapes[name[:-2]] = tuple(int(s) for s in re.findall(r"\d+", shape))
        if m := VELOCITY.match(role):
            order[int(m.group(1))] = m.group(2)
    return shapes, [order[i] for i in range(len(order))]


@needs_data
@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_derived_names_shapes_and_optimizer_order_match_the_fixture(folder):
    shapes, order = _variables_txt(folder)
    variables = official_variables(_fixture_config(folder))
    assert {v.name: v.shape for v in variables} == shapes
    assert [v.name for v in variables if v.trainable] == order


CONFIG_VARIANTS = [
    ("colorizer", "full", {}), ("colorizer", "mid", {}), ("color_upsampler", "full", {}),
    ("spatial_upsampler", "full", {}), ("color_upsampler", "mid", {"resolution": [32, 48]}),
    ("colorizer", "test", {"num_heads": 4, "num_encoder_layers": 2, "num_outer_layers": 2, "num_inner_layers": 3}),
    ("colorizer", "test", {"cond_ln": False, "cond_mlp": "shift", "cond_att_scale": False}),
    ("colorizer", "test", {"cond_att_q": False, "cond_att_v": False, "cond_ln_sp_ave": "mean",
                           "model_stage": "decoder", "resolution": [16, 24]}),
]


@pytest.mark.parametrize("stage,size,overrides", CONFIG_VARIANTS)
def test_mapping_covers_every_parameter_of_any_config(stage, size, overrides):
    cfg = apply_overrides(preset(stage, size), overrides)
    variables = official_variables(cfg)
    model = build_model(cfg) if size != "full" else None
    params = {n: tuple(p.shape) for n, p in model.named_parameters()} if model else None
    names = [v.name for v in variables]
    assert len(set(names)) == len(names)
    trainable = [v for v in variables if v.trainable]
    assert all(v.torch_name is not None for v in trainable)
    assert sum(int(np.prod(v.shape)) for v in trainable) == {  # official trainable counts
        ("colorizer", "full"): 46310400, ("color_upsampler", "full"): 13476608,
        ("spatial_upsampler", "full"): 10910464}.get((stage, size), count_parameters(model) if model else None)
    if params is not None:
        assert {v.torch_name: to_torch_layout(np.zeros(v.shape), v.layout).shape for v in trainable} == params


def test_attention_kernel_layouts_with_several_heads():
    """DenseND (D, h, C) / (h, C, D) / (Dc, h, 2C) kernels give the official einsums, [scale | shift] per head."""
    d, h, c, dc = 8, 2, 4, 6
    rng = np.random.default_rng(0)
    attn = AxialAttention(d, h, "row", 5, cond_size=dc, cond_q=True, cond_k=True, cond_v=True, cond_scale=True)
    attn = attn.double()
    kernels = {n: rng.normal(size=(d, h, c)) for n in "qkv"} | {"out": rng.normal(size=(h, c, d))}
    kernels |= {f"cond_{n}": rng.normal(size=(dc, h, 2 * c)) for n in "qkv"}
    layouts = {"out": "heads_out"}
    with torch.no_grad():
        for name, kernel in kernels.items():
            weight = to_torch_layout(kernel, layouts.get(name, "heads_in"))
            getattr(attn, name).weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
    x, ctx = rng.normal(size=(3, d)), rng.normal(size=(3, dc))
    q, k, v = (t.detach().double().numpy() for t in attn.project(torch.from_numpy(x), torch.from_numpy(ctx)))
    for name, got in (("q", q * c**0.5), ("k", k), ("v", v)):
        cond = np.einsum("bD,Dhc->bhc", ctx, kernels[f"cond_{name}"])  # (B, h, 2C) = [scale | shift]
        want = np.einsum("bD,Dhc->bhc", x, kernels[name]) * cond[..., :c] + cond[..., c:]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    o = rng.normal(size=(3, h, c))
    got = attn.out(torch.from_numpy(o).flatten(-2)).detach().numpy()
    np.testing.assert_allclose(got, np.einsum("bhc,hcD->bD", o, kernels["out"]), rtol=1e-12)


def _export(model, cfg, layout="tf_keras", shift_names=None):
    """A torch model written under the official names (raw, EMA = raw + 1, slots = raw**2), as an npz dict."""
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    out = {"optimizer/" + ("_iterations" if layout == "tf_keras" else "iter") + VALUE_SUFFIX: np.array(7)}
    slot_index = 0
    for v in official_variables(cfg):
        name = shift_names(v.name) if shift_names else v.name
        value = to_tf_layout(params[v.torch_name], v) if v.torch_name else to_tf_layout(None, v)
        out[variable_key(name)] = value
        if v.trainable:
            out[variable_key(name + "/ExponentialMovingAverage")] = value + 1
            slot, slot_index = value**2, slot_index + 1
            if layout == "tf_keras":
                out[f"optimizer/_variables/{slot_index}{VALUE_SUFFIX}"] = slot
            else:
                out[escape(name + ":0") + SLOT_MARK + "rms" + VALUE_SUFFIX] = slot
    return out


@pytest.mark.parametrize("layout", ["tf_keras", "legacy"])
def test_round_trip_with_heads_layers_and_renumbered_names(tmp_path, layout):
    """Export a multi-head, multi-layer model under official names whose auto-numbers are shifted (as after
    building other layers first in the same process), then convert it back."""
    cfg = apply_overrides(preset("colorizer", "test"), {"num_heads": 2, "num_outer_layers": 2, "resolution": [8, 8]})
    model = build_model(cfg)

    def shift(name):  # dense_3 -> dense_12, col_tran_core -> col_tran_core_2, layer_normalization -> _5 ...
        def bump(m):
            return f"{m.group(1)}_{int(m.group(2) or 0) + {'dense': 9}.get(m.group(1), 2)}"
        pattern = r"\b(dense|col_tran_core|layer_normalization|conditional_layer_norm)(?:_(\d+))?(?=/)"
        return re.sub(pattern, bump, name)

    np.savez(tmp_path / "w.npz", **_export(model, cfg, layout, shift))
    converted = load_tf_checkpoint(tmp_path / "w.npz", cfg)
    assert converted.step == 7 and converted.meta["tf_optimizer_layout"] == layout
    state = converted.model.state_dict()
    for name, p in model.named_parameters():
        torch.testing.assert_close(state[name], p.detach(), rtol=0, atol=0)
        torch.testing.assert_close(converted.ema_state[name], p.detach() + 1, rtol=0, atol=0)
        slot = converted.optimizer.state[dict(converted.model.named_parameters())[name]]
        torch.testing.assert_close(slot["square_avg"], p.detach() ** 2, rtol=0, atol=0)
        assert slot["step"].item() == 7


@needs_data
def test_fixture_optimizer_state_lets_training_continue(tmp_path):
    out = convert_tf_checkpoint(TEST_DATA / "colorizer" / "ckpt", "colorizer", "test", tmp_path / "c")
    ckpt = load_checkpoint(out, weights="model", with_training_state=True)
    assert ckpt.step == 1 and ckpt.meta["source"] == "convert-tf" and ckpt.meta["tf_optimizer_layout"] == "tf_keras"
    npz = np.load(TEST_DATA / "colorizer" / "weights.npz")
    _, order = _variables_txt("colorizer")  # slot N belongs to trainable #N-1 (recorded from the live objects)
    by_tf_name = {v.name: v for v in official_variables(preset("colorizer", "test"))}
    optimizer = make_optimizer(ckpt.model.parameters())
    optimizer.load_state_dict(ckpt.optimizer_state)
    params = dict(ckpt.model.named_parameters())
    for n, name in enumerate(order):
        var = by_tf_name[name]
        velocity = to_torch_layout(npz[f"optimizer/_variables/{n + 1}{VALUE_SUFFIX}"], var.layout)
        state = optimizer.state[params[var.torch_name]]
        np.testing.assert_array_equal(state["square_avg"].numpy(), velocity)
        assert state["step"].item() == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)
    before = {n: p.detach().clone() for n, p in params.items()}
    sum(p.square().sum() for p in params.values()).backward()  # gradient 2p
    optimizer.step()  # RMSprop continues from the TF velocity v: p -= lr g / (sqrt(0.9 v + 0.1 g^2) + eps)
    name = by_tf_name[order[0]].torch_name
    p0, v0 = before[name], optimizer.state[params[name]]["square_avg"]  # v0 already updated to 0.9 v + 0.1 g^2
    velocity = to_torch_layout(npz[f"optimizer/_variables/1{VALUE_SUFFIX}"], by_tf_name[order[0]].layout)
    torch.testing.assert_close(v0, 0.9 * torch.from_numpy(velocity) + 0.1 * (2 * p0) ** 2)
    torch.testing.assert_close(params[name].detach(), p0 - 3e-4 * 2 * p0 / (v0.sqrt() + 1e-7))
    assert optimizer.state[params[name]]["step"].item() == 2


@needs_data
def test_legacy_optimizer_layout_converts_like_the_new_one():
    cfg = preset("color_upsampler", "test")
    new = load_tf_checkpoint(TEST_DATA / "color_upsampler" / "ckpt", cfg)
    old = load_tf_checkpoint(TEST_DATA / "color_upsampler" / "ckpt_legacy_optimizer", cfg)
    assert old.meta["tf_optimizer_layout"] == "legacy" and new.meta["tf_optimizer_layout"] == "tf_keras"
    assert old.step == new.step == 1
    for (name, a), b in zip(new.model.state_dict().items(), old.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(new.ema_state[name], old.ema_state[name]), name
    for p_new, p_old in zip(new.model.parameters(), old.model.parameters(), strict=True):
        s_new, s_old = new.optimizer.state[p_new], old.optimizer.state[p_old]
        torch.testing.assert_close(s_old["square_avg"], s_new["square_avg"], rtol=1e-5, atol=1e-12)
        assert s_old["square_avg"].abs().sum() > 0


@needs_data
def test_mismatched_config_lists_the_differences():
    with pytest.raises(ConversionError) as err:
        load_tf_checkpoint(TEST_DATA / "colorizer" / "ckpt", preset("colorizer", "mid"))
    text = str(err.value)
    assert "mis-shaped model variables" in text and "col_tran_core/auto_logits/kernel: (32, 512) != " \
        "expected (128, 512)" in text
    assert "missing model variables" in text and "dense_" in text  # mid has 2 encoder layers: more FF Dense
    with pytest.raises(ConversionError, match="spatial_upsampler/factorized_attention/position_embed/"
                                              "position_embedding_0: \\(64, 1, 32\\) != expected \\(256"):
        load_tf_checkpoint(TEST_DATA / "spatial_upsampler_64" / "ckpt", preset("spatial_upsampler", "test"))
    with pytest.raises(ConversionError, match="missing model variables .*color_upsampler/dense/kernel"):
        load_tf_checkpoint(TEST_DATA / "colorizer" / "ckpt", preset("color_upsampler", "test"))


@needs_data
def test_missing_extra_and_frozen_tensors_are_reported(tmp_path):
    arrays = dict(np.load(TEST_DATA / "color_upsampler" / "weights.npz"))
    cfg = preset("color_upsampler", "test")
    broken = dict(arrays)
    del broken[variable_key("dense_5/bias")]
    del broken[variable_key("dense_5/bias/ExponentialMovingAverage")]
    del broken[f"optimizer/_variables/3{VALUE_SUFFIX}"]
    broken[variable_key("color_upsampler/extra/kernel")] = np.zeros(3, np.float32)
    np.savez(tmp_path / "broken.npz", **broken)
    with pytest.raises(ConversionError) as err:
        load_tf_checkpoint(tmp_path / "broken.npz", cfg)
    text = str(err.value)
    assert "missing model variables (1): ['dense_5/bias']" in text
    assert "missing EMA shadows (1): ['dense_5/bias']" in text
    assert "unexpected model variables (1): ['color_upsampler/extra/kernel']" in text
    assert "missing RMSprop slots optimizer/_variables/N (1): ['3']" in text
    colorizer = dict(np.load(TEST_DATA / "colorizer" / "weights.npz"))
    colorizer[variable_key("col_tran_core/outer_decoder/conditional_layer_norm/normalize/gamma")] *= 2
    np.savez(tmp_path / "frozen.npz", **colorizer)
    with pytest.raises(ConversionError, match="conditional_layer_norm/normalize/gamma \\(expected all 1\\)"):
        load_tf_checkpoint(tmp_path / "frozen.npz", preset("colorizer", "test"))


@needs_data
def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    ckpt = shutil.copytree(TEST_DATA / "color_upsampler" / "ckpt", tmp_path / "ckpt")
    data = ckpt / "model-1.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        convert_tf_checkpoint(ckpt, "color_upsampler", "test", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_data
def test_cli_single_stage_models_directory_and_errors(tmp_path, capsys):
    yaml_file = tmp_path / "sup64.yaml"
    yaml_file.write_text("stage: spatial_upsampler\npreset: test\nresolution: [64, 64]\n")
    assert main([str(TEST_DATA / "spatial_upsampler_64" / "ckpt"), "--stage", "spatial_upsampler",
                 "--config", str(yaml_file), "--out", str(tmp_path / "sup64")]) == 0
    assert load_checkpoint(tmp_path / "sup64").config.resolution == (64, 64)
    models = tmp_path / "models"
    assert main(["--colorizer", str(TEST_DATA / "colorizer" / "ckpt"),
                 "--color-upsampler", str(TEST_DATA / "color_upsampler" / "ckpt_legacy_optimizer"),
                 "--spatial-upsampler", str(TEST_DATA / "spatial_upsampler_256" / "ckpt"),
                 "--config", "test", "--out", str(models)]) == 0
    for stage in ("colorizer", "color_upsampler", "spatial_upsampler"):
        ckpt = load_checkpoint(models / stage, stage=stage, expected_config=preset(stage, "test"))
        assert ckpt.step == 1 and ckpt.meta["source"] == "convert-tf"
    capsys.readouterr()
    assert main(["--colorizer", str(TEST_DATA / "colorizer" / "ckpt"), "--spatial-upsampler",
                 str(TEST_DATA / "spatial_upsampler_64" / "ckpt"), "--config", "test",
                 "--out", str(tmp_path / "bad")]) == 1
    assert "does not match the spatial_upsampler config" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # every stage is checked before anything is written
    assert main([str(TEST_DATA / "colorizer" / "ckpt"), "--out", str(tmp_path / "x")]) == 1
    assert "--stage" in capsys.readouterr().err
