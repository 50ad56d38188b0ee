"""TF/Keras-equivalent initialisers, so that fresh PyTorch models start where the official ones do."""

import math

import torch
from torch import nn

LAYER_NORM_EPS = 1e-3  # Keras LayerNormalization default, used everywhere in ColTran


def glorot_uniform_(tensor: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    """U(+-sqrt(6 / (fan_in + fan_out))) with fans given explicitly (Keras treats >2-D kernels specially)."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return tensor.uniform_(-limit, limit)


def dense(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """A Keras `Dense`: Glorot-uniform kernel, zero bias."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    glorot_uniform_(layer.weight, in_features, out_features)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def one_hot_dense(num_classes: int, out_features: int) -> nn.Embedding:
    """A Keras `Dense` applied to a one-hot vector is a table lookup; the table is the Dense kernel."""
    table = nn.Embedding(num_classes, out_features)
    glorot_uniform_(table.weight, num_classes, out_features)
    return table


def activation(name: str):
    """The official `act_to_func`: identity | relu | sigmoid | tanh."""
    funcs = {"identity": lambda x: x, "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
    if name not in funcs:
        raise ValueError(f"activation must be one of {sorted(funcs)}, got {name!r}")
    return funcs[name]
