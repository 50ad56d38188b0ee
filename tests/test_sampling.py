"""Cached sampler against the naive oracle and the teacher-forced network (coltran-reference section 8)."""

import math

import pytest
import torch

from coltran.configs import apply_overrides, preset
from coltran.models import build_model
from coltran.sampling import draw_symbols, make_uniforms, naive_sample_colorizer, sample_colorizer

SMALL = ["resolution=[8,8]"]
VARIANTS = {
    "test": [],
    "deep-2heads": ["num_heads=2", "num_encoder_layers=2", "num_outer_layers=2", "num_inner_layers=2"],
    "no-cond-scale-shift-mlp": ["cond_att_scale=false", "cond_mlp=shift", "cond_att_k=false"],
    "plain-ln-no-skip": ["cond_ln=false", "skip=false", "cond_att_q=false", "cond_att_v=false"],
    "cs-mean-tanh": ["cond_ln_seq=cs", "cond_ln_sp_ave=mean", "cond_ln_act=tanh", "model_stage=decoder"],
    "non-square-4heads": ["resolution=[5,9]", "num_heads=4", "num_outer_layers=3"],
}


def random_colorizer(overrides, seed=0, scale=0.3):
    """A colorizer with non-trivial random weights (fresh init has zero biases and near-uniform outputs)."""
    torch.manual_seed(seed)
    model = build_model(apply_overrides(preset("colorizer", "test"), SMALL + overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def rescored_probs(model, gray, colors3):
    logits, _ = model(gray, colors3.long())
    return torch.softmax(logits[..., 0, :].float(), dim=-1)


def assert_same_draws(a, b, uniforms, tie=1e-5):
    """Identical symbols and probabilities, except that a run may legitimately branch off where the uniform
    lands within `tie` of a CDF boundary (both computations are fp32 with different summation orders)."""
    n, height, width = a.symbols.shape
    for k in range(n):
        sa, sb = a.symbols[k].flatten(), b.symbols[k].flatten()
        differ = (sa != sb).nonzero()
        end = int(differ[0]) if len(differ) else height * width
        pa, pb = a.probs[k].reshape(-1, 512), b.probs[k].reshape(-1, 512)
        assert (pa[: end + 1] - pb[: end + 1]).abs().max() < 1e-5
        if end < height * width:
            cdf = pb[end].double().cumsum(0)
            gap = (cdf - float(uniforms[k, end]) * cdf[-1]).abs().min()
            assert gap < tie, f"sample {k} branches off at pixel {end} without a near-tie (gap {gap:.2e})"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mode", ["argmax", "sample"])
def test_cached_equals_naive_and_teacher_forcing(variant, mode):
    model = random_colorizer(VARIANTS[variant])
    height, width = model.config.resolution
    gray = torch.randint(0, 256, (2, height, width))
    uniforms = make_uniforms([3, 4], 2, height * width)
    cached = sample_colorizer(model, gray, num_samples=2, mode=mode, uniforms=uniforms, return_probs=True)
    naive = naive_sample_colorizer(model, gray.repeat_interleave(2, 0), uniforms, mode=mode, return_probs=True)
    assert_same_draws(cached, naive, uniforms)
    tf = rescored_probs(model, gray.repeat_interleave(2, 0), cached.colors3)
    assert (tf - cached.probs).abs().max() < 1e-5
    chosen = tf.gather(-1, cached.symbols[..., None])[..., 0].log()
    assert (chosen - cached.log_probs).abs().max() < 1e-4


def test_full_size_sample_rescores_exactly():
    torch.manual_seed(1)
    model = build_model(preset("colorizer", "test")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    gray = torch.randint(0, 256, (1, 64, 64))
    out = sample_colorizer(model, gray, mode="sample", seeds=[11], return_probs=True)
    assert (rescored_probs(model, gray, out.colors3) - out.probs).abs().max() < 1e-5
    assert out.colors3.shape == (1, 64, 64, 3) and out.colors3.dtype == torch.uint8
    assert int(out.colors3.max()) <= 7
    assert out.parallel.shape == (1, 64, 64, 3)


def test_batch_equals_items_alone_and_seeds_are_per_image():
    model = random_colorizer([])
    gray = torch.randint(0, 256, (3, 8, 8))
    for mode in ("argmax", "sample"):
        together = sample_colorizer(model, gray, mode=mode, seeds=[5, 6, 7], num_samples=2).symbols
        for k, seed in enumerate([5, 6, 7]):
            alone = sample_colorizer(model, gray[k : k + 1], mode=mode, seeds=[seed], num_samples=2).symbols
            assert torch.equal(together[2 * k : 2 * k + 2], alone)
    again = sample_colorizer(model, gray, seeds=[5, 6, 7]).symbols
    assert torch.equal(again, sample_colorizer(model, gray, seeds=[5, 6, 7]).symbols)
    other = sample_colorizer(model, gray, seeds=[8, 9, 10]).symbols
    assert not torch.equal(again, other)
    two = sample_colorizer(model, gray[:1], seeds=[5], num_samples=2).symbols
    assert not torch.equal(two[0], two[1])  # samples of one image draw from different streams


def test_images_without_seeds_draw_from_their_own_streams_and_are_encoded_once():
    model = random_colorizer([])
    gray = torch.randint(0, 256, (1, 8, 8)).expand(2, -1, -1)  # the same image twice
    encoded = []
    hook = model.encoder.register_forward_hook(lambda mod, args, out: encoded.append(args[0].shape[0]))
    out = sample_colorizer(model, gray, num_samples=3).symbols
    hook.remove()
    assert encoded == [2]  # num_samples repeats z, not the gray input
    assert not torch.equal(out[0], out[3])  # default seeds 0, 1: the two images do not share a stream
    assert torch.equal(out, sample_colorizer(model, gray, num_samples=3, seeds=[0, 1]).symbols)


def test_low_temperature_approaches_argmax():
    model = random_colorizer([])
    gray = torch.randint(0, 256, (2, 8, 8))
    cold = sample_colorizer(model, gray, mode="sample", temperature=1e-4, seeds=[1, 2]).symbols
    assert torch.equal(cold, sample_colorizer(model, gray, mode="argmax").symbols)


def test_inverse_cdf_draws_follow_the_distribution():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0]])
    n = 40_000
    uniforms = make_uniforms([0], 1, n)[0]
    symbols, probs = draw_symbols(logits.expand(n, -1), uniforms, "sample", 1.0)
    freq = torch.bincount(symbols, minlength=5).float() / n
    assert (freq - probs[0]).abs().max() < 0.01
    hot, hot_probs = draw_symbols(logits.expand(n, -1), uniforms, "sample", 2.0)
    assert (torch.bincount(hot, minlength=5).float() / n - hot_probs[0]).abs().max() < 0.01
    assert hot_probs[0].max() < probs[0].max()  # a higher temperature flattens the distribution


def test_a_zero_probability_symbol_is_never_drawn():
    logits = torch.tensor([[-math.inf, 0.0, -math.inf, 1.0], [0.0, -math.inf, 2.0, -math.inf]])
    for u in (0.0, 1e-9, 0.5, 1.0 - 2**-24):
        symbols, probs = draw_symbols(logits, torch.full((2,), u), "sample")
        assert (probs.gather(1, symbols[:, None]) > 0).all(), u
    assert draw_symbols(logits, torch.zeros(2), "sample")[0].tolist() == [1, 0]  # first possible symbol at u = 0


def test_official_row_cln_differs_from_trained_behaviour():
    model = random_colorizer([])
    gray = torch.randint(0, 256, (2, 8, 8))
    full = sample_colorizer(model, gray, mode="argmax", return_probs=True)
    row = sample_colorizer(model, gray, mode="argmax", official_row_cln=True, return_probs=True)
    assert (full.probs - row.probs).abs().max() > 1e-3


def test_bad_arguments_are_rejected():
    model = random_colorizer([])
    with pytest.raises(ValueError, match="mode"):
        sample_colorizer(model, torch.zeros(1, 8, 8), mode="greedy")
    with pytest.raises(ValueError, match="temperature"):
        sample_colorizer(model, torch.zeros(1, 8, 8), temperature=0)
    with pytest.raises(ValueError, match=r"\(B, 8, 8\)"):
        sample_colorizer(model, torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="seeds"):
        sample_colorizer(model, torch.zeros(2, 8, 8), seeds=[1])
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        sample_colorizer(model, torch.zeros(1, 8, 8))
