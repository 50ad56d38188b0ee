"""Feed-forward blocks and the conditional layers of ColTran (paper section 3.2; official `ConditionalLayerNorm`,
`cond_with_context`).

Plain and conditional variants share one call signature `(x, context)` so that a block picks its variant when
it is built and `forward` never branches on configuration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coltran.nn.init import LAYER_NORM_EPS, activation, dense


class FeedForward(nn.Module):
    """Dense(D->F, ReLU) then Dense(F->D), both with bias."""

    def __init__(self, hidden_size: int, ff_size: int):
        super().__init__()
        self.fc1 = dense(hidden_size, ff_size)
        self.fc2 = dense(ff_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConditionalMLP(nn.Module):
    """Modulates a feed-forward output by the per-position context: 'affine' y*scale + shift, 'shift' y + s.

    The official projection's output order is [shift | scale] (the opposite of cLN and attention).
    """

    def __init__(self, hidden_size: int, cond_size: int, kind: str = "affine", act: str = "identity"):
        super().__init__()
        if kind not in ("affine", "shift"):
            raise ValueError(f"cond_mlp must be 'affine' or 'shift', got {kind!r}")
        self.kind = kind
        self.proj = dense(cond_size, 2 * hidden_size if kind == "affine" else hidden_size)
        self._act = activation(act)

    def modulation(self, context: torch.Tensor) -> torch.Tensor:
        """The projected context; the sampler computes it once per row and reuses it. As in the official
        `cond_with_context`, the activation applies to the affine [shift | scale] only, not to 'shift'."""
        out = self.proj(context)
        return self._act(out) if self.kind == "affine" else out

    def modulate(self, y: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        if self.kind == "shift":
            return y + modulation
        shift, scale = modulation.chunk(2, dim=-1)
        return y * scale + shift

    def forward(self, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.modulate(y, self.modulation(context))


class ConditionalLayerNorm(nn.Module):
    """LayerNorm whose scale and shift come from a spatial summary of the context.

    'sc': a = mean_{h,w}(m[h,w] * c[h,w]) with a learnable mask m (init ones), then [scale | shift] = Dense(a);
    'cs': the Dense first, then the weighted mean. The scale is used raw (not 1 + scale). Given a context with
    fewer rows than H (the official sampler feeds one row), m broadcasts over it exactly as TF's does.
    """

    def __init__(self, hidden_size: int, cond_size: int, height: int, width: int,
                 spatial_average: str = "learnable", sequence: str = "sc", act: str = "identity"):
        super().__init__()
        if spatial_average not in ("learnable", "mean") or sequence not in ("sc", "cs"):
            raise ValueError(f"bad cLN settings spatial_average={spatial_average!r} sequence={sequence!r}")
        self.sequence = sequence
        self.spatial_weights = nn.Parameter(torch.ones(height, width)) if spatial_average == "learnable" else None
        self.proj = dense(cond_size, 2 * hidden_size)
        self._act = activation(act)

    def _spatial_mean(self, c: torch.Tensor) -> torch.Tensor:
        """(B, h, w, X) -> (B, 1, 1, X)."""
        if self.spatial_weights is not None:
            c = self.spatial_weights[:, :, None] * c
        return c.mean(dim=(-3, -2), keepdim=True)

    def modulation(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (B, 1, 1, D): position-independent, so computed once per image."""
        if self.sequence == "sc":
            out = self.proj(self._spatial_mean(context))
        else:
            out = self._spatial_mean(self.proj(context))
        scale, shift = self._act(out).chunk(2, dim=-1)
        return scale, shift

    @staticmethod
    def normalize(x: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale, shift = modulation
        return F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS) * scale + shift

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.modulation(context))


class PlainLayerNorm(nn.LayerNorm):
    """Trainable LayerNorm (eps 1e-3) with the conditional signature, used when `cond_ln` is off."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)

    def modulation(self, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias): lets the sampler treat plain and conditional norms alike via `normalize`."""
        return self.weight, self.bias

    normalize = staticmethod(ConditionalLayerNorm.normalize)
