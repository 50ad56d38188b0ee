"""Feed-forward blocks and the conditional layers of ColTran (paper section 3.2; official `ConditionalLayerNorm`,
`cond_with_context`).

Every conditional layer has two halves: `condition(context)` projects the context, `forward(x, conditioning)`
applies it. A decoder computes the conditioning of all its layers at once (per call in teacher forcing, per image
or per row while sampling). Plain and conditional norms share the signature, so a block picks its variant when it
is built and `forward` never branches on configuration.
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

    def condition(self, context: torch.Tensor) -> torch.Tensor:
        """The per-position projection of the context (..., Dc) -> (..., 2D | D). As in the official
        `cond_with_context`, the activation applies to the affine [shift | scale] only, not to 'shift'."""
        out = self.proj(context)
        return self._act(out) if self.kind == "affine" else out

    def forward(self, y: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """y (..., D) modulated by `condition(context)` of the same positions."""
        if self.kind == "shift":
            return y + conditioning
        shift, scale = conditioning.chunk(2, dim=-1)
        return y * scale + shift


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

    def condition(self, context: torch.Tensor) -> torch.Tensor:
        """[scale | shift] (B, 1, 1, 2D) from the context (B, h, w, Dc): position-independent, so a decoder
        computes it once per call (teacher forcing) or once per image (sampling)."""
        if self.sequence == "sc":
            return self._act(self.proj(self._spatial_mean(context)))
        return self._act(self._spatial_mean(self.proj(context)))

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """x (B, ..., D) normalised and modulated by `condition(context)` (B, 1, 1, 2D)."""
        scale, shift = conditioning.chunk(2, dim=-1)
        return F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS) * scale + shift


class PlainLayerNorm(nn.LayerNorm):
    """Trainable LayerNorm (eps 1e-3) with the conditional signature, used when `cond_ln` is off."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, eps=LAYER_NORM_EPS)

    def condition(self, context: torch.Tensor | None = None) -> None:
        return None

    def forward(self, x: torch.Tensor, conditioning: None = None) -> torch.Tensor:
        return super().forward(x)
