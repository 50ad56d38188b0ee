"""Exact autoregressive sampling for ColTranCore: the model's own decoders stepped against key/value caches.

The encoder and auxiliary head run once per image. Per pixel, `InnerDecoder.step` and the head give the logits
and the image's uniform stream picks the symbol; per finished row, `OuterDecoder.step` gives u of the next row.
Positions are tensors and every buffer is preallocated, so `compile=True` compiles the steps once per model
structure, precision and batch of one or more (`coltran.sampling.compiled`) and, on CUDA, replays one row of pixel
steps as a captured CUDA graph; eager is the reference. Re-scoring a sample with the teacher-forced network reproduces its probabilities.
`official_row_cln=True` reproduces the official sampler, whose inner-decoder cLN sees only the current row of z.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from coltran.nn import DecoderCache
from coltran.sampling import compiled
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


@dataclass
class _State:
    """Everything the steps read and write. Tensors change only in place, so their addresses stay fixed."""

    z: torch.Tensor  # (N, H, W, D) encoder output
    uniforms: torch.Tensor  # (N, H*W) float32
    greedy: torch.Tensor  # () bool: argmax instead of sampling
    temperature: torch.Tensor  # () float32
    symbols: torch.Tensor  # (N, H*W) int64
    log_probs: torch.Tensor  # (N, H*W) float32
    probs: torch.Tensor | None  # (N, H*W, 512) float32
    outer: DecoderCache  # position: the row being sampled
    inner: DecoderCache  # position: the column being sampled; holds the row's inputs
    previous: torch.Tensor  # (N, 1, 1, D) embedding of the pixel to the left (zeros in column 0)
    official_row_cln: bool


def sample_pixel(model, s: _State) -> None:
    """Sample the pixel at (outer.position, inner.position) and move one column right."""
    row, column = s.outer.position, s.inner.position
    logits = model.head(model.inner_decoder.step(s.previous, row, s.inner)).flatten(0, 2)  # (N, 512) float32
    pixel = row * s.z.shape[2] + column  # (1,) raster index
    chosen, probs = draw_symbols(logits, s.uniforms.index_select(1, pixel)[:, 0], s.greedy, s.temperature)
    s.symbols.index_copy_(1, pixel, chosen[:, None])
    s.log_probs.index_copy_(1, pixel, torch.log_softmax(logits, -1).gather(-1, chosen[:, None]))
    if s.probs is not None:
        s.probs.index_copy_(1, pixel, probs[:, None])
    s.previous.copy_(model.pixel_embed(chosen).view_as(s.previous))
    column.add_(1)


def next_row(model, s: _State) -> None:
    """Run the outer decoder on the finished row, giving u of the next row, and start that row."""
    n, height, width, _ = s.z.shape
    row = s.outer.position
    embeddings = model.pixel_embed(s.symbols.view(n, height, width).index_select(1, row))  # (N, 1, W, D)
    upper = model.outer_decoder.step(embeddings, s.z.index_select(1, row), s.outer)
    row.add_(1)
    _start_row(model, s, upper)


def _start_row(model, s: _State, upper: torch.Tensor) -> None:
    s.previous.zero_()
    model.inner_decoder.start_row(s.z.index_select(1, s.outer.position), upper, s.inner, s.official_row_cln)


def sample_pixels(model, s: _State, count: int) -> None:
    """`count` pixels of the current row, left to right: compiled, one call runs them all, so the per-call cost
    of a compiled graph (tens of microseconds on CPU, comparable to a pixel's work) is paid once per `count`."""
    for _ in range(count):
        sample_pixel(model, s)


PIXELS_PER_CALL = 8  # compiled pixels per call: 8 leaves a few us of per-call cost per pixel; more costs compile time


@torch.no_grad()
def sample_colorizer(model, gray: torch.Tensor, *, num_samples: int = 1, mode: str = "sample",
                     temperature: float = 1.0, seeds: Sequence[int] | None = None,
                     uniforms: torch.Tensor | None = None, official_row_cln: bool = False,
                     return_probs: bool = False, compile: bool = False) -> ColorizerSamples:
    """Colour symbols for gray (B, H, W) in 0..255, `num_samples` per image, batched together.

    seeds: one per image (default 0, 1, ..., B-1); ignored when `uniforms` (N, H*W) is given.
    compile: torch.compile the row and pixel steps (compiled once per process, model and batch shape) and, on
    CUDA, replay each row's pixel steps as one CUDA graph. Under autocast the caches live in the autocast dtype
    and the logits and draws stay float32.
    """
    check_mode(mode, temperature)
    if model.training:
        raise RuntimeError("sample_colorizer needs the model in eval mode (call model.eval())")
    height, width = model.config.resolution
    if gray.dim() != 3 or tuple(gray.shape[1:]) != (height, width):
        raise ValueError(f"gray must be (B, {height}, {width}), got {tuple(gray.shape)}")
    device = next(model.parameters()).device
    batch = gray.shape[0]
    if uniforms is None:
        seeds = list(range(batch)) if seeds is None else list(seeds)
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} images")
        uniforms = make_uniforms(seeds, num_samples, height * width, device)
    z = model.encode(gray.to(device).long())  # each image once, then repeated per sample
    aux = model.encoder_logits(z)
    parallel = None if aux is None else symbols_to_colors(aux[..., 0, :].argmax(-1)).to(torch.uint8)
    z = z.repeat_interleave(num_samples, dim=0)
    s = sample_rows(model, z, uniforms.to(device), mode, temperature, official_row_cln, return_probs, compile,
                    height)
    symbols = s.symbols.view(-1, height, width)
    probs = None if s.probs is None else s.probs.view(-1, height, width, s.probs.shape[-1])
    parallel = None if parallel is None else parallel.repeat_interleave(num_samples, dim=0)
    return ColorizerSamples(symbols, symbols_to_colors(symbols).to(torch.uint8),
                            s.log_probs.view(-1, height, width), probs, parallel)


def sample_rows(model, z, uniforms, mode, temperature, official_row_cln, return_probs, compile, rows) -> _State:
    """The first `rows` rows (benchmarks time a prefix) of samples for the encoder output z (N, H, W, D)."""
    model = _with_step_weights(model, z.device.type)
    s = _initial_state(model, z, uniforms, mode, temperature, official_row_cln, return_probs)
    _generate(model, s, compile, rows)
    return s


def _with_step_weights(model, device_type: str):
    """Under autocast, a copy of the model whose decoders' matmul weights are cast to the autocast dtype once
    here rather than at every step (autocast would cast them to the same values); the head keeps its float32
    weights and the encoder, which has run, is shared."""
    if not torch.is_autocast_enabled(device_type):
        return model
    dtype = torch.get_autocast_dtype(device_type)
    steps = copy.deepcopy(model, {id(model.encoder): model.encoder})
    for module in [*steps.outer_decoder.modules(), *steps.inner_decoder.modules()]:
        if isinstance(module, torch.nn.Linear):
            module.to(dtype)
    return steps


def _initial_state(model, z, uniforms, mode, temperature, official_row_cln, return_probs) -> _State:
    n, height, width, d = z.shape
    dtype = torch.get_autocast_dtype(z.device.type) if torch.is_autocast_enabled(z.device.type) else z.dtype
    pixels = height * width
    s = _State(
        # a fresh tensor: a view's base (its stride depends on num_samples) would be guarded and recompile
        z=z.clone(memory_format=torch.contiguous_format), uniforms=uniforms.float(), greedy=torch.tensor(mode == "argmax", device=z.device),
        temperature=torch.tensor(float(temperature), device=z.device),
        symbols=torch.zeros(n, pixels, dtype=torch.long, device=z.device),
        log_probs=torch.zeros(n, pixels, device=z.device),
        probs=torch.zeros(n, pixels, model.final_dense.out_features, device=z.device) if return_probs else None,
        outer=model.outer_decoder.new_cache(z, dtype), inner=model.inner_decoder.new_cache(z, dtype),
        previous=z.new_zeros(n, 1, 1, model.pixel_embed.embedding_dim), official_row_cln=official_row_cln,
    )
    _start_row(model, s, z.new_zeros(n, 1, width, d))  # row 0: u is zero
    return s


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, DecoderCache):
        yield from _tensors([tree.norms, tree.row, *((c.keys, c.values) for c in tree.layers)])
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _tensors(t)


def _generate(model, s: _State, compile: bool, rows: int) -> None:
    """The raster loop: the row's pixels, then one row step. Compiled, `count` pixels go per call, and on CUDA
    the rows after the first replay a captured graph."""
    height, width = s.z.shape[1:3]
    device = s.z.device
    count = math.gcd(width, PIXELS_PER_CALL) if compile else 1
    pixels, row = sample_pixels, next_row
    if compile:
        compiled.mark_batch_dynamic(_tensors([s.z, s.uniforms, s.symbols, s.log_probs, s.probs, s.previous,
                                              s.outer, s.inner]))
        pixels, row = compiled.compiled(sample_pixels, device.type), compiled.compiled(next_row, device.type)
    graph = None
    for i in range(rows):
        with compiled.steady(compile and i > 0), _single_threaded(device):  # row 0 runs every guard
            if graph is not None:
                graph.replay()
            else:
                for _ in range(width // count):
                    pixels(model, s, count)
        if compile and device.type == "cuda" and graph is None and i + 2 < rows:
            graph = compiled.capture(partial(pixels, model, s, count), width // count)  # row i + 1 replays it
        if i + 1 < height:
            with compiled.steady(compile and i > 0):
                row(model, s)


@contextlib.contextmanager
def _single_threaded(device: torch.device):
    """On CPU a pixel step's ops take microseconds: OpenMP fork/join costs more than it saves, and on a busy
    machine spinning threads slow the loop down several-fold. The pixel loop runs on one thread; the encoder
    and the row steps, which parallelise well, keep all threads."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
