"""Fast, exact autoregressive sampling for ColTranCore with key/value caches.

The official sampler re-runs the whole outer decoder once per row and the inner decoder on a whole row once per
pixel. Here: the encoder and auxiliary head run once; the outer decoder advances one row at a time, its masked
column attention reading cached keys/values of the finished rows; the inner decoder advances one pixel at a
time over cached row keys/values; the cLN scales/shifts (position independent) are computed once per image and
the conditional projections of the context once per row. Shapes are static (full-length caches plus the
additive mask), so the per-pixel step is graph-capturable on CUDA.

Results equal the teacher-forced network: re-scoring a sample reproduces its probabilities.
`official_row_cln=True` reproduces the official sampler, whose inner-decoder cLN sees only the current row of z.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coltran.sampling.draw import check_mode, draw_symbols, make_uniforms
from coltran.transforms import symbols_to_colors


@dataclass
class ColorizerSamples:
    """N = images * num_samples, image-major. colors3: 3-bit colours (multiply by 32 for the coarse image)."""

    symbols: torch.Tensor  # (N, H, W) int64 in 0..511
    colors3: torch.Tensor  # (N, H, W, 3) uint8 in 0..7
    log_probs: torch.Tensor  # (N, H, W) log-probability of each chosen symbol (temperature 1)
    probs: torch.Tensor | None  # (N, H, W, 512) when asked for
    parallel: torch.Tensor | None  # (N, H, W, 3) uint8 argmax of the auxiliary head, if the model has one


def _flat(mod: tuple[torch.Tensor, torch.Tensor], shape: tuple[int, ...]):
    """cLN (scale, shift) of shape (N, 1, 1, D), or plain LN (D,), reshaped to broadcast over `shape`."""
    return tuple(m if m.dim() == 1 else m.reshape(shape) for m in mod)


class _OuterRowStepper:
    """Computes the outer decoder's output for one finished row, given the cached rows above it."""

    def __init__(self, outer, z: torch.Tensor):
        n, height, width, _ = z.shape
        self.outer, self.z = outer, z
        self.pos = outer.pos_embed.table()  # (H, W, D)
        self.mods = [_flat(norm.modulation(z), (n, 1, -1)) for norm in outer.norms]
        self.keys, self.values = [], []
        for att in outer.col_attns:
            shape = (n, width, att.num_heads, height, att.head_size)
            self.keys.append(z.new_zeros(shape))
            self.values.append(z.new_zeros(shape))

    def step(self, i: int, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings (N, W, D) of row i -> outer output (N, W, D) of row i (the inner context of row i + 1)."""
        o, zi = self.outer, self.z[:, i]
        norm = o.norms[0].normalize
        x = embeddings + self.pos[i]
        if o.skip:
            x = x + zi
        for layer in range(len(o.row_attns)):
            mods = self.mods[4 * layer: 4 * layer + 4]
            x = norm(x + o.row_attns[layer](x[:, None], zi[:, None])[:, 0], mods[0])
            x = norm(x + o.row_cmlps[layer](o.row_ffs[layer](x), zi), mods[1])
            att = o.col_attns[layer]
            q, k, v = att.project(x, zi)  # (N, W, h, C)
            self.keys[layer][:, :, :, i] = k
            self.values[layer][:, :, :, i] = v
            bias = att.bias_matrix()[:, i : i + 1, :].to(q.dtype)  # (h, 1, H): rows > i masked
            out = F.scaled_dot_product_attention(q.unsqueeze(-2), self.keys[layer], self.values[layer],
                                                 attn_mask=bias, scale=1.0)  # (N, W, h, 1, C)
            x = norm(x + att.out(out.flatten(-3)), mods[2])
            x = norm(x + o.col_cmlps[layer](o.col_ffs[layer](x), zi), mods[3])
        return x


class _InnerPixelStepper:
    """Runs the inner decoder and the head for one pixel at a time within a row."""

    def __init__(self, model, z: torch.Tensor, official_row_cln: bool):
        inner = model.inner_decoder
        n, _, width, _ = z.shape
        self.model, self.inner, self.z, self.row_cln = model, inner, z, official_row_cln
        self.pos = inner.pos_embed.table()
        self.full_mods = None if official_row_cln else [_flat(nm.modulation(z), (n, -1)) for nm in inner.norms]
        self.qkv_weights, self.bias_rows, self.keys, self.values = [], [], [], []
        for att in inner.attns:
            self.qkv_weights.append(torch.cat((att.q.weight, att.k.weight, att.v.weight)))  # (3hC, D)
            self.bias_rows.append(att.bias_matrix())  # (h, W, W)
            shape = (n, att.num_heads, width, att.head_size)
            self.keys.append(z.new_zeros(shape))
            self.values.append(z.new_zeros(shape))

    def start_row(self, i: int, upper: torch.Tensor) -> None:
        """Precompute everything of row i that does not depend on the pixels being generated."""
        zi = self.z[:, i]
        self.base = self.pos[i] + zi + upper if self.inner.skip else self.pos[i].expand_as(zi)  # (N, W, D)
        context = torch.cat((zi, upper), dim=-1)  # (N, W, 2D)
        self.scales, self.shifts, self.cmlp_mods = [], [], []
        for att, cmlp in zip(self.inner.attns, self.inner.cmlps, strict=True):
            scale, shift = self._qkv_conditioning(att, context)
            self.scales.append(scale)
            self.shifts.append(shift)
            self.cmlp_mods.append(cmlp.modulation(context))
        if self.row_cln:  # official quirk: the cLN average sees only row i of z
            n = zi.shape[0]
            self.mods = [_flat(nm.modulation(self.z[:, i : i + 1]), (n, -1)) for nm in self.inner.norms]
        else:
            self.mods = self.full_mods

    @staticmethod
    def _qkv_conditioning(att, context: torch.Tensor):
        """Per-position (scale, shift) for q, k, v stacked: (N, W, 3, h, C) each; identity where unconditioned."""
        n, width, _ = context.shape
        shape = (n, width, att.num_heads, att.head_size)
        scales, shifts = [], []
        for proj in (att.cond_q, att.cond_k, att.cond_v):
            scale, shift = context.new_ones(shape), context.new_zeros(shape)
            if proj is not None:
                cond_scale, shift = att.cond_scale_shift(proj, context)
                scale = scale if cond_scale is None else cond_scale
            scales.append(scale)
            shifts.append(shift)
        return torch.stack(scales, dim=2), torch.stack(shifts, dim=2)

    def step(self, j: int, previous: torch.Tensor | None) -> torch.Tensor:
        """previous: embedding (N, D) of pixel j - 1 (None at j = 0) -> logits (N, 512) of pixel j."""
        inner = self.inner
        norm = inner.norms[0].normalize
        x = self.base[:, j] if previous is None else self.base[:, j] + previous
        n = x.shape[0]
        for layer, att in enumerate(inner.attns):
            qkv = F.linear(x, self.qkv_weights[layer]).view(n, 3, att.num_heads, att.head_size)
            q, k, v = (qkv * self.scales[layer][:, j] + self.shifts[layer][:, j]).unbind(1)
            self.keys[layer][:, :, j] = k
            self.values[layer][:, :, j] = v
            bias = self.bias_rows[layer][:, j : j + 1, :].to(q.dtype)  # (h, 1, W): pixels > j masked
            out = F.scaled_dot_product_attention((q * att.head_size**-0.5).unsqueeze(-2), self.keys[layer],
                                                 self.values[layer], attn_mask=bias, scale=1.0)  # (N, h, 1, C)
            x = norm(x + att.out(out.reshape(n, -1)), self.mods[2 * layer])
            y = inner.cmlps[layer].modulate(inner.ffs[layer](x), self.cmlp_mods[layer][:, j])
            x = norm(x + y, self.mods[2 * layer + 1])
        return self.model.head(x)


@torch.no_grad()
def sample_colorizer(model, gray: torch.Tensor, *, num_samples: int = 1, mode: str = "sample",
                     temperature: float = 1.0, seeds: Sequence[int] | None = None,
                     uniforms: torch.Tensor | None = None, official_row_cln: bool = False,
                     return_probs: bool = False) -> ColorizerSamples:
    """Colour symbols for gray (B, H, W) in 0..255, `num_samples` per image, batched together.

    seeds: one per image (default 0 for every image); ignored when `uniforms` (N, H*W) is given.
    """
    check_mode(mode, temperature)
    if model.training:
        raise RuntimeError("sample_colorizer needs the model in eval mode (call model.eval())")
    height, width = model.config.resolution
    if gray.dim() != 3 or tuple(gray.shape[1:]) != (height, width):
        raise ValueError(f"gray must be (B, {height}, {width}), got {tuple(gray.shape)}")
    device = next(model.parameters()).device
    batch = gray.shape[0]
    gray = gray.to(device).long().repeat_interleave(num_samples, dim=0)
    if uniforms is None:
        seeds = [0] * batch if seeds is None else list(seeds)
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} images")
        uniforms = make_uniforms(seeds, num_samples, height * width, device)
    uniforms = uniforms.to(device)

    z = model.encode(gray)
    aux = model.encoder_logits(z)
    parallel = None if aux is None else symbols_to_colors(aux[..., 0, :].argmax(-1)).to(torch.uint8)
    with _single_threaded(device):
        symbols, log_probs, probs_out = _generate(model, z, uniforms, mode, temperature, official_row_cln,
                                                  return_probs)
    colors3 = symbols_to_colors(symbols).to(torch.uint8)
    return ColorizerSamples(symbols, colors3, log_probs, probs_out, parallel)


@contextlib.contextmanager
def _single_threaded(device: torch.device):
    """On CPU the per-pixel ops take microseconds: OpenMP fork/join costs more than it saves, and on a busy
    machine spinning threads slow the loop down several-fold. Run the loop on one thread, then restore."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _generate(model, z, uniforms, mode, temperature, official_row_cln, return_probs):
    """The raster loop: one inner-decoder step per pixel, one outer-decoder step per finished row."""
    n, height, width, _ = z.shape
    device = z.device
    outer, inner = _OuterRowStepper(model.outer_decoder, z), _InnerPixelStepper(model, z, official_row_cln)
    symbols = torch.zeros(n, height, width, dtype=torch.long, device=device)
    log_probs = torch.zeros(n, height, width, device=device)
    probs_out = torch.zeros(n, height, width, 512, device=device) if return_probs else None
    upper = torch.zeros_like(z[:, 0])
    for i in range(height):
        inner.start_row(i, upper)
        previous = None
        for j in range(width):
            logits = inner.step(j, previous)
            chosen, probs = draw_symbols(logits, uniforms[:, i * width + j], mode, temperature)
            symbols[:, i, j] = chosen
            log_probs[:, i, j] = torch.log_softmax(logits.float(), -1).gather(-1, chosen[:, None])[:, 0]
            if probs_out is not None:
                probs_out[:, i, j] = probs
            previous = model.pixel_embed(chosen)
        if i + 1 < height:
            upper = outer.step(i, model.pixel_embed(symbols[:, i]))
    return symbols, log_probs, probs_out
