"""Axial multi-head attention along rows or columns, with ColTran's conditioning and relative bias.

Mirrors the official `SelfAttentionND` restricted to one axis (`nd_block_size` [1, W] or [H, 1]): q/k/v without
bias, optional conditional scale+shift of q/k/v from a per-position context, q scaled by C^-1/2, a learned
relative position bias b[head, key - query + L - 1] per layer, an additive -1e6 causal mask that keeps the
diagonal, and an output projection without bias. Attention itself goes through
`torch.nn.functional.scaled_dot_product_attention` (fused kernels on CUDA; on CPU the flash kernel at inference,
the math kernel when the bias needs a gradient). Given a `KVCache`, the same forward steps one position along the
axis: the new keys/values go into the cache and the query attends to everything cached so far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coltran.nn.cache import KVCache
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

    def condition(self, context: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """The per-position conditioning of q, k and v from the context (..., Dc): each (..., h, 2C) = [scale |
        shift] after the activation, or (..., h, C) = shift without it in the variant without scale (as the
        official code), or None where that projection is unconditioned. A decoder computes it once per call
        (teacher forcing) or once per row (sampling) and hands it to `forward`."""
        if not self.conditional:
            return (None, None, None)
        if context is None:
            raise ValueError("a conditional attention layer needs a context")
        out = []
        for proj in (self.cond_q, self.cond_k, self.cond_v):
            cond = None if proj is None else proj(context).unflatten(-1, (self.num_heads, -1))
            out.append(self._cond_act(cond) if cond is not None and self.cond_scale else cond)
        return tuple(out)

    def _modulate(self, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            return t
        if not self.cond_scale:
            return t + cond
        scale, shift = cond.split(self.head_size, dim=-1)
        return t * scale + shift

    def _project(self, x: torch.Tensor, conditioning) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = (self.num_heads, self.head_size)
        cq, ck, cv = conditioning
        q = self._modulate(self.q(x).unflatten(-1, heads), cq)
        k = self._modulate(self.k(x).unflatten(-1, heads), ck)
        v = self._modulate(self.v(x).unflatten(-1, heads), cv)
        return q * self.head_size**-0.5, k, v

    def project(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """q (pre-scaled by C^-1/2), k, v, each (..., h, C), for inputs x (..., D) under a raw context."""
        return self._project(x, self.condition(context))

    def new_cache(self, sequences: int, position: torch.Tensor, dtype: torch.dtype) -> KVCache:
        """An empty cache for stepping `sequences` sequences (batch x the other axis) along this layer's axis;
        `position` is the write index tensor the caller advances."""
        shape = (sequences, self.num_heads, self.length, self.head_size)
        keys = torch.zeros(shape, dtype=dtype, device=self.rel_bias.device)
        return KVCache(keys, torch.zeros_like(keys), self.bias_matrix().detach().to(dtype), position)

    def forward(self, x: torch.Tensor, conditioning: tuple | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (..., H, W, D) -> (..., H, W, D); `conditioning` is `condition(context)` for the same positions when
        the layer is conditional. With a cache, x holds the one position `cache.position` along the axis (W = 1
        for a row layer, H = 1 for a column layer) and attends to it and the positions cached before it."""
        if conditioning is None:
            conditioning = self.condition(None)
        lead, height, width = x.shape[:-3], x.shape[-3], x.shape[-2]
        q, k, v = (self._sequences(t) for t in self._project(x, conditioning))  # (N, h, L, C)
        if cache is None:
            bias = self.bias_matrix()  # (h, L, L)
        else:
            k, v, bias = cache.update(k, v)  # (N, h, L_full, C), bias (h, 1, L_full)
        # (1, h, Lq, Lk): with a 4-D mask (and no gradient for it) the CPU picks its fused flash kernel, 5x faster
        # than the math kernel that a 3-D mask gets (benchmarks/attention.py); with a gradient both use math.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)[None], scale=1.0)
        out = out.transpose(1, 2)  # (N, L, h, C)
        if self.axis == "row":
            out = out.reshape(*lead, height, width, -1)
        else:
            out = out.reshape(*lead, width, height, -1).transpose(-3, -2)
        return self.out(out)

    def _sequences(self, t: torch.Tensor) -> torch.Tensor:
        """(..., H, W, h, C) -> (N, h, L, C): sequences along the axis, the other axes folded into N."""
        if self.axis == "column":
            t = t.transpose(-4, -3)  # (..., W, H, h, C)
        return t.reshape(-1, t.shape[-3], self.num_heads, self.head_size).transpose(1, 2)
