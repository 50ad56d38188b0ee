"""ColTran core, the autoregressive 64x64 colorizer over 512 3-bit colours (paper sec. 3-4.1; official
`models/core.py` and `models/colorizer.py`).

gray -> GrayScaleEncoder -> z; auxiliary parallel head on z; pixel embeddings -> OuterDecoder (unmasked row,
masked column attention, shift down at the end) -> u; InnerDecoder (shift right, masked row attention) -> head.
Causality: logits at (i, j) see all of z, pixel rows < i and pixels (i, < j). Each decoder runs either all
positions at once (`forward`, teacher forcing) or one row / one pixel at a time against key/value caches (`step`,
what `coltran.sampling` runs); both go through the decoder's `_layers`, the one place its sublayers are written.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from coltran.configs import ColorizerConfig
from coltran.losses import bits_per_dim
from coltran.nn import (
    AxialAttention,
    AxialEncoder,
    ConditionalLayerNorm,
    ConditionalMLP,
    DecoderCache,
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


def _residual(norms, norm_conditioning, dropout, k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The post-LN residual of sublayer k: norm_k(x + dropout(y)) under norm k's conditioning."""
    return norms[k](x + dropout(y), norm_conditioning[k])


def _new_cache(decoder: nn.Module, attentions, sequences: int, z: torch.Tensor, dtype: torch.dtype) -> DecoderCache:
    """Empty key/value caches for `attentions` and every norm's conditioning on z; the write index starts at 0."""
    position = torch.zeros(1, dtype=torch.long, device=z.device)
    layers = [att.new_cache(sequences, position, dtype) for att in attentions]
    return DecoderCache(position, layers, [norm.condition(z) for norm in decoder.norms])


class OuterDecoder(nn.Module):
    """Per layer: unmasked row attention, FF, masked column attention, FF; each conditioned on z and followed by
    a residual + cLN(z). The final shift down makes row i depend only on pixel rows < i.

    `forward` runs all rows at once (teacher forcing); `step` runs one finished row against the column
    attentions' key/value caches and gives what `forward` gives for that row before the shift."""

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
        norms = [norm.condition(z) for norm in self.norms]
        return shift_down(self._layers(self.pos_embed(embeddings), z, norms))

    def new_cache(self, z: torch.Tensor, dtype: torch.dtype) -> DecoderCache:
        """A cache for stepping the rows of images whose encoder output is z (N, H, W, D)."""
        n, _, width, _ = z.shape
        return _new_cache(self, self.col_attns, n * width, z, dtype)

    def step(self, embeddings: torch.Tensor, z: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """embeddings, z (N, 1, W, D) of the finished row `cache.position` -> that row's output (N, 1, W, D),
        which is u of the next row."""
        x = self.pos_embed(embeddings, row=cache.position)
        return self._layers(x, z, cache.norms, cache.layers)

    def _layers(self, x, z, norm_conditioning, caches=None):
        if self.skip:
            x = x + z
        residual = partial(_residual, self.norms, norm_conditioning, self.dropout)
        for layer in range(len(self.row_attns)):
            k, cache = 4 * layer, None if caches is None else caches[layer]
            row_attn, row_cmlp = self.row_attns[layer], self.row_cmlps[layer]
            col_attn, col_cmlp = self.col_attns[layer], self.col_cmlps[layer]
            x = residual(k, x, row_attn(x, row_attn.condition(z)))
            x = residual(k + 1, x, row_cmlp(self.row_ffs[layer](x), row_cmlp.condition(z)))
            x = residual(k + 2, x, col_attn(x, col_attn.condition(z), cache))
            x = residual(k + 3, x, col_cmlp(self.col_ffs[layer](x), col_cmlp.condition(z)))
        return x


class RowInputs(NamedTuple):
    """What the inner decoder reads per position besides its input: z, u and their conditioning."""

    z: torch.Tensor  # (N, H', W', D)
    upper: torch.Tensor  # (N, H', W', D)
    conditioning: list  # per layer: (attention's (q, k, v) conditioning, cMLP conditioning), (N, H', W', ...)


def _select_column(tree, column: torch.Tensor):
    """Every tensor of nested tuples/lists (None kept) at `column` of its width axis (dim 2)."""
    if tree is None or isinstance(tree, torch.Tensor):
        return None if tree is None else tree.index_select(2, column)
    items = [_select_column(t, column) for t in tree]
    return RowInputs(*items) if isinstance(tree, RowInputs) else type(tree)(items)


def _copy_into(dst, src) -> None:
    """Copy every tensor of nested tuples/lists into the same-shaped buffers of `dst`, in place."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif dst is not None:
        for d, s in zip(dst, src, strict=True):
            _copy_into(d, s)


class InnerDecoder(nn.Module):
    """Per layer: masked row attention, FF; attention and MLP conditioned on concat(z, u), cLN on z only
    (u would leak later rows through the spatial average).

    `forward` runs all pixels at once (teacher forcing). Sampling calls `start_row` once per row (it keeps
    that row's z, u and their conditioning in the cache) and `step` once per pixel against the row
    attentions' key/value caches; each step gives what `forward` gives at that pixel."""

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
        norms = [norm.condition(z) for norm in self.norms]
        return self._layers(x, RowInputs(z, upper, self._conditioning(z, upper)), norms)

    def _conditioning(self, z: torch.Tensor, upper: torch.Tensor) -> list:
        context = torch.cat((z, upper), dim=-1)  # z first, as the official code
        return [(att.condition(context), mlp.condition(context))
                for att, mlp in zip(self.attns, self.cmlps, strict=True)]

    def new_cache(self, z: torch.Tensor, dtype: torch.dtype) -> DecoderCache:
        """A cache for stepping one row at a time, one pixel at a time, of images whose encoder output is z."""
        cache = _new_cache(self, self.attns, z.shape[0], z, dtype)
        row = torch.zeros_like(z[:, :1])  # (N, 1, W, D) buffers that `start_row` fills
        cache.row = RowInputs(row, row.clone(), self._conditioning(row, row))
        return cache

    def start_row(self, z: torch.Tensor, upper: torch.Tensor, cache: DecoderCache,
                  official_row_cln: bool = False) -> None:
        """Load the next row to step: its z and u (N, 1, W, D) and their conditioning; the column index goes back
        to 0. `official_row_cln` feeds the norms only this row of z, as the official sampler did (training
        averaged the whole z)."""
        cache.position.zero_()
        _copy_into(cache.row, RowInputs(z, upper, self._conditioning(z, upper)))
        if official_row_cln:
            _copy_into(cache.norms, [norm.condition(z) for norm in self.norms])

    def step(self, previous: torch.Tensor, row: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """The pixel at (row, cache.position) of the row `start_row` loaded: previous (N, 1, 1, D) is the
        embedding of the pixel to its left (zeros in column 0) -> (N, 1, 1, D)."""
        x = self.pos_embed(previous, row=row, column=cache.position)
        return self._layers(x, _select_column(cache.row, cache.position), cache.norms, cache.layers)

    def _layers(self, x, inputs: RowInputs, norm_conditioning, caches=None):
        if self.skip:
            x = x + inputs.z + inputs.upper
        residual = partial(_residual, self.norms, norm_conditioning, self.dropout)
        for layer, (att_cond, cmlp_cond) in enumerate(inputs.conditioning):
            cache = None if caches is None else caches[layer]
            x = residual(2 * layer, x, self.attns[layer](x, att_cond, cache))
            x = residual(2 * layer + 1, x, self.cmlps[layer](self.ffs[layer](x), cmlp_cond))
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
        """Logits in the weights' precision (float32) even under autocast: losses and draws come from
        full-precision logits."""
        with torch.autocast(activations.device.type, enabled=False):
            return self.final_dense(self.final_norm(activations.to(self.final_dense.weight.dtype)))

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
