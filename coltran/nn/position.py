"""Factorised learned positional embeddings and the causal shifts (official `PositionEmbed`, `Shift`)."""

import torch
import torch.nn.functional as F
from torch import nn


class PositionEmbedding(nn.Module):
    """A row table (H,1,D) plus a column table (W,D), added once at a module's input; init N(0, D^-1/2)."""

    def __init__(self, height: int, width: int, hidden_size: int):
        super().__init__()
        std = hidden_size**-0.5
        self.row = nn.Parameter(torch.randn(height, 1, hidden_size) * std)
        self.column = nn.Parameter(torch.randn(width, hidden_size) * std)

    def forward(self, x: torch.Tensor, row: torch.Tensor | None = None,
                column: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., H, W, D) plus each position's embedding. A decoder stepping one row or one pixel passes its
        `row` / `column` index as a 1-element int64 tensor, and x then covers only that row / column."""
        rows = self.row if row is None else self.row.index_select(0, row)  # (H | 1, 1, D)
        columns = self.column if column is None else self.column.index_select(0, column)  # (W | 1, D)
        return x + rows + columns


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, :, :] = x[..., i-1, :, :], row 0 zero. x: (..., H, W, D)."""
    return F.pad(x, (0, 0, 0, 0, 1, 0))[..., :-1, :, :]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """out[..., :, j, :] = x[..., :, j-1, :], column 0 zero. x: (..., H, W, D)."""
    return F.pad(x, (0, 0, 1, 0))[..., :-1, :]
