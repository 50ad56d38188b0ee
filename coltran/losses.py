"""Bits per dimension: cross-entropy in nats divided by ln 2, averaged over batch and positions (paper sec. 5)."""

import math

import torch
import torch.nn.functional as F


def bits_per_dim(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (..., K) against integer labels (...); uniform logits over K classes give log2(K) bits."""
    nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long())
    return nats / math.log(2.0)
