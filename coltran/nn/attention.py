"""Axial multi-head attention along rows or columns, with ColTran's conditioning and relative bias.

Mirrors the official `SelfAttentionND` restricted to one axis (`nd_block_size` [1, W] or [H, 1]): q/k/v without
bias, optional conditional scale+shift of q/k/v from a per-position context, q scaled by C^-1/2, a learned
relative position bias b[head, key - query + L - 1] per layer, an additive -1e6 causal mask that keeps the
diagonal, and an output projection without bias. Attention itself goes through
`torch.nn.functional.scaled_dot_product_attention` (fused kernels on CUDA; on CPU the flash kernel at inference,
the math kernel when the bias needs a gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coltran.nn.init import activation, glorot_uniform_

MASK_VALUE = -1e6  # official additive mask; exp() underflows to exactly 0 in fp32


class AxialAttention(nn.Module):
    """Attention along `axis` ('row': among the W pixels of a row; 'column': among the H pixels of a column)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        axis: str,
        length: int,
        causal: bool = False,
        cond_size: int | None = None,
        cond_q: bool = False,
        cond_k: bool = False,
        cond_v: bool = False,
        cond_scale: bool = False,
        cond_act: str = "identity",
    ):
        super().__init__()
        if axis not in ("row", "column"):
            raise ValueError(f"axis must be 'row' or 'column', got {axis!r}")
        d, h = hidden_size, num_heads
        c = d // h
        self.axis, self.length, self.causal = axis, length, causal
        self.num_heads, self.head_size = h, c
        self.q = nn.Linear(d, h * c, bias=False)
        self.k = nn.Linear(d, h * c, bias=False)
        self.v = nn.Linear(d, h * c, bias=False)
        self.out = nn.Linear(h * c, d, bias=False)
        for proj in (self.q, self.k, self.v):  # Keras Glorot on a (D, h, C) kernel
            glorot_uniform_(proj.weight, d * h, d * c)
        glorot_uniform_(self.out.weight, h * c, h * d)  # (h, C, D) kernel
        self.rel_bias = nn.Parameter(torch.zeros(h, 2 * length))
        self.cond_scale = cond_scale
        self._cond_act = activation(cond_act)
        cond_width = 2 * c if cond_scale else c
        self.cond_q = self._cond_projection(cond_q, cond_size, cond_width)
        self.cond_k = self._cond_projection(cond_k, cond_size, cond_width)
        self.cond_v = self._cond_projection(cond_v, cond_size, cond_width)
        idx = torch.arange(length)
        self.register_buffer("_rel_index", idx[None, :] - idx[:, None] + length - 1, persistent=False)
        self.register_buffer("_causal", torch.triu(torch.ones(length, length, dtype=torch.bool), 1), persistent=False)

    def _cond_projection(self, enabled: bool, cond_size: int | None, width: int) -> nn.Linear | None:
        if not enabled:
            return None
        if cond_size is None:
            raise ValueError("conditional attention needs cond_size")
        proj = nn.Linear(cond_size, self.num_heads * width, bias=False)
        glorot_uniform_(proj.weight, cond_size * self.num_heads, cond_size * width)
        return proj

    @property
    def conditional(self) -> bool:
        return any(p is not None for p in (self.cond_q, self.cond_k, self.cond_v))

    def bias_matrix(self) -> torch.Tensor:
        """(h, L, L) additive logits bias: relative position bias plus the causal mask."""
        bias = self.rel_bias[:, self._rel_index]
        if self.causal:
            bias = bias.masked_fill(self._causal, MASK_VALUE)
        return bias

    def condition(self, t: torch.Tensor, proj: nn.Linear | None, context: torch.Tensor | None) -> torch.Tensor:
        """t (..., h, C) scaled and shifted (or shifted) by a projection of the per-position context."""
        if proj is None:
            return t
        scale, shift = self.cond_scale_shift(proj, context)
        return t + shift if scale is None else t * scale + shift

    def cond_scale_shift(self, proj: nn.Linear, context: torch.Tensor):
        """(scale, shift), each (..., h, C), that `proj` derives from the context ([scale | shift] split);
        scale is None in the shift-only variant, which applies no activation (as the official code)."""
        cond = proj(context).unflatten(-1, (self.num_heads, -1))  # (..., h, 2C | C)
        if not self.cond_scale:
            return None, cond
        scale, shift = self._cond_act(cond).split(self.head_size, dim=-1)
        return scale, shift

    def project(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """q (pre-scaled by C^-1/2), k, v, each (..., h, C), for inputs x (..., D)."""
        heads = (self.num_heads, self.head_size)
        q = self.condition(self.q(x).unflatten(-1, heads), self.cond_q, context)
        k = self.condition(self.k(x).unflatten(-1, heads), self.cond_k, context)
        v = self.condition(self.v(x).unflatten(-1, heads), self.cond_v, context)
        return q * self.head_size**-0.5, k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., H, W, D) -> (..., H, W, D); context (..., H, W, Dc) when the layer is conditional."""
        q, k, v = self.project(x, context)
        lead = x.shape[:-3]
        height, width = x.shape[-3], x.shape[-2]
        if self.axis == "row":
            seq = [t.reshape(-1, width, self.num_heads, self.head_size).transpose(1, 2) for t in (q, k, v)]
        else:  # (..., H, W, h, C) -> (N*W, h, H, C)
            seq = [t.transpose(-4, -3).reshape(-1, height, self.num_heads, self.head_size).transpose(1, 2)
                   for t in (q, k, v)]
        # (1, h, L, L): with a 4-D mask (and no gradient for it) the CPU picks its fused flash kernel, 5x faster
        # than the math kernel that a 3-D mask gets (benchmarks/attention.py); with a gradient both use math.
        mask = self.bias_matrix().to(seq[0].dtype)[None]
        out = F.scaled_dot_product_attention(*seq, attn_mask=mask, scale=1.0)  # (N, h, L, C)
        out = out.transpose(1, 2)  # (N, L, h, C)
        if self.axis == "row":
            out = out.reshape(*lead, height, width, -1)
        else:
            out = out.reshape(*lead, width, height, -1).transpose(-3, -2)
        return self.out(out)
