"""The paper's optimiser and Polyak averaging (official `train_utils.build_optimizer`, `build_ema`).

RMSprop: lr 3e-4, rho 0.9, eps 1e-7 added outside the square root, no momentum, zero-initialised accumulator
(= torch RMSprop with alpha=0.9, eps=1e-7). EMA: decay 0.999, shadow starting at the initial weights, no
debiasing, updated after every step; evaluation and sampling use the shadow.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

LEARNING_RATE = 3e-4
RMSPROP_ALPHA = 0.9
RMSPROP_EPS = 1e-7
EMA_DECAY = 0.999


def make_optimizer(params, lr: float = LEARNING_RATE) -> torch.optim.RMSprop:
    return torch.optim.RMSprop(params, lr=lr, alpha=RMSPROP_ALPHA, eps=RMSPROP_EPS, momentum=0.0, centered=False)


class EMA:
    """Polyak shadow of a model's trainable parameters: shadow <- decay * shadow + (1 - decay) * param."""

    def __init__(self, model: nn.Module, decay: float = EMA_DECAY):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        names = list(self.shadow)
        shadows = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadows, [params[n].detach() for n in names], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module):
        """Temporarily run `model` with the shadow weights (evaluation), restoring the raw ones after."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor {name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(self.shadow[name].shape)}")
            self.shadow[name] = value.detach().clone().to(self.shadow[name].device)
