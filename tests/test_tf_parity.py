"""Converted official TF checkpoints reproduce the official ColTran outputs (fp32, CPU): teacher-forced logits,
per-pixel summaries, losses (raw and EMA weights) and the upsamplers' argmax outputs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import needs_shared_data

from coltran.checkpoint import load_checkpoint
from coltran.configs import config_from_dict, preset
from coltran.convert.convert import convert_tf_checkpoint
from coltran.losses import bits_per_dim
from coltran.transforms import colors_to_symbols, from_3bit, rgb_to_gray, symbols_to_colors, to_3bit

TEST_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "official-coltran-tf" / "test"
pytestmark = needs_shared_data(TEST_DATA)
LOGIT_TOL = 1e-4  # absolute, on logits and their logsumexp / max / gap / label value
PROBA_TOL = 1e-5  # absolute, on softmax probabilities
LOSS_TOL = 1e-5  # bits per dim
TIE_GAP = 1e-3  # argmax is compared where top-1 minus top-2 exceeds this
STAGES = {"colorizer": "colorizer", "color_upsampler": "color_upsampler",
          "spatial_upsampler_64": "spatial_upsampler", "spatial_upsampler_256": "spatial_upsampler"}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _config(folder: str):
    meta = json.loads((TEST_DATA / folder / "meta.json").read_text())
    cfg = preset(STAGES[folder], "test")
    return config_from_dict({"resolution": list(meta["resolution"])}, base=cfg)  # 64x64 except the 256 upsampler


@pytest.fixture(scope="module")
def fixture(request, tmp_path_factory):
    """(raw model, EMA model, io arrays, scalars) of one folder, converted from its real TF checkpoint files."""
    folder = request.param
    out = convert_tf_checkpoint(TEST_DATA / folder / "ckpt", STAGES[folder], _config(folder),
                                tmp_path_factory.mktemp(folder) / "ckpt")
    raw = load_checkpoint(out, weights="model").model
    ema = load_checkpoint(out, weights="ema").model
    io = dict(np.load(TEST_DATA / folder / "io.npz"))
    scalars = json.loads((TEST_DATA / folder / "meta.json").read_text())["scalars"]
    return raw, ema, io, scalars


def _gray(io, rgb_key):
    gray = rgb_to_gray(torch.from_numpy(io[rgb_key]))
    np.testing.assert_array_equal(gray.numpy(), io["gray"][..., 0])  # TF's rgb_to_grayscale, bit for bit
    return gray


def _selected(values: np.ndarray, io) -> np.ndarray:
    return values[io["sel_b"], io["sel_h"], io["sel_w"]]


def check_summaries(prefix: str, values: np.ndarray, io, labels: np.ndarray, tol: float) -> None:
    """Compare every stored `prefix_*` summary of the class vectors `values` (..., K)."""
    np.testing.assert_allclose(_selected(values, io), io[f"{prefix}_sel"], rtol=0, atol=tol)
    v64 = values.astype(np.float64)
    top2 = np.sort(values, axis=-1)[..., -2:]
    clear = io[f"{prefix}_top2gap"] > TIE_GAP
    assert clear.mean() > 0.95, f"{prefix}: too many near-ties for a meaningful argmax check"
    np.testing.assert_array_equal(values.argmax(-1)[clear], io[f"{prefix}_argmax"][clear])
    np.testing.assert_allclose(top2[..., 1], io[f"{prefix}_max"], rtol=0, atol=tol)
    np.testing.assert_allclose(top2[..., 1] - top2[..., 0], io[f"{prefix}_top2gap"], rtol=0, atol=tol)
    lse = np.logaddexp.reduce(v64, axis=-1)
    np.testing.assert_allclose(lse, io[f"{prefix}_lse"], rtol=0, atol=tol)
    at_label = np.take_along_axis(values, labels[..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(at_label, io[f"{prefix}_at_label"], rtol=0, atol=tol)
    # A projection on 4 random directions; if every entry is within tol/10, it is within this bound.
    proj_tol = tol / 10 * np.abs(io["proj"]).sum(0)
    proj_diff = np.abs(v64 @ io["proj"] - io[f"{prefix}_proj"])
    assert np.all(proj_diff <= proj_tol), f"{prefix}_proj: max |diff| {proj_diff.max():.3g} > {proj_tol.min():.3g}"


def _bits(logits: torch.Tensor, labels) -> float:
    return bits_per_dim(logits, torch.as_tensor(labels)).item()


# ---- colorizer -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["colorizer"], indirect=True)
def test_colorizer_teacher_forced_logits_and_losses(fixture):
    raw, ema, io, scalars = fixture
    gray, rgb = _gray(io, "rgb"), torch.from_numpy(io["rgb"])
    with torch.no_grad():
        logits, enc_logits = raw(gray, to_3bit(rgb))
        _, ema_metrics = ema.loss({"gray_64": gray, "rgb_64": rgb})
    assert logits.shape == enc_logits.shape == (2, 64, 64, 1, 512)
    labels = colors_to_symbols(to_3bit(io["rgb"]))
    np.testing.assert_array_equal(labels, io["labels"])
    check_summaries("logits", logits[..., 0, :].numpy(), io, labels, LOGIT_TOL)
    check_summaries("enc_logits", enc_logits[..., 0, :].numpy(), io, labels, LOGIT_TOL)
    loss, enc_loss = _bits(logits[..., 0, :], labels), _bits(enc_logits[..., 0, :], labels)
    metrics = {"loss": loss, "encoder": enc_loss, "total_loss": 0.99 * loss + 0.01 * enc_loss}
    for key in ("loss", "encoder", "total_loss"):
        assert abs(metrics[key] - scalars["eval_losses"][key]) < LOSS_TOL, key
        assert abs(ema_metrics[key].item() - scalars["ema_eval_losses"][key]) < LOSS_TOL, key
    # The official sampler's 'parallel' image is the argmax of the encoder logits, as coarse RGB.
    clear = io["enc_logits_top2gap"] > TIE_GAP
    parallel = from_3bit(symbols_to_colors(enc_logits[..., 0, :].argmax(-1))).numpy()
    np.testing.assert_array_equal(parallel[clear], io["sample_parallel"][clear])


@pytest.mark.parametrize("fixture", ["colorizer"], indirect=True)
def test_colorizer_teacher_forcing_on_the_official_sample(fixture):
    """tf_logits / tf_proba: the decoder on the official argmax sample with the whole-image encoder output."""
    raw, _, io, _ = fixture
    sample = torch.from_numpy(io["sample_auto_argmax"].astype(np.int64))
    symbols = colors_to_symbols(to_3bit(sample)).numpy()
    np.testing.assert_array_equal(symbols, io["sample_symbols"])
    with torch.no_grad():
        logits = raw(_gray(io, "rgb"), to_3bit(sample))[0][..., 0, :]
    check_summaries("tf_logits", logits.numpy(), io, symbols, LOGIT_TOL)
    check_summaries("tf_proba", torch.softmax(logits, -1).numpy(), io, symbols, PROBA_TOL)


# ---- upsamplers at 64x64 -------------------------------------------------------------------------------------
def _upsampler_batch(folder: str, io):
    """(gray, train tokens, train labels, eval tokens, eval labels, sample tokens, official sample, loss batch)."""
    if folder == "color_upsampler":
        gray = _gray(io, "targets_64")
        rgb = torch.from_numpy(io["targets_64"])
        np.testing.assert_array_equal(to_3bit(io["targets_64"]), io["bit_cond_3bit"])
        return (gray, to_3bit(io["targets_slice_64"]), io["targets_slice_64"], to_3bit(rgb), io["targets_64"],
                io["bit_cond_3bit"], io["sample_bit_up_argmax"], {"gray_64": gray, "rgb_64": rgb})
    gray = _gray(io, "targets")
    batch = {"gray_256": gray, "rgb_256": torch.from_numpy(io["targets"]), "rgb_64": torch.from_numpy(io["targets_low"])}
    return (gray, io["targets_slice_64_up_back"], io["targets_slice"], io["targets_64_up_back"], io["targets"],
            io["targets_64_up_back"], io["sample_high_res_argmax"], batch)


@pytest.mark.parametrize("fixture", ["color_upsampler", "spatial_upsampler_64"], indirect=True)
def test_upsampler_logits_losses_and_argmax(fixture, request):
    raw, ema, io, scalars = fixture
    folder = request.node.callspec.params["fixture"]
    gray, train_in, train_labels, eval_in, eval_labels, sample_in, official, batch = _upsampler_batch(folder, io)
    with torch.no_grad():
        train_logits = raw(gray, torch.as_tensor(train_in), torch.from_numpy(io["channel_index"]))
        eval_logits = raw(gray, torch.as_tensor(eval_in))
        predicted = raw.predict(gray, torch.as_tensor(sample_in), mode="argmax").numpy()
        _, ema_metrics = ema.loss(batch, random_channel=False)
    assert train_logits.shape == (2, 64, 64, 1, 256) and eval_logits.shape == (2, 64, 64, 3, 256)
    check_summaries("train_logits", train_logits.numpy(), io, train_labels, LOGIT_TOL)
    check_summaries("eval_logits", eval_logits.numpy(), io, eval_labels, LOGIT_TOL)
    assert abs(_bits(train_logits, train_labels) - scalars["train_losses"]["loss"]) < LOSS_TOL
    assert abs(_bits(eval_logits, eval_labels) - scalars["eval_losses"]["loss"]) < LOSS_TOL
    assert abs(ema_metrics["loss"].item() - scalars["ema_eval_losses"]["loss"]) < LOSS_TOL
    clear = io["eval_logits_top2gap"] > TIE_GAP
    np.testing.assert_array_equal(predicted[clear], official[clear])


# ---- spatial upsampler at 256x256: 3 channel passes with raw and 3 with EMA weights ---------------------------
def _channel_pass_stats(model, gray, tokens, labels, io):
    """`model.predict` (argmax), and from each channel's logits (`channel_logits`, the ones predict picks from)
    what the fixture stores."""
    stats = {"sel": [], "logp": [], "nats": [], "gap": []}
    tokens = torch.as_tensor(tokens)
    with torch.no_grad():
        predicted = model.predict(gray, tokens, mode="argmax").numpy()
        for c in range(tokens.shape[-1]):
            logits = model.channel_logits(gray, tokens, c)
            logp = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(labels[..., c, None]).long())[..., 0]
            top2 = logits.topk(2, dim=-1).values
            stats["sel"].append(_selected(logits.numpy(), io))
            stats["logp"].append(logp.numpy())
            stats["nats"].append(-logp.double().sum().item())
            stats["gap"].append((top2[..., 0] - top2[..., 1]).numpy())
    return predicted, {k: np.stack(v, axis=-1) if k != "nats" else v for k, v in stats.items()}


@pytest.mark.parametrize("fixture", ["spatial_upsampler_256"], indirect=True)
def test_spatial_upsampler_256(fixture):
    raw, ema, io, scalars = fixture
    gray = _gray(io, "targets")
    labels, tokens = io["targets"], io["targets_64_up_back"]
    predicted, stats = _channel_pass_stats(raw, gray, tokens, labels, io)
    np.testing.assert_allclose(stats["sel"].transpose(0, 2, 1), io["eval_logits_sel"], rtol=0, atol=LOGIT_TOL)
    np.testing.assert_allclose(stats["logp"], io["eval_logits_logp_label"], rtol=0, atol=LOGIT_TOL)
    pixels = labels.size
    assert abs(sum(stats["nats"]) / pixels / math.log(2) - scalars["eval_losses"]["loss"]) < LOSS_TOL
    clear = stats["gap"] > TIE_GAP
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(predicted[clear], io["sample_high_res_argmax"][clear])
    # Training mode scores one channel per example; channels never interact, so its logits are the eval
    # logits of that channel (checked: the training slice is that channel of the eval input).
    channel = io["channel_index"]
    for b, c in enumerate(channel):
        np.testing.assert_array_equal(io["targets_slice_64_up_back"][b, ..., 0], tokens[b, ..., c])
    picked = stats["logp"][np.arange(2), ..., channel]  # (B, H, W)
    np.testing.assert_allclose(picked, io["train_logits_logp_label"][..., 0], rtol=0, atol=LOGIT_TOL)
    train_sel = stats["sel"][np.arange(len(io["sel_b"])), :, channel[io["sel_b"]]]
    np.testing.assert_allclose(train_sel, io["train_logits_sel"][:, 0], rtol=0, atol=LOGIT_TOL)
    assert abs(-picked.astype(np.float64).mean() / math.log(2) - scalars["train_losses"]["loss"]) < LOSS_TOL
    _, ema_stats = _channel_pass_stats(ema, gray, tokens, labels, io)
    assert abs(sum(ema_stats["nats"]) / pixels / math.log(2) - scalars["ema_eval_losses"]["loss"]) < LOSS_TOL


@pytest.mark.parametrize("fixture", ["colorizer"], indirect=True)
def test_official_sampler_reproduced_with_row_only_cln(fixture):
    """With `official_row_cln=True` the cached sampler's argmax chain is the official `sample_auto_argmax`,
    with the official per-pixel probabilities; with the trained (whole-image) cLN it is not."""
    from coltran.sampling import sample_colorizer

    raw, _, io, _ = fixture
    gray = torch.from_numpy(io["gray"][..., 0])
    out = sample_colorizer(raw, gray, mode="argmax", official_row_cln=True, return_probs=True)
    np.testing.assert_array_equal(out.symbols.numpy(), io["sample_symbols"])
    np.testing.assert_array_equal(from_3bit(out.colors3).numpy(), io["sample_auto_argmax"])
    np.testing.assert_array_equal(from_3bit(out.parallel).numpy(), io["sample_parallel"])
    probs = out.probs.numpy()
    np.testing.assert_allclose(_selected(probs, io), io["sample_proba_sel"], rtol=0, atol=PROBA_TOL)
    np.testing.assert_allclose(probs.max(-1), io["sample_proba_max"], rtol=0, atol=PROBA_TOL)
    trained = sample_colorizer(raw, gray, mode="argmax")
    assert (trained.symbols.numpy() != io["sample_symbols"]).mean() > 0.1
