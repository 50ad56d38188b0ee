"""The one vocabulary of layers shared by the three ColTran models (official `models/layers.py`, `core.py`)."""

from coltran.nn.attention import AxialAttention
from coltran.nn.cache import DecoderCache, KVCache
from coltran.nn.conditioning import ConditionalLayerNorm, ConditionalMLP, FeedForward, PlainLayerNorm
from coltran.nn.encoder import AxialEncoder
from coltran.nn.position import PositionEmbedding, shift_down, shift_right

__all__ = [
    "AxialAttention",
    "AxialEncoder",
    "ConditionalLayerNorm",
    "ConditionalMLP",
    "DecoderCache",
    "FeedForward",
    "KVCache",
    "PlainLayerNorm",
    "PositionEmbedding",
    "shift_down",
    "shift_right",
]
