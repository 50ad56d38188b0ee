"""Pixel transforms of the official ColTran pipeline: TF-exact grayscale, 3-bit quantisation, colour symbols,
square crops, TF "area" resizing and the per-image `prepare_example` (reference section 1)."""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # TF rgb_to_grayscale; they sum to 0.9999, so white -> 254
_W32 = tuple(np.float32(w) for w in GRAY_WEIGHTS)
CROP_MODES = ("center", "random")


def _is_torch(x: Any) -> bool:
    """Whether `x` is a torch tensor. Torch is not imported here: a tensor can only exist once something has
    imported it, so numpy-only users (the preprocessing workers) never pay its import (~225 MB per process)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _torch():
    """The torch module, for the tensor branches (already imported whenever they run)."""
    import torch

    return torch


def _check_integer(x: Any, name: str) -> None:
    dtype_ok = (not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != _torch().bool) \
        if _is_torch(x) else np.issubdtype(x.dtype, np.integer)
    if not dtype_ok:
        raise TypeError(f"{name} expects an integer array or tensor, got dtype {x.dtype}")


def _as_array(x: Any) -> Any:
    return x if _is_torch(x) or isinstance(x, np.ndarray) else np.asarray(x)


def rgb_to_gray(rgb: Any) -> Any:
    """TF `rgb_to_grayscale` on [..., 3] integers 0..255 -> [..., H, W] (channel axis dropped).

    Computed exactly like TF: float32 `trunc((0.2989 R + 0.5870 G) + 0.1140 B)`, each product and sum a separate
    float32 operation (exact on all 2^24 colours). Integer inputs keep their dtype (uint8 -> uint8); float inputs
    (values on the 0..255 scale) give float32 holding the truncated values. Works on numpy arrays and torch tensors.
    """
    rgb = _as_array(rgb)
    if rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_gray expects [..., 3] RGB, got shape {tuple(rgb.shape)}")
    if _is_torch(rgb):
        torch = _torch()
        f = rgb.to(torch.float32)
        w = [torch.tensor(float(v), dtype=torch.float32, device=rgb.device) for v in _W32]
        # Separate eager ops: no fused multiply-add, so every step rounds to float32 like TF.
        gray = torch.trunc(torch.add(torch.add(f[..., 0] * w[0], f[..., 1] * w[1]), f[..., 2] * w[2]))
        return gray if rgb.dtype.is_floating_point else gray.to(rgb.dtype)
    f = rgb.astype(np.float32)
    gray = np.trunc((f[..., 0] * _W32[0] + f[..., 1] * _W32[1]) + f[..., 2] * _W32[2])
    return gray if np.issubdtype(rgb.dtype, np.floating) else gray.astype(rgb.dtype)


def convert_bits(x: Any, n_bits_in: int, n_bits_out: int) -> Any:
    """Official `base_utils.convert_bits` (note its TF argument order was (x, n_bits_out, n_bits_in)).

    Fewer bits: truncating division by 2^(in-out) (8->3 is x // 32); more bits: multiplication by 2^(out-in)
    (5->8 gives 0, 8, ..., 248). Integer input only; the dtype is kept. Numpy arrays or torch tensors.
    """
    for name, bits in (("n_bits_in", n_bits_in), ("n_bits_out", n_bits_out)):
        if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
            raise ValueError(f"convert_bits: {name} must be an int in 1..16, got {bits!r}")
    x = _as_array(x)
    _check_integer(x, "convert_bits")
    if n_bits_in == n_bits_out:
        return x
    if n_bits_out < n_bits_in:
        return x // (1 << (n_bits_in - n_bits_out))
    return x * (1 << (n_bits_out - n_bits_in))


def to_3bit(x: Any) -> Any:
    """8-bit values -> 3-bit bins `floor(x / 32)` in 0..7 (dtype kept, uint8 stays uint8)."""
    return convert_bits(x, 8, 3)


def from_3bit(k: Any) -> Any:
    """3-bit bins -> 8-bit values `32 * k` (the bin's LOWER edge 0, 32, ..., 224, as in ColTran)."""
    return convert_bits(k, 3, 8)


def colors_to_symbols(c3: Any) -> Any:
    """[..., 3] 3-bit colours (0..7) -> int64 [...] symbols `64 r + 8 g + b` in 0..511."""
    c3 = _as_array(c3)
    _check_integer(c3, "colors_to_symbols")
    if c3.ndim < 1 or c3.shape[-1] != 3:
        raise ValueError(f"colors_to_symbols expects [..., 3] colours, got shape {tuple(c3.shape)}")
    c = c3.to(_torch().int64) if _is_torch(c3) else c3.astype(np.int64)
    return c[..., 0] * 64 + c[..., 1] * 8 + c[..., 2]


def symbols_to_colors(s: Any) -> Any:
    """Symbols 0..511 [...] -> [..., 3] 3-bit colours (r = s // 64, g = (s % 64) // 8, b = s % 8); dtype kept."""
    s = _as_array(s)
    _check_integer(s, "symbols_to_colors")
    parts = (s // 64, (s // 8) % 8, s % 8)
    return _torch().stack(parts, dim=-1) if _is_torch(s) else np.stack(parts, axis=-1)


def square_crop_box(height: int, width: int, mode: str = "center",
                    rng: np.random.Generator | None = None) -> tuple[int, int, int]:
    """(top, left, size) of the square crop of side min(H, W): centred ((H-s)//2, (W-s)//2) for eval, uniform
    over all valid positions for training (`rng` or a fresh unseeded generator)."""
    if height < 1 or width < 1:
        raise ValueError(f"square_crop_box needs a positive image size, got {height}x{width}")
    size = min(height, width)
    if mode == "center":
        return (height - size) // 2, (width - size) // 2, size
    if mode == "random":
        rng = np.random.default_rng() if rng is None else rng
        return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1)), size
    raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")


@functools.lru_cache(maxsize=256)
def area_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float64 weights of TF's area resize along one axis (read-only, cached).

    Output pixel o covers [o*r, (o+1)*r) of the input with r = in/out; each input pixel i is weighted by its
    overlap with that span divided by r. Works both ways: upward it blends the (at most two) covered pixels.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"area resize sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    lo = np.arange(out_size, dtype=np.float64)[:, None] * scale
    hi = lo + scale
    i = np.arange(in_size, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0.0, None)
    weights = overlap / scale
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=256)
def _area_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero band of `area_weights` as K taps: input indices [K, out] and weights [K, out] (0 = padding)."""
    weights = area_weights(in_size, out_size)
    first = np.argmax(weights > 0, axis=1)
    count = (weights > 0).sum(axis=1)
    k = np.arange(count.max())[:, None]
    idx = np.minimum(first[None, :] + k, in_size - 1)
    taps = np.where(k < count[None, :], np.take_along_axis(weights.T, idx, axis=0), 0.0)
    idx.setflags(write=False)
    taps.setflags(write=False)
    return idx, taps


def area_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF `resize(method='area')` + half-to-even rounding of a uint8 [H, W] or [H, W, C] image -> uint8.

    Separable fractional box filter in float64 (applied as a few taps per output pixel, width then height); equals
    TF exactly for integer ratios and upsampling, and within 1 on a handful of values for non-integer downsampling
    (TF accumulates in float32).
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3) or img.dtype != np.uint8:
        raise ValueError(f"area_resize expects a uint8 [H, W] or [H, W, C] image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img.copy()
    x = img.reshape(h, w, -1)
    idx, taps = _area_taps(w, out_w)
    cols = x[:, idx[0], :] * taps[0][None, :, None]  # width pass: [H, out_w, C] float64
    for k in range(1, len(idx)):
        cols += x[:, idx[k], :] * taps[k][None, :, None]
    idx, taps = _area_taps(h, out_h)
    out = cols[idx[0]] * taps[0][:, None, None]  # height pass: [out_h, out_w, C]
    for k in range(1, len(idx)):
        out += cols[idx[k]] * taps[k][:, None, None]
    out = np.clip(np.rint(out, out=out), 0, 255, out=out).astype(np.uint8)
    return out if img.ndim == 3 else out[..., 0]


def _spatial_axes(x: Any) -> tuple[int, int]:
    """Spatial axes of a channels-last image: [H, W] or [..., H, W, C]."""
    if x.ndim < 2:
        raise ValueError(f"expected an image [H, W] or [..., H, W, C], got shape {tuple(x.shape)}")
    return (0, 1) if x.ndim == 2 else (x.ndim - 3, x.ndim - 2)


def downsample_4x(x: Any, factor: int = 4) -> Any:
    """Mean of each factor x factor block, rounded half-to-even (TF area resize by an integer factor).

    [H, W] or channels-last [..., H, W, C] integer numpy arrays or torch tensors; the dtype is kept.
    """
    x = _as_array(x)
    _check_integer(x, "downsample_4x")
    ay, ax = _spatial_axes(x)
    h, w = x.shape[ay], x.shape[ax]
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"downsample_4x: image {h}x{w} is not divisible by factor {factor}")
    shape = (*x.shape[:ay], h // factor, factor, w // factor, factor, *x.shape[ax + 1:])
    if _is_torch(x):
        torch = _torch()
        total = x.reshape(shape).to(torch.int64).sum(dim=(ay + 1, ay + 3))
        return torch.round(total.to(torch.float64) / factor**2).to(x.dtype)
    total = x.reshape(shape).sum(axis=(ay + 1, ay + 3), dtype=np.int64)
    return np.rint(total / factor**2).astype(x.dtype)


def upsample_4x(x: Any, factor: int = 4) -> Any:
    """Nearest replication by an integer factor (TF area resize upward by an integer factor), [H, W] or
    channels-last [..., H, W, C], numpy or torch."""
    x = _as_array(x)
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"upsample_4x: factor must be a positive int, got {factor!r}")
    ay, ax = _spatial_axes(x)
    if _is_torch(x):
        return x.repeat_interleave(factor, dim=ay).repeat_interleave(factor, dim=ax)
    return np.repeat(np.repeat(x, factor, axis=ay), factor, axis=ax)


def _as_rgb(rgb: Any) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise ValueError(f"prepare_example expects uint8 pixels, got {rgb.dtype}")
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    if rgb.ndim != 3 or rgb.shape[2] not in (1, 3):
        raise ValueError(f"prepare_example expects an H x W x 3 (or H x W gray) image, got shape {rgb.shape}")
    return np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb


def prepare_example(rgb: np.ndarray, crop: str = "center", rng: np.random.Generator | None = None, *,
                    box: tuple[int, int, int] | None = None, resolution: int = 256,
                    factor: int = 4) -> dict[str, Any]:
    """The official per-image pipeline: square crop -> area resize to 256 -> 4x4 mean to 64, plus gray and 3-bit.

    `crop` is "center" (eval) or "random" (train, drawn from `rng`); `box=(top, left, size)` replays a known crop.
    Returns uint8 `rgb_256`, `rgb_64`, `gray_256` (= gray(rgb_256)), `gray_64` (= gray(rgb_64)), `rgb3bit_64` and
    `crop_box`. Gray images are replicated to 3 channels like TF `decode_image(channels=3)`.
    """
    rgb = _as_rgb(rgb)
    h, w = rgb.shape[:2]
    if box is None:
        box = square_crop_box(h, w, crop, rng)
    top, left, size = (int(v) for v in box)
    if top < 0 or left < 0 or size < 1 or top + size > h or left + size > w:
        raise ValueError(f"crop box {box} does not fit in a {h}x{w} image")
    rgb_256 = area_resize(rgb[top:top + size, left:left + size], resolution, resolution)
    rgb_64 = downsample_4x(rgb_256, factor)
    return {
        "rgb_256": rgb_256,
        "rgb_64": rgb_64,
        "gray_256": rgb_to_gray(rgb_256),
        "gray_64": rgb_to_gray(rgb_64),
        "rgb3bit_64": to_3bit(rgb_64),
        "crop_box": (top, left, size),
    }
