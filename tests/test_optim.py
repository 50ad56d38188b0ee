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


def test_ema_starts_at_init_and_follows_the_polyak_formula():
    model = _model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model)
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
    other.load_state_dict(state)
    state["0.weight"].zero_()  # loaded values are copies
    assert torch.equal(other.shadow["0.weight"], ema.shadow["0.weight"] + 1)
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        other.load_state_dict({n: t for n, t in ema.state_dict().items() if n != "0.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        other.load_state_dict({**ema.state_dict(), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"0.weight has shape \(3, 4\), expected \(4, 3\)"):
        other.load_state_dict({**ema.state_dict(), "0.weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
