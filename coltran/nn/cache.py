"""Static key/value caches for stepping a decoder one position (row or pixel) at a time.

Buffers are preallocated at the full axis length, the write index is a 1-element int64 tensor (a compiled step never
sees a Python int, so it compiles once), and the layer's additive logits bias (relative position bias plus the
causal mask) is kept whole: its row at the write index masks every slot not written yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class KVCache:
    keys: torch.Tensor  # (N, h, L, C): N sequences along the layer's axis, in the compute dtype
    values: torch.Tensor  # (N, h, L, C)
    bias: torch.Tensor  # (h, L, L) additive bias in the compute dtype; future keys carry the -1e6 mask
    position: torch.Tensor  # (1,) int64: the slot the current step writes (shared by a decoder's layers)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (N, h, 1, C) at `position`; return all keys and values (N, h, L, C) and the bias row
        (h, 1, L) of that query position."""
        self.keys.index_copy_(2, self.position, k)
        self.values.index_copy_(2, self.position, v)
        return self.keys, self.values, self.bias.index_select(1, self.position)


@dataclass
class DecoderCache:
    """What a decoder keeps between steps: the KV cache of each causal attention layer, the conditioning of each
    norm (position-independent, so computed once), and the write index its layers' caches share."""

    position: torch.Tensor  # (1,) int64: the row (outer decoder) or column (inner decoder) being stepped
    layers: list[KVCache]
    norms: list[torch.Tensor | None]
    row: Any = None  # the inner decoder's current row inputs (`InnerDecoder.start_row` fills them)
