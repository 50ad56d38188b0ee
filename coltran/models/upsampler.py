"""Colour and spatial upsamplers (paper sec. 4.3; official `models/upsampler.py`).

Both are parallel (non-autoregressive): per channel c, a token (the channel's coarse value offset by c so the
network knows which channel it sees) and the gray value are embedded, concatenated, mixed by a Dense, passed
through the unmasked axial encoder and mapped to 256 logits. Channels never see each other; they are folded
into the batch and share weights.
"""

from __future__ import annotations

import torch
from torch import nn

from coltran.configs import ColorUpsamplerConfig, SpatialUpsamplerConfig
from coltran.losses import bits_per_dim
from coltran.nn import AxialEncoder
from coltran.nn.init import dense, one_hot_dense
from coltran.transforms import to_3bit

ARGMAX_ROWS = 4096  # positions per slice of the final dense in argmax prediction: 4 MB of float32 logits


class _ChannelUpsampler(nn.Module):
    """Shared body; subclasses set how many values a channel token takes (8 or 256)."""

    token_values: int

    def __init__(self, cfg):
        super().__init__()
        cfg.validate()
        self.config = cfg
        height, width = cfg.resolution
        d = cfg.hidden_size
        self.token_embed = one_hot_dense(3 * self.token_values, d)
        self.gray_embed = one_hot_dense(256, d)
        self.input_dense = dense(2 * d, d)
        self.encoder = AxialEncoder(height, width, d, cfg.ff_size, cfg.num_heads, cfg.num_encoder_layers,
                                    cfg.dropout)
        self.final_dense = dense(d, 256)

    def forward(self, gray: torch.Tensor, tokens: torch.Tensor, channel_index: torch.Tensor | None = None):
        """gray (B, H, W); tokens (B, H, W, C) channel values; channel_index (B,) when C == 1 and the slice is a
        random channel. Returns logits (B, H, W, C, 256)."""
        return self.final_dense(self.features(gray, tokens, channel_index)).permute(0, 2, 3, 1, 4)

    def features(self, gray: torch.Tensor, tokens: torch.Tensor, channel_index: torch.Tensor | None = None):
        """The encoder's output (B, C, H, W, D) that the final dense maps to logits; arguments as `forward`."""
        batch, _, _, channels = tokens.shape
        if channel_index is not None:
            if channels != 1:
                raise ValueError(f"channel_index needs a single-channel slice, got {channels} channels")
            offsets = channel_index.long().view(batch, 1, 1, 1)
        else:
            offsets = torch.arange(channels, device=tokens.device)
        tokens = (tokens.long() + self.token_values * offsets).permute(0, 3, 1, 2)  # (B, C, H, W)
        gray_embed = self.gray_embed(gray.long()).unsqueeze(1).expand(-1, channels, -1, -1, -1)
        x = self.input_dense(torch.cat((self.token_embed(tokens), gray_embed), dim=-1))  # (B, C, H, W, D)
        return self.encoder(x.flatten(0, 1)).unflatten(0, (batch, channels))

    def channel_features(self, gray: torch.Tensor, tokens: torch.Tensor, channel: int) -> torch.Tensor:
        """Channel `channel` of `tokens` (B, H, W, C) through the encoder alone: its features (B, H, W, D), as that
        channel's slice of `features(gray, tokens)` gives them, at a third of the cost for 3 channels."""
        index = torch.full((tokens.shape[0],), channel, device=tokens.device)
        return self.features(gray, tokens[..., channel : channel + 1], index)[:, 0]

    def channel_logits(self, gray: torch.Tensor, tokens: torch.Tensor, channel: int) -> torch.Tensor:
        """That channel's logits (B, H, W, 256), computed alone (`channel_features`)."""
        return self.final_dense(self.channel_features(gray, tokens, channel))

    @torch.no_grad()
    def predict(self, gray: torch.Tensor, tokens: torch.Tensor, mode: str = "argmax",
                generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, H, W, C): argmax (the shipped mode) or a categorical draw, one channel at a time to bound
        memory (the 256x256 logits of 3 channels are large). Argmax maps ARGMAX_ROWS positions at a time to their
        logits and picks at once, so the logits never leave the cache (on a CPU, writing and re-reading the 64 MB
        of a 256x256 channel's logits cost a fifth of the prediction)."""
        if mode not in ("argmax", "sample"):
            raise ValueError(f"mode must be 'argmax' or 'sample', got {mode!r}")
        outs = []
        for c in range(tokens.shape[-1]):
            if mode == "argmax":
                x = self.channel_features(gray, tokens, c)  # (B, H, W, D)
                rows = x.reshape(-1, x.shape[-1]).split(ARGMAX_ROWS)
                outs.append(torch.cat([self.final_dense(r).argmax(-1) for r in rows]).view(x.shape[:-1]))
            else:
                logits = self.channel_logits(gray, tokens, c).float()
                probs = torch.softmax(logits, -1).reshape(-1, 256)
                outs.append(torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1]))
        return torch.stack(outs, dim=-1).to(torch.uint8)

    def _loss(self, gray, labels, tokens, random_channel, generator):
        """labels/tokens (B, H, W, 3); with random_channel one channel per example is scored (training)."""
        if random_channel:
            index = torch.randint(0, 3, (labels.shape[0],), generator=generator).to(labels.device)
            pick = index.view(-1, 1, 1, 1).expand(-1, *labels.shape[1:3], 1)
            labels, tokens = labels.gather(-1, pick), tokens.gather(-1, pick)
            logits = self(gray, tokens, index)
        else:
            logits = self(gray, tokens)
        loss = bits_per_dim(logits, labels)
        return loss, {"loss": loss.detach(), "total_loss": loss.detach()}


class ColorUpsampler(_ChannelUpsampler):
    """3-bit 64x64 colours + gray(64) -> 8-bit 64x64 colours. Tokens: 3-bit value + 8c (one-hot 24)."""

    token_values = 8

    def __init__(self, cfg: ColorUpsamplerConfig):
        super().__init__(cfg)

    def loss(self, batch: dict, random_channel: bool = True, generator: torch.Generator | None = None):
        """Bits per sub-pixel from `gray_64` (B, 64, 64) and `rgb_64` (B, 64, 64, 3) uint8."""
        rgb = batch["rgb_64"].long()
        return self._loss(batch["gray_64"], rgb, to_3bit(rgb), random_channel, generator)


class SpatialUpsampler(_ChannelUpsampler):
    """Blocky 8-bit colours (64x64 blown up 4x by nearest) + gray(256) -> 256x256 colours.
    Tokens: 8-bit value + 256c (one-hot 768)."""

    token_values = 256

    def __init__(self, cfg: SpatialUpsamplerConfig):
        super().__init__(cfg)

    def loss(self, batch: dict, random_channel: bool = True, generator: torch.Generator | None = None):
        """Bits per sub-pixel from `gray_256`, `rgb_256` and `rgb_64` uint8; the input is rgb_64 replicated up
        to the model's resolution (the official area resize upward by an integer factor)."""
        rgb, low = batch["rgb_256"].long(), batch["rgb_64"].long()
        factor = rgb.shape[1] // low.shape[1]
        blocky = low.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
        return self._loss(batch["gray_256"], rgb, blocky, random_channel, generator)
