"""The paper's optimiser and Polyak averaging (official `train_utils.build_optimizer`, `build_ema`).

RMSprop: lr 3e-4, rho 0.9, eps 1e-7 added outside the square root, no momentum, zero-initialised accumulator
(= torch RMSprop with alpha=0.9, eps=1e-7). EMA: decay 0.999, shadow starting at the initial weights, no
debiasing, updated after every step; evaluation and sampling use the shadow. Departure, on by default: the decay
warms up by TF's `num_updates` rule, so a short run's shadow is not still mostly its random initialisation.
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
    """Polyak shadow of a model's trainable parameters: shadow <- d * shadow + (1 - d) * param.

    With `warmup` (default) d = min(decay, (1 + n) / (10 + n)), n = updates applied before this one, the rule of
    TF's `ExponentialMovingAverage(num_updates=...)`: 0.1 at the first update, 0.97 at n = 290, `decay` (0.999)
    from n = 8990 on. Without it d = decay throughout, as in the official code (0.999 ** 300 = 74% of a 300-step
    run's shadow is still the random initialisation).
    """

    def __init__(self, model: nn.Module, decay: float = EMA_DECAY, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        """The decay the next `update` applies."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        names = list(self.shadow)
        shadows = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadows, [params[n].detach() for n in names], 1.0 - self.current_decay())
        self.num_updates += 1

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
        """The shadow tensors (what a checkpoint's ema.safetensors holds); `num_updates` is saved beside them."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], *, num_updates: int) -> None:
        """Load shadow tensors and the number of updates they average (required: the warm-up depends on it)."""
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
            raise ValueError(f"EMA num_updates must be an integer >= 0, got {num_updates!r}")
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor {name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(self.shadow[name].shape)}")
            self.shadow[name] = value.detach().clone().to(self.shadow[name].device)
        self.num_updates = num_updates
