"""The three ColTran models: official parameter counts, shape oracles, exact causality of the colorizer,
auxiliary-head and upsampler-channel independence, and the bits/dim losses (coltran-reference.md section 8)."""

from __future__ import annotations

import math

import pytest
import torch

from coltran.configs import apply_overrides, preset
from coltran.models import OuterDecoder, build_model, count_parameters
from coltran.models.upsampler import ARGMAX_ROWS
from coltran.transforms import colors_to_symbols, rgb_to_gray

COUNTS = {
    ("colorizer", "full"): 46_310_400, ("color_upsampler", "full"): 13_476_608,
    ("spatial_upsampler", "full"): 10_910_464, ("colorizer", "test"): 172_384,
    ("color_upsampler", "test"): 36_512, ("spatial_upsampler", "test"): 73_376,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: a second OpenMP thread mostly spin-waits on a shared 2-core machine (about 3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(stage: str, res=(5, 7), **overrides):
    """The `test` preset at a small (non-square, to catch H/W mix-ups) resolution, in eval mode."""
    torch.manual_seed(0)
    return build_model(apply_overrides(preset(stage, "test"), {"resolution": list(res), **overrides})).eval()


def rand_batch(seed: int, b: int, h: int, w: int, prefix: str = "64"):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8)
    return {f"rgb_{prefix}": rgb, f"gray_{prefix}": torch.as_tensor(rgb_to_gray(rgb))}


def rand_colors(seed: int, b: int, h: int, w: int):
    return torch.randint(0, 8, (b, h, w, 3), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stage, size", sorted(COUNTS))
def test_parameter_counts_equal_official(stage, size):
    assert count_parameters(build_model(preset(stage, size))) == COUNTS[(stage, size)]


def test_shapes():
    col = small("colorizer")
    gray = torch.randint(0, 256, (2, 5, 7))
    logits, aux = col(gray, rand_colors(0, 2, 5, 7))
    assert logits.shape == aux.shape == (2, 5, 7, 1, 512)
    assert col.encode(gray).shape == (2, 5, 7, 32)
    for stage in ("color_upsampler", "spatial_upsampler"):
        up = small(stage)
        vmax = 8 if stage == "color_upsampler" else 256
        tokens = torch.randint(0, vmax, (2, 5, 7, 3))
        assert up(gray, tokens).shape == (2, 5, 7, 3, 256)
        assert up(gray, tokens[..., 1:2], torch.tensor([1, 2])).shape == (2, 5, 7, 1, 256)
        assert up.predict(gray, tokens).shape == (2, 5, 7, 3) and up.predict(gray, tokens).dtype == torch.uint8
    assert count_parameters(col.encoder.encoder.pos_embed) == 5 * 32 + 7 * 32


def test_spatial_upsampler_shape_at_256():
    up = build_model(preset("spatial_upsampler", "test")).eval()
    gray, tokens = torch.randint(0, 256, (1, 256, 256)), torch.randint(0, 256, (1, 256, 256, 1))
    with torch.no_grad():  # one channel: (B, H, W, 3, 256) is checked at a small resolution in test_shapes
        assert up(gray, tokens, torch.tensor([2])).shape == (1, 256, 256, 1, 256)


def test_upsampler_argmax_prediction_is_the_argmax_of_its_logits():
    """predict takes the final dense and argmax a slice of positions at a time (ARGMAX_ROWS): the pick must be the
    argmax of the whole logits tensor that forward gives, across slice boundaries and images of a batch."""
    torch.manual_seed(0)
    up = build_model(apply_overrides(preset("spatial_upsampler", "test"), ["resolution=[48,96]"])).eval()
    with torch.no_grad():
        for p in up.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # away from the fresh init's flat logits
        gray, tokens = torch.randint(0, 256, (2, 48, 96)), torch.randint(0, 256, (2, 48, 96, 3))
        logits = [up.channel_logits(gray, tokens, c) for c in range(3)]
        for c in range(3):  # one channel alone gives what forward gives for its slice
            assert torch.equal(logits[c], up(gray, tokens[..., c : c + 1], torch.full((2,), c))[..., 0, :])
        whole = torch.stack([channel.argmax(-1) for channel in logits], -1)
        assert 2 * 48 * 96 > ARGMAX_ROWS  # more than one slice
        assert torch.equal(up.predict(gray, tokens), whole.to(torch.uint8))


def _hooked_logits(model, module, *inputs):
    """Logits with `module`'s output made a leaf that requires grad (a continuous stand-in for the input)."""
    leaf = {}

    def hook(_mod, _inp, out):
        leaf["x"] = out.detach().requires_grad_(True)
        return leaf["x"]

    handle = module.register_forward_hook(hook)
    try:
        out = model(*inputs)
    finally:
        handle.remove()
    return (out[0] if isinstance(out, tuple) else out), leaf["x"]


def _dependency(logits_at, leaf):
    """(B, H, W) bool: which input positions the scalar-valued `logits_at` depends on."""
    w = torch.randn(logits_at.shape[-1], generator=torch.Generator().manual_seed(7), dtype=logits_at.dtype)
    (grad,) = torch.autograd.grad((logits_at * w).sum(), leaf, retain_graph=True)
    return grad.abs().sum(-1) != 0


def _causal_mask(h, w, i, j):
    raster = torch.arange(h * w).view(h, w)
    return raster < i * w + j


@pytest.mark.parametrize("res, positions", [
    ((5, 7), "all"),
    ((64, 64), [(0, 0), (0, 63), (31, 17), (63, 0), (63, 63)]),
])
def test_colorizer_causality_by_gradient(res, positions):
    h, w = res
    model = small("colorizer", res)
    gray = torch.randint(0, 256, (2, h, w))
    logits, emb = _hooked_logits(model, model.pixel_embed, gray, rand_colors(1, 2, h, w))
    if positions == "all":
        positions = [(i, j) for i in range(h) for j in range(w)]
    for i, j in positions:
        dep = _dependency(logits[0, i, j, 0], emb)
        assert torch.equal(dep[0], _causal_mask(h, w, i, j)), (i, j)
        assert not dep[1].any()  # examples of a batch never mix


@pytest.mark.parametrize("res", [(5, 7), (64, 64)])
def test_colorizer_causality_by_perturbation(res):
    h, w = res
    model = small("colorizer", res)
    gray, colors = torch.randint(0, 256, (1, h, w)), rand_colors(2, 1, h, w)
    raster = torch.arange(h * w).view(1, h, w)
    with torch.no_grad():
        base = model(gray, colors)[0][0, ..., 0, :]
        corners = [(0, 0), (0, w - 1), (1, 0), (h // 2, w // 2), (h - 1, 0), (h - 1, w - 1)]
        for i, j in corners if h * w <= 64 else corners[1::2]:
            p = i * w + j
            later = (colors + torch.randint(1, 8, colors.shape)) % 8  # every channel differs
            tail = model(gray, torch.where((raster >= p)[..., None], later, colors))[0][0, ..., 0, :]
            assert torch.equal(tail.view(h * w, -1)[: p + 1], base.view(h * w, -1)[: p + 1]), (i, j)
            one = model(gray, torch.where((raster == p)[..., None], later, colors))[0][0, ..., 0, :]
            diff = (one != base).any(-1).view(-1)
            assert not diff[: p + 1].any() and diff[p + 1 : p + 2].all(), (i, j)
            if h * w <= 64:  # at 64x64 far effects can round to exactly 0 in fp32 (the gradient test covers it)
                assert diff[p + 1 :].all(), (i, j)


def test_outer_decoder_row_zero_and_row_causality():
    cfg = apply_overrides(preset("colorizer", "test"), {"resolution": [5, 7]})
    torch.manual_seed(0)
    outer = OuterDecoder(cfg).eval()
    for scale in (1e-3, 1.0, 1e3):
        u = outer(scale * torch.randn(2, 5, 7, 32), scale * torch.randn(2, 5, 7, 32))
        assert torch.equal(u[:, 0], torch.zeros_like(u[:, 0]))
    emb = torch.randn(2, 5, 7, 32, requires_grad=True)
    u = outer(emb, torch.randn(2, 5, 7, 32))
    for i in range(1, 5):
        dep = _dependency(u[0, i, 3], emb)[0]
        assert dep[:i].all() and not dep[i:].any(), i


@pytest.mark.parametrize("overrides", [
    {"num_heads": 2, "num_outer_layers": 2, "num_inner_layers": 2},
    {"cond_ln": False, "skip": False, "cond_mlp": "shift", "cond_att_scale": False},
])
def test_decoder_steps_equal_teacher_forcing(overrides):
    """OuterDecoder.step row by row and InnerDecoder.step pixel by pixel, against their key/value caches, give
    what forward gives (float64): the one code path the sampler runs."""
    h, w = 4, 6
    model = small("colorizer", (h, w), **overrides).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        z = model.encode(torch.randint(0, 256, (2, h, w)))
        emb = model.pixel_embed(colors_to_symbols(rand_colors(4, 2, h, w)))
        upper = model.outer_decoder(emb, z)
        inner = model.inner_decoder(emb, upper, z)
        outer_cache = model.outer_decoder.new_cache(z, torch.float64)
        inner_cache = model.inner_decoder.new_cache(z, torch.float64)
        for i in range(h):
            outer_cache.position.fill_(i)
            if i + 1 < h:  # the output of row i is u of row i + 1 (shift down)
                got = model.outer_decoder.step(emb[:, i : i + 1], z[:, i : i + 1], outer_cache)
                torch.testing.assert_close(got, upper[:, i + 1 : i + 2], rtol=1e-12, atol=1e-12)
            model.inner_decoder.start_row(z[:, i : i + 1], upper[:, i : i + 1], inner_cache)
            for j in range(w):
                previous = emb[:, i : i + 1, j - 1 : j] if j else torch.zeros_like(emb[:, :1, :1])
                got = model.inner_decoder.step(previous, outer_cache.position, inner_cache)
                torch.testing.assert_close(got, inner[:, i : i + 1, j : j + 1], rtol=1e-12, atol=1e-12)
                inner_cache.position.add_(1)


def test_aux_head_depends_only_on_gray():
    model = small("colorizer")
    batch = rand_batch(3, 2, 5, 7)
    recolored = ((batch["rgb_64"].long() + 32 * torch.randint(1, 8, (2, 5, 7, 3))) % 256).to(torch.uint8)
    c1, c2 = batch["rgb_64"].long() // 32, recolored.long() // 32
    z = []
    handle = model.encoder.register_forward_hook(lambda _m, _i, out: z.append(out))
    with torch.no_grad():
        (l1, a1), (l2, a2) = model(batch["gray_64"], c1), model(batch["gray_64"], c2)
        a3 = model(batch["gray_64"] ^ 1, c1)[1]
        _, m1 = model.loss(batch)
        _, m2 = model.loss({**batch, "rgb_64": recolored})
    handle.remove()
    assert torch.equal(z[0], z[1]) and not torch.equal(z[0], z[2])  # same gray, other colours: same z
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    assert not torch.equal(l1, l2) and m1["loss"] != m2["loss"]  # the decoder does see the colours


def _bits(logits, labels):
    return (-logits.double().log_softmax(-1).gather(-1, labels[..., None]).mean() / math.log(2)).item()


def test_colorizer_loss_is_weighted_bits_per_pixel():
    batch = rand_batch(4, 2, 5, 7)
    for factors in ({}, {"loss_factor": 0.25, "encoder_loss_factor": 0.75}):
        model = small("colorizer", **factors)
        with torch.no_grad():
            total, m = model.loss(batch)
            logits, aux = model(batch["gray_64"], batch["rgb_64"].long() // 32)
        labels = colors_to_symbols(batch["rgb_64"].long() // 32)
        assert m["loss"].item() == pytest.approx(_bits(logits[..., 0, :], labels), abs=1e-5)
        assert m["encoder"].item() == pytest.approx(_bits(aux[..., 0, :], labels), abs=1e-5)
        lf, ef = model.config.loss_factor, model.config.encoder_loss_factor
        assert total.item() == pytest.approx(lf * m["loss"].item() + ef * m["encoder"].item(), abs=1e-5)
    decoder_only = small("colorizer", model_stage="decoder")
    total, m = decoder_only.loss(batch)
    assert decoder_only.parallel_dense is None and "encoder" not in m
    assert total.item() == pytest.approx(0.99 * m["loss"].item(), abs=1e-6)


def test_zero_logits_give_uniform_bits():
    col = small("colorizer")
    with torch.no_grad():
        for p in (col.final_dense.weight, col.final_dense.bias, col.parallel_dense.weight):
            p.zero_()
    total, m = col.loss(rand_batch(5, 2, 5, 7))
    assert m["loss"].item() == m["encoder"].item() == pytest.approx(9.0, abs=1e-5)
    assert total.item() == pytest.approx(9.0, abs=1e-5)
    for stage in ("color_upsampler", "spatial_upsampler"):
        up = small(stage)
        with torch.no_grad():
            up.final_dense.weight.zero_(), up.final_dense.bias.zero_()
        batch = {**rand_batch(6, 2, 5, 7), **rand_batch(7, 2, 5, 7, "256")}
        for random_channel in (True, False):
            assert up.loss(batch, random_channel)[0].item() == pytest.approx(8.0, abs=1e-5)


@pytest.mark.parametrize("stage", ["color_upsampler", "spatial_upsampler"])
def test_upsampler_loss_is_bits_per_subpixel(stage):
    up = small(stage)
    batch = {**rand_batch(8, 3, 5, 7), **rand_batch(9, 3, 5, 7, "256")}
    key = "64" if stage == "color_upsampler" else "256"
    tokens = batch["rgb_64"].long() // 32 if stage == "color_upsampler" else batch["rgb_64"].long()
    labels, gray = batch[f"rgb_{key}"].long(), batch[f"gray_{key}"]
    with torch.no_grad():
        assert up.loss(batch, False)[0].item() == pytest.approx(_bits(up(gray, tokens), labels), abs=1e-5)
        index = torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(11))
        pick = index.view(3, 1, 1, 1).expand(3, 5, 7, 1)
        want = _bits(up(gray, tokens.gather(-1, pick), index), labels.gather(-1, pick))
        got = up.loss(batch, True, generator=torch.Generator().manual_seed(11))[0].item()
    assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("stage", ["color_upsampler", "spatial_upsampler"])
def test_upsampler_channels_are_independent(stage):
    up = small(stage, (6, 6))
    vmax = 8 if stage == "color_upsampler" else 256
    gray, tokens = torch.randint(0, 256, (1, 6, 6)), torch.randint(0, vmax, (1, 6, 6, 3))
    with torch.no_grad():
        base = up(gray, tokens)
        for c in range(3):
            moved = tokens.clone()
            moved[..., c] = (moved[..., c] + 1) % vmax
            out = up(gray, moved)
            for other in range(3):
                assert torch.equal(out[..., other, :], base[..., other, :]) == (other != c), (c, other)
            sliced = up(gray, tokens[..., c : c + 1], torch.tensor([c]))[..., 0, :]
            torch.testing.assert_close(sliced, base[..., c, :], rtol=1e-5, atol=1e-5)
            wrong = up(gray, tokens[..., c : c + 1], torch.tensor([(c + 1) % 3]))[..., 0, :]
            assert not torch.allclose(wrong, base[..., c, :], atol=1e-3)  # the channel offset matters
        assert not (up(gray ^ 1, tokens) == base).all(-1).any()


@pytest.mark.parametrize("stage", ["color_upsampler", "spatial_upsampler"])
def test_upsampler_pixel_depends_on_every_pixel(stage):
    up = small(stage, (6, 9))
    vmax = 8 if stage == "color_upsampler" else 256
    gray, tokens = torch.randint(0, 256, (1, 6, 9)), torch.randint(0, vmax, (1, 6, 9, 3))
    logits, tok = _hooked_logits(up, up.token_embed, gray, tokens)  # tok (B, C, H, W, D)
    for i, j, c in [(0, 0, 0), (5, 8, 2), (3, 4, 1)]:
        dep = _dependency(logits[0, i, j, c], tok)[0]
        assert dep[c].all() and not dep[[k for k in range(3) if k != c]].any(), (i, j, c)
    logits, g = _hooked_logits(up, up.gray_embed, gray, tokens)
    assert _dependency(logits[0, 2, 7, 1], g)[0].all()


@pytest.mark.parametrize("stage", ["colorizer", "color_upsampler", "spatial_upsampler"])
def test_test_preset_forward_backward_on_cpu(stage):
    model = build_model(preset(stage, "test")).train()
    batch = {**rand_batch(10, 1, 64, 64), **rand_batch(11, 1, 256, 256, "256")}
    loss, _ = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)  # its CPU time is benchmarks/unit_costs.py's business
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_network_switches_change_the_network():
    base = count_parameters(small("colorizer"))
    assert count_parameters(small("colorizer", cond_ln=False)) != base
    assert count_parameters(small("colorizer", cond_mlp="shift")) < base
    assert count_parameters(small("colorizer", cond_att_q=False)) < base
    assert count_parameters(small("colorizer", cond_att_scale=False)) < base
    assert count_parameters(small("colorizer", cond_ln_sp_ave="mean")) == base - 6 * 35
    gray, colors = torch.randint(0, 256, (1, 5, 7)), rand_colors(12, 1, 5, 7)
    torch.manual_seed(0)
    a = small("colorizer")(gray, colors)[0]
    b = small("colorizer", skip=False)(gray, colors)[0]
    assert not torch.allclose(a, b)
