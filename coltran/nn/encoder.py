"""The unmasked axial encoder stack (official `FactorizedAttention`), reused by the grayscale encoder and both
upsamplers: positional embedding, then per layer [row attention, FF, column attention, FF], each sublayer in a
post-LN residual: x <- LayerNorm(x + Dropout(sublayer(x)))."""

import torch
from torch import nn

from coltran.nn.attention import AxialAttention
from coltran.nn.conditioning import FeedForward
from coltran.nn.init import LAYER_NORM_EPS
from coltran.nn.position import PositionEmbedding


class AxialEncoder(nn.Module):
    def __init__(self, height: int, width: int, hidden_size: int, ff_size: int, num_heads: int,
                 num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.pos_embed = PositionEmbedding(height, width, hidden_size)
        self.sublayers = nn.ModuleList()
        for _ in range(num_layers):
            self.sublayers.append(AxialAttention(hidden_size, num_heads, "row", width))
            self.sublayers.append(FeedForward(hidden_size, ff_size))
            self.sublayers.append(AxialAttention(hidden_size, num_heads, "column", height))
            self.sublayers.append(FeedForward(hidden_size, ff_size))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS) for _ in self.sublayers)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, D) -> (B, H, W, D)."""
        x = self.pos_embed(x)
        for sublayer, norm in zip(self.sublayers, self.norms, strict=True):
            x = norm(x + self.dropout(sublayer(x)))
        return x
