"""RMSprop and Polyak EMA against the official formulas worked by hand (coltran-reference.md section 5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coltran.optim import EMA, make_optimizer


def _param(values):
    return nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_optimizer_settings():
    group = make_optimizer([_param([1.0])]).param_groups[0]
    assert (group["lr"], group["alpha"], group["eps"]) == (3e-4, 0.9, 1e-7)
    assert group["momentum"] == 0 and group["centered"] is False and group["weight_decay"] == 0


def test_rmsprop_steps_match_the_formula_by_hand():
    p0 = [0.5, -1.0, 2.0, 0.0]
    g1 = torch.tensor([1e-7, -3e-7, 0.2, -5.0], dtype=torch.float64)  # tiny grads make eps visible
    g2 = torch.tensor([4e-7, 1e-6, -0.1, 2.0], dtype=torch.float64)
    p = _param(p0)
    opt = make_optimizer([p])
    p.grad = g1.clone()
    opt.step()
    v1 = 0.1 * g1**2  # zero-initialised accumulator, rho 0.9
    want1 = torch.tensor(p0, dtype=torch.float64) - 3e-4 * g1 / (v1.sqrt() + 1e-7)  # eps outside the sqrt
    torch.testing.assert_close(p.detach(), want1, rtol=1e-12, atol=1e-15)
    eps_inside = torch.tensor(p0, dtype=torch.float64) - 3e-4 * g1 / (v1 + 1e-7).sqrt()
    assert not torch.allclose(p.detach(), eps_inside, rtol=1e-6, atol=1e-9)
    ones_init = torch.tensor(p0, dtype=torch.float64) - 3e-4 * g1 / ((0.9 + v1).sqrt() + 1e-7)  # TF1 init 1
    assert not torch.allclose(p.detach(), ones_init, rtol=1e-6, atol=1e-9)
    p.grad = g2.clone()
    opt.step()
    v2 = 0.9 * v1 + 0.1 * g2**2
    torch.testing.assert_close(p.detach(), want1 - 3e-4 * g2 / (v2.sqrt() + 1e-7), rtol=1e-12, atol=1e-15)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    model[1].bias.requires_grad_(False)  # frozen parameters have no shadow
    return model


def test_constant_ema_starts_at_init_and_follows_the_official_polyak_formula():
    model = _model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, warmup=False)
    assert sorted(ema.shadow) == ["0.bias", "0.weight", "1.weight"]
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    for step in range(2):
        model(torch.randn(5, 3, dtype=torch.float64)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        before = {n: s.clone() for n, s in ema.shadow.items()}
        ema.update(model)
        for name, p in model.named_parameters():
            if name in ema.shadow:
                assert not torch.equal(p.detach(), before[name])
                want = 0.999 * before[name] + 0.001 * p.detach()  # constant decay: no ramp, no debiasing
                torch.testing.assert_close(ema.shadow[name], want, rtol=1e-13, atol=1e-15)
                if step == 0:
                    torch.testing.assert_close(ema.shadow[name], 0.999 * init[name] + 0.001 * p.detach())
    assert ema.num_updates == 2 and ema.current_decay() == 0.999


def _walk(model, steps: int, seed: int = 1):
    """Move every parameter by a fixed random step `steps` times; yields the parameters after each move."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        yield {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("decay", [0.999, 0.5])
def test_ema_warmup_follows_tf_num_updates_rule_by_hand(decay):
    model = _model()
    shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ema = EMA(model, decay=decay)  # warm-up is the default
    assert ema.warmup and ema.current_decay() == pytest.approx(0.1)
    # d_n = min(decay, (1 + n) / (10 + n)) for n = 0..9, written out: with decay 0.5 the cap binds from n = 8
    by_hand = [1 / 10, 2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15, 7 / 16, 8 / 17, 9 / 18, 10 / 19]
    for n, params in enumerate(_walk(model, 10)):
        d = min(decay, by_hand[n])
        shadow = {name: d * value + (1 - d) * params[name] for name, value in shadow.items()}
        ema.update(model)
        assert ema.num_updates == n + 1
        if n + 1 in (1, 2, 10):
            for name, want in shadow.items():
                torch.testing.assert_close(ema.shadow[name], want, rtol=1e-13, atol=1e-15)
    assert ema.current_decay() == min(decay, 11 / 20)


def test_ema_warmup_reaches_the_paper_decay_after_8990_updates_and_stays():
    ema = EMA(_model())
    for n, want in [(8989, 8990 / 8999), (8990, 0.999), (10**6, 0.999)]:
        ema.load_state_dict(ema.state_dict(), num_updates=n)
        assert ema.current_decay() == pytest.approx(want, rel=1e-15)
    assert 8990 / 8999 < 0.999

def test_ema_shadow_is_a_copy_and_swapped_into_restores_raw_weights():
    model = _model()
    ema = EMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.equal(ema.shadow["0.weight"], raw["0.weight"])
    with ema.swapped_into(model) as swapped:
        assert swapped is model
        for name, shadow in ema.shadow.items():
            assert torch.equal(dict(model.named_parameters())[name], shadow)
        assert torch.equal(model[1].bias, raw["1.bias"])  # untouched: not averaged
    for name, p in model.named_parameters():
        assert torch.equal(p, raw[name])
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_into(model):
        raise RuntimeError("boom")
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters())
    ema.copy_to(model)
    assert torch.equal(model[0].weight, ema.shadow["0.weight"])


def test_ema_state_dict_round_trip_and_mismatches():
    model = _model()
    ema = EMA(model)
    state = {n: t + 1 for n, t in ema.state_dict().items()}
    other = EMA(model)
    other.load_state_dict(state, num_updates=0)
    state["0.weight"].zero_()  # loaded values are copies
    assert torch.equal(other.shadow["0.weight"], ema.shadow["0.weight"] + 1)
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        other.load_state_dict({n: t for n, t in ema.state_dict().items() if n != "0.bias"}, num_updates=0)
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        other.load_state_dict({**ema.state_dict(), "extra": torch.zeros(1)}, num_updates=0)
    with pytest.raises(ValueError, match=r"0.weight has shape \(3, 4\), expected \(4, 3\)"):
        other.load_state_dict({**ema.state_dict(), "0.weight": torch.zeros(3, 4)}, num_updates=0)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_ema_update_count_round_trips_and_the_restored_average_continues_identically():
    model = _model()
    ema = EMA(model)
    for _ in _walk(model, 3):
        ema.update(model)
    resumed = EMA(model)  # a fresh shadow (the current weights) and count 0
    with pytest.raises(TypeError, match="num_updates"):
        resumed.load_state_dict(ema.state_dict())  # the count is required: the warm-up depends on it
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=f"num_updates must be an integer >= 0, got {bad!r}"):
            resumed.load_state_dict(ema.state_dict(), num_updates=bad)
    assert resumed.num_updates == 0
    resumed.load_state_dict(ema.state_dict(), num_updates=ema.num_updates)
    assert resumed.num_updates == 3 and resumed.current_decay() == ema.current_decay() == pytest.approx(4 / 13)
    restarted = EMA(model)
    restarted.load_state_dict(ema.state_dict(), num_updates=0)  # a lost count would restart the ramp at 0.1
    for _ in _walk(model, 2, seed=2):
        for e in (ema, resumed, restarted):
            e.update(model)
    assert all(torch.equal(resumed.shadow[n], t) for n, t in ema.shadow.items())
    assert not torch.allclose(restarted.shadow["0.weight"], ema.shadow["0.weight"])
