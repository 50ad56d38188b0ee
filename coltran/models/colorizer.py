"""ColTran core, the autoregressive 64x64 colorizer over 512 3-bit colours (paper sec. 3-4.1; official
`models/core.py` and `models/colorizer.py`).

gray -> GrayScaleEncoder -> z; auxiliary parallel head on z; pixel embeddings -> OuterDecoder (unmasked row,
masked column attention, shift down at the end) -> u; InnerDecoder (shift right, masked row attention) -> head.
Causality: logits at (i, j) see all of z, pixel rows < i and pixels (i, < j).
"""

from __future__ import annotations

import torch
from torch import nn

from coltran.configs import ColorizerConfig
from coltran.losses import bits_per_dim
from coltran.nn import (
    AxialAttention,
    AxialEncoder,
    ConditionalLayerNorm,
    ConditionalMLP,
    FeedForward,
    PlainLayerNorm,
    PositionEmbedding,
    shift_down,
    shift_right,
)
from coltran.nn.init import LAYER_NORM_EPS, dense, one_hot_dense
from coltran.transforms import colors_to_symbols, to_3bit

NUM_SYMBOLS = 512  # 8 levels per channel, 3 channels


class GrayScaleEncoder(nn.Module):
    """one-hot(gray, 256) -> Dense(256 -> D, with bias) -> axial encoder stack."""

    def __init__(self, cfg: ColorizerConfig):
        super().__init__()
        height, width = cfg.resolution
        self.embedding = one_hot_dense(256, cfg.hidden_size)
        self.embedding_bias = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.encoder = AxialEncoder(height, width, cfg.hidden_size, cfg.ff_size, cfg.num_heads,
                                    cfg.num_encoder_layers, cfg.dropout)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        """gray (B, H, W) in 0..255 -> z (B, H, W, D)."""
        return self.encoder(self.embedding(gray.long()) + self.embedding_bias)


def _norm(cfg: ColorizerConfig) -> nn.Module:
    """cLN on the encoder output z, or a plain trainable LayerNorm when `cond_ln` is off."""
    if not cfg.cond_ln:
        return PlainLayerNorm(cfg.hidden_size)
    height, width = cfg.resolution
    return ConditionalLayerNorm(cfg.hidden_size, cfg.hidden_size, height, width,
                                cfg.cond_ln_sp_ave, cfg.cond_ln_seq, cfg.cond_ln_act)


def _attention(cfg: ColorizerConfig, axis: str, causal: bool, cond_size: int) -> AxialAttention:
    height, width = cfg.resolution
    return AxialAttention(
        cfg.hidden_size, cfg.num_heads, axis, width if axis == "row" else height, causal=causal,
        cond_size=cond_size, cond_q=cfg.cond_att_q, cond_k=cfg.cond_att_k, cond_v=cfg.cond_att_v,
        cond_scale=cfg.cond_att_scale, cond_act=cfg.cond_att_act,
    )


class OuterDecoder(nn.Module):
    """Per layer: unmasked row attention, FF, masked column attention, FF; each conditioned on z and followed by
    a residual + cLN(z). The final shift down makes row i depend only on pixel rows < i."""

    def __init__(self, cfg: ColorizerConfig):
        super().__init__()
        height, width = cfg.resolution
        d = cfg.hidden_size
        self.skip = cfg.skip
        self.pos_embed = PositionEmbedding(height, width, d)
        self.row_attns, self.col_attns = nn.ModuleList(), nn.ModuleList()
        self.row_ffs, self.col_ffs = nn.ModuleList(), nn.ModuleList()
        self.row_cmlps, self.col_cmlps = nn.ModuleList(), nn.ModuleList()
        for _ in range(cfg.num_outer_layers):
            self.row_attns.append(_attention(cfg, "row", causal=False, cond_size=d))
            self.row_ffs.append(FeedForward(d, cfg.ff_size))
            self.row_cmlps.append(ConditionalMLP(d, d, cfg.cond_mlp, cfg.cond_mlp_act))
            self.col_attns.append(_attention(cfg, "column", causal=True, cond_size=d))
            self.col_ffs.append(FeedForward(d, cfg.ff_size))
            self.col_cmlps.append(ConditionalMLP(d, d, cfg.cond_mlp, cfg.cond_mlp_act))
        self.norms = nn.ModuleList(_norm(cfg) for _ in range(4 * cfg.num_outer_layers))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, embeddings: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """embeddings, z (B, H, W, D) -> u (B, H, W, D) with u[:, 0] == 0."""
        x = self.pos_embed(embeddings)
        if self.skip:
            x = x + z
        drop, norms = self.dropout, self.norms
        for layer in range(len(self.row_attns)):
            x = norms[4 * layer](x + drop(self.row_attns[layer](x, z)), z)
            x = norms[4 * layer + 1](x + drop(self.row_cmlps[layer](self.row_ffs[layer](x), z)), z)
            x = norms[4 * layer + 2](x + drop(self.col_attns[layer](x, z)), z)
            x = norms[4 * layer + 3](x + drop(self.col_cmlps[layer](self.col_ffs[layer](x), z)), z)
        return shift_down(x)


class InnerDecoder(nn.Module):
    """Per layer: masked row attention, FF; attention and MLP conditioned on concat(z, u), cLN on z only
    (u would leak later rows through the spatial average)."""

    def __init__(self, cfg: ColorizerConfig):
        super().__init__()
        height, width = cfg.resolution
        d = cfg.hidden_size
        self.skip = cfg.skip
        self.pos_embed = PositionEmbedding(height, width, d)
        self.attns, self.ffs, self.cmlps = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for _ in range(cfg.num_inner_layers):
            self.attns.append(_attention(cfg, "row", causal=True, cond_size=2 * d))
            self.ffs.append(FeedForward(d, cfg.ff_size))
            self.cmlps.append(ConditionalMLP(d, 2 * d, cfg.cond_mlp, cfg.cond_mlp_act))
        self.norms = nn.ModuleList(_norm(cfg) for _ in range(2 * cfg.num_inner_layers))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, embeddings: torch.Tensor, upper: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """embeddings, upper (= u), z: (B, H, W, D) -> (B, H, W, D)."""
        x = self.pos_embed(shift_right(embeddings))
        if self.skip:
            x = x + z + upper
        context = torch.cat((z, upper), dim=-1)  # z first, as the official code
        for layer in range(len(self.attns)):
            x = self.norms[2 * layer](x + self.dropout(self.attns[layer](x, context)), z)
            x = self.norms[2 * layer + 1](x + self.dropout(self.cmlps[layer](self.ffs[layer](x), context)), z)
        return x


class ColTranCore(nn.Module):
    """The colorizer. forward(gray, colors3) -> (logits, encoder_logits), each (B, H, W, 1, 512)."""

    def __init__(self, cfg: ColorizerConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.hidden_size
        self.encoder = GrayScaleEncoder(cfg)
        self.parallel_dense = dense(d, NUM_SYMBOLS, bias=False) if cfg.model_stage == "encoder_decoder" else None
        self.pixel_embed = one_hot_dense(NUM_SYMBOLS, d)
        self.outer_decoder = OuterDecoder(cfg)
        self.inner_decoder = InnerDecoder(cfg)
        self.final_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.final_dense = dense(d, NUM_SYMBOLS)

    def encode(self, gray: torch.Tensor) -> torch.Tensor:
        return self.encoder(gray)

    def encoder_logits(self, z: torch.Tensor) -> torch.Tensor | None:
        """Auxiliary parallel head: (B, H, W, 1, 512) logits from z alone, or None for stage 'decoder'."""
        return None if self.parallel_dense is None else self.parallel_dense(z).unsqueeze(-2)

    def head(self, activations: torch.Tensor) -> torch.Tensor:
        return self.final_dense(self.final_norm(activations))

    def decode(self, symbols: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, H, W, 1, 512) for colour symbols (B, H, W) in 0..511."""
        embeddings = self.pixel_embed(symbols.long())
        upper = self.outer_decoder(embeddings, z)
        return self.head(self.inner_decoder(embeddings, upper, z)).unsqueeze(-2)

    def forward(self, gray: torch.Tensor, colors3: torch.Tensor):
        """gray (B, H, W) 0..255, colors3 (B, H, W, 3) 3-bit 0..7 -> (logits, encoder_logits or None)."""
        z = self.encode(gray)
        return self.decode(colors_to_symbols(colors3.long()), z), self.encoder_logits(z)

    def loss(self, batch: dict, random_channel: bool = False, generator: torch.Generator | None = None):
        """Total loss (0.99 AR + 0.01 encoder by default) and metrics, all in bits/dim, from a batch holding
        `gray_64` (B, 64, 64) and `rgb_64` (B, 64, 64, 3) uint8. `random_channel` has no meaning here."""
        colors3 = to_3bit(batch["rgb_64"]).long()
        labels = colors_to_symbols(colors3)
        logits, enc_logits = self(batch["gray_64"], colors3)
        ar = bits_per_dim(logits.squeeze(-2), labels)
        total = self.config.loss_factor * ar
        metrics = {"loss": ar.detach()}
        if enc_logits is not None:
            enc = bits_per_dim(enc_logits.squeeze(-2), labels)
            total = total + self.config.encoder_loss_factor * enc
            metrics["encoder"] = enc.detach()
        metrics["total_loss"] = total.detach()
        return total, metrics
