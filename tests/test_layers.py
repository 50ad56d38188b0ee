"""Building blocks against independent reference formulas: axial attention, cLN, cMLP, shifts, position
embeddings, and TF-equivalent initialisation (coltran-reference.md sections 2.1, 7 and 8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coltran.nn import (
    AxialAttention,
    ConditionalLayerNorm,
    ConditionalMLP,
    FeedForward,
    PositionEmbedding,
    shift_down,
    shift_right,
)
from coltran.nn.init import dense, one_hot_dense

ACTS = {"identity": lambda t: t, "tanh": torch.tanh}


def reference_attention(layer: AxialAttention, x, context=None, act=ACTS["identity"]):
    """Plain einsum version of the official SelfAttentionND restricted to one axis (float64)."""
    h, c = layer.num_heads, layer.head_size
    d = x.shape[-1]

    def project(lin, cond):
        t = torch.einsum("...d,dhc->...hc", x, lin.weight.T.reshape(d, h, c))
        if cond is None:
            return t
        out = torch.einsum("...e,ehk->...hk", context, cond.weight.T.reshape(context.shape[-1], h, -1))
        if layer.cond_scale:  # [scale | shift], activation on both
            return t * act(out[..., :c]) + act(out[..., c:])
        return t + out  # shift only: no activation, as the official code

    q = project(layer.q, layer.cond_q) * c**-0.5
    k, v = project(layer.k, layer.cond_k), project(layer.v, layer.cond_v)
    length = layer.length
    bias = torch.zeros(h, length, length, dtype=x.dtype)
    for i in range(length):  # query
        for j in range(length):  # key
            bias[:, i, j] = layer.rel_bias[:, j - i + length - 1]
            if layer.causal and j > i:
                bias[:, i, j] += -1e6
    if layer.axis == "row":
        logits = torch.einsum("...yihc,...yjhc->...yhij", q, k) + bias
        out = torch.einsum("...yhij,...yjhc->...yihc", logits.softmax(-1), v)
    else:
        logits = torch.einsum("...ixhc,...jxhc->...xhij", q, k) + bias
        out = torch.einsum("...xhij,...jxhc->...ixhc", logits.softmax(-1), v)
    return torch.einsum("...hc,hcd->...d", out, layer.out.weight.T.reshape(h, c, d))


@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cond", [None, "scale", "shift"])
def test_axial_attention_matches_einsum_reference(axis, causal, cond):
    torch.manual_seed(0)
    height, width, d, h, dc = 5, 7, 8, 2, 6
    kwargs = {}
    if cond:
        kwargs = dict(cond_size=dc, cond_q=True, cond_k=True, cond_v=True, cond_scale=cond == "scale",
                      cond_act="tanh")
    layer = AxialAttention(d, h, axis, width if axis == "row" else height, causal=causal, **kwargs).double()
    with torch.no_grad():
        layer.rel_bias.normal_()  # zero at init; make it matter
    x = torch.randn(2, 3, height, width, d, dtype=torch.float64, requires_grad=True)  # two leading axes
    ctx = torch.randn(2, 3, height, width, dc, dtype=torch.float64) if cond else None
    out = layer(x, layer.condition(ctx))
    assert out.shape == x.shape
    ref = reference_attention(layer, x, ctx, ACTS["tanh"])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # gradients too: the fused kernel's backward must carry the additive bias and the mask
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [x, layer.rel_bias, layer.q.weight])
    refs = torch.autograd.grad((ref * w).sum(), [x, layer.rel_bias, layer.q.weight])
    for g, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    with torch.no_grad():  # fp32 inference may take a fused kernel rather than the math path
        layer.float()
        out32 = layer(x.float(), layer.condition(ctx.float() if cond else None))
    torch.testing.assert_close(out32, ref.float(), rtol=1e-4, atol=1e-5)


def test_bias_matrix_relative_index_and_causal_mask():
    layer = AxialAttention(4, 1, "row", 4, causal=True)
    with torch.no_grad():
        layer.rel_bias.copy_(torch.arange(8.0)[None])
    bias = layer.bias_matrix()[0]
    for i in range(4):
        for j in range(4):
            assert bias[i, j] == (j - i + 3 if j <= i else -1e6), (i, j)  # diagonal kept


@pytest.mark.parametrize("axis", ["row", "column"])
def test_causal_attention_stepped_through_a_cache_equals_forward(axis):
    """One position at a time along the axis, against a KVCache whose unwritten slots hold stale values (a
    previous row's): each step gives forward's output at that position."""
    torch.manual_seed(5)
    height, width, d, h, dc = 4, 6, 8, 2, 5
    length = width if axis == "row" else height
    layer = AxialAttention(d, h, axis, length, causal=True, cond_size=dc, cond_q=True, cond_k=True,
                           cond_v=True, cond_scale=True).double()
    with torch.no_grad():
        layer.rel_bias.normal_()
    x = torch.randn(2, height, width, d, dtype=torch.float64)
    ctx = torch.randn(2, height, width, dc, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x, layer.condition(ctx))
        position = torch.zeros(1, dtype=torch.long)
        sequences = 2 * (height if axis == "row" else width)
        cache = layer.new_cache(sequences, position, torch.float64)
        cache.keys.normal_(0, 30)  # stale, finite: must be masked, not zeroed
        cache.values.normal_(0, 30)
        for p in range(length):
            position.fill_(p)
            at = (slice(None), slice(None), slice(p, p + 1)) if axis == "row" else (slice(None), slice(p, p + 1))
            got = layer(x[at], layer.condition(ctx[at]), cache)
            torch.testing.assert_close(got, full[at], rtol=1e-12, atol=1e-12)


def test_shape_with_single_batch_axis_and_column_attention_uses_height():
    layer = AxialAttention(8, 2, "column", 3)
    x = torch.randn(2, 3, 5, 8)
    assert layer(x).shape == (2, 3, 5, 8)
    assert layer.rel_bias.shape == (2, 6)


def test_shifts_move_by_one_and_zero_fill():
    x = torch.randn(2, 3, 4, 5, 6)
    down, right = shift_down(x), shift_right(x)
    assert down.shape == right.shape == x.shape
    assert torch.equal(down[..., 1:, :, :], x[..., :-1, :, :]) and not down[..., 0, :, :].any()
    assert torch.equal(right[..., :, 1:, :], x[..., :, :-1, :]) and not right[..., :, 0, :].any()


def test_position_embedding_tables_and_sum():
    emb = PositionEmbedding(3, 5, 8)
    assert emb.row.shape == (3, 1, 8) and emb.column.shape == (5, 8)
    x = torch.randn(2, 3, 5, 8)
    out = emb(x)
    for i in range(3):
        for j in range(5):
            torch.testing.assert_close(out[:, i, j], x[:, i, j] + emb.row[i, 0] + emb.column[j])
    # one row / one pixel at a time, as the decoders' steps call it: bit-identical to the whole grid
    for i in range(3):
        row = torch.tensor([i])
        assert torch.equal(emb(x[:, i : i + 1], row=row), out[:, i : i + 1])
        for j in range(5):
            pixel = emb(x[:, i : i + 1, j : j + 1], row=row, column=torch.tensor([j]))
            assert torch.equal(pixel, out[:, i : i + 1, j : j + 1])


def _layer_norm_ref(x, eps=1e-3):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("seq", ["sc", "cs"])
@pytest.mark.parametrize("sp_ave", ["learnable", "mean"])
def test_conditional_layer_norm_matches_formula(seq, sp_ave):
    torch.manual_seed(1)
    d, dc, height, width = 6, 5, 3, 4
    norm = ConditionalLayerNorm(d, dc, height, width, sp_ave, seq, act="tanh").double()
    if sp_ave == "learnable":
        with torch.no_grad():
            norm.spatial_weights.uniform_(0.0, 2.0)
    x = 0.03 * torch.randn(2, height, width, d, dtype=torch.float64)  # variance ~1e-3: eps 1e-3 matters
    c = torch.randn(2, height, width, dc, dtype=torch.float64)
    m = norm.spatial_weights[..., None] if sp_ave == "learnable" else torch.ones(height, width, 1).double()
    lin = lambda t: t @ norm.proj.weight.T + norm.proj.bias  # noqa: E731
    proj = lin((m * c).mean((1, 2))) if seq == "sc" else (m * lin(c)).mean((1, 2))
    scale, shift = torch.tanh(proj[:, :d]), torch.tanh(proj[:, d:])  # [scale | shift], scale used raw
    ref = _layer_norm_ref(x) * scale[:, None, None] + shift[:, None, None]
    cond = norm.condition(c)
    assert cond.shape == (2, 1, 1, 2 * d)  # position-independent: one conditioning per image
    torch.testing.assert_close(norm(x, cond), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["affine", "shift"])
def test_conditional_mlp_split_order_and_activation(kind):
    torch.manual_seed(2)
    mlp = ConditionalMLP(4, 3, kind, act="tanh").double()
    y, c = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    out = c @ mlp.proj.weight.T + mlp.proj.bias
    if kind == "affine":  # [shift | scale], activation on both
        ref = y * torch.tanh(out[..., 4:]) + torch.tanh(out[..., :4])
    else:  # official 'shift': plain add, no activation
        ref = y + out
    torch.testing.assert_close(mlp(y, mlp.condition(c)), ref, rtol=1e-12, atol=1e-12)


def test_feed_forward_is_relu_mlp_with_biases():
    ff = FeedForward(4, 6)
    x = torch.randn(3, 4)
    torch.testing.assert_close(ff(x), F.relu(x @ ff.fc1.weight.T + ff.fc1.bias) @ ff.fc2.weight.T + ff.fc2.bias)
    assert ff.fc1.bias is not None and ff.fc2.bias is not None


def _assert_uniform_limit(w: torch.Tensor, limit: float):
    top = w.abs().max().item()
    assert top <= limit and top > 0.98 * limit, (top, limit)
    assert w.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.03)


@pytest.mark.parametrize("dc, cond_limit", [(512, 0.00671), (1024, 0.00475)])
def test_attention_init_matches_keras_nd_glorot(dc, cond_limit):
    torch.manual_seed(3)
    layer = AxialAttention(512, 4, "row", 64, cond_size=dc, cond_q=True, cond_k=True, cond_v=True,
                           cond_scale=True)
    for proj in (layer.q, layer.k, layer.v):
        _assert_uniform_limit(proj.weight, 0.00942 * (1 + 5e-4))
        assert proj.bias is None
    _assert_uniform_limit(layer.out.weight, 0.0484 * (1 + 5e-4))
    for proj in (layer.cond_q, layer.cond_k, layer.cond_v):
        assert proj.weight.shape == (4 * 256, dc) and proj.bias is None
        _assert_uniform_limit(proj.weight, cond_limit * (1 + 1e-3))
    assert layer.out.bias is None and not layer.rel_bias.any() and layer.rel_bias.shape == (4, 128)


def test_dense_embedding_position_and_cln_init():
    torch.manual_seed(4)
    lin = dense(512, 256)
    _assert_uniform_limit(lin.weight, math.sqrt(6 / 768))
    assert not lin.bias.any()
    _assert_uniform_limit(one_hot_dense(256, 512).weight, math.sqrt(6 / 768))
    emb = PositionEmbedding(64, 64, 512)
    for table in (emb.row, emb.column):
        assert table.std().item() == pytest.approx(512**-0.5, rel=0.03)
        assert abs(table.mean().item()) < 3e-3
    norm = ConditionalLayerNorm(512, 512, 64, 64)
    assert torch.equal(norm.spatial_weights, torch.ones(64, 64))
    assert not norm.proj.bias.any() and norm.proj.weight.shape == (1024, 512)
    _assert_uniform_limit(norm.proj.weight, math.sqrt(6 / 1536))
