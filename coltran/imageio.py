"""Robust image decoding/encoding for preprocessing, batch jobs and the HTTP service: size limits checked from the
header before any pixel is decoded, EXIF orientation, 16-bit and alpha handling, and one error type with a reason."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white
SUPPORTED_OUTPUT_FORMATS = ("png", "jpeg")
# Formats we let Pillow parse. Others (EPS runs Ghostscript, PSD, exotic scientific formats) are refused.
INPUT_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "AVIF", "PPM", "TGA", "ICO",
                 "JPEG2000", "QOI")
REASONS = ("empty", "not_an_image", "corrupt", "truncated", "too_large", "too_small", "unsupported")

_IMAGE_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cjP  ", "JPEG2000"))
_FOREIGN_MAGIC = ((b"%PDF", "PDF document"), (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
                  (b"8BPS", "Photoshop PSD"), (b"<svg", "SVG"), (b"<?xml", "XML/SVG"))
_ONE_CHANNEL_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_BIT_DEPTH = {"1": 1, "I": 32, "F": 32, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16}
_ORIENTATION_TAG = ExifTags.Base.Orientation


class ImageDecodeError(ValueError):
    """Bytes that cannot be used as an image; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown ImageDecodeError reason {reason!r}; expected one of {REASONS}")
        super().__init__(message)
        self.reason = reason


@dataclass
class DecodedImage:
    rgb: np.ndarray  # (H, W, 3) uint8, EXIF orientation applied, alpha composited over ALPHA_BACKGROUND
    was_grayscale: bool  # the source had one channel, or R = G = B everywhere
    mode: str  # Pillow mode of the source as opened ("RGB", "L", "I;16", "P", "CMYK", ...)
    format: str | None  # Pillow format name ("JPEG", "PNG", ...)
    exif_rotated: bool  # an EXIF orientation other than 1 was applied
    size: tuple[int, int]  # (H, W) of `rgb`
    bit_depth: int = 8  # bits per sample of the source: 1, 8, 16 or 32 (modes I and F)
    had_alpha: bool = False  # the source had an alpha channel or a transparency key


def _sniff(data: bytes) -> tuple[str | None, str | None]:
    """(image format, foreign format) guessed from magic bytes, for error reasons only."""
    for magic, name in _IMAGE_MAGIC:
        if data.startswith(magic):
            return name, None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP", None
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "BMP", None
    if data[4:8] == b"ftyp":
        return None, f"ISO media container (brand {data[8:12].decode('latin-1')!r}, e.g. HEIC/AVIF)"
    head = data[:256].lstrip()
    for magic, name in _FOREIGN_MAGIC:
        if head.startswith(magic) or (name.endswith("SVG") and b"<svg" in data[:1024]):
            return None, name
    return None, None


def _allowed_formats() -> list[str]:
    Image.init()  # Pillow's own lazy plugin registration (what Image.open does anyway)
    return [f for f in INPUT_FORMATS if f in Image.OPEN]


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=_allowed_formats())
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_large", f"image is too large to decode safely: {exc}") from None
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        error = exc
    image_fmt, foreign = _sniff(data)
    if "truncated" in str(error).lower():
        raise ImageDecodeError("truncated", f"image data is truncated ({len(data)} bytes): {error}") from None
    if image_fmt:
        raise ImageDecodeError("corrupt", f"data starts like a {image_fmt} file but its header cannot be "
                               f"parsed ({len(data)} bytes)") from None
    if foreign:
        raise ImageDecodeError("unsupported", f"{foreign} data is not a supported image; expected one of "
                               f"{', '.join(_allowed_formats())}") from None
    raise ImageDecodeError("not_an_image", f"data ({len(data)} bytes, starting {data[:8]!r}) is not a "
                           f"recognised image; expected one of {', '.join(_allowed_formats())}") from None


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError("too_large", f"image is {width}x{height} (W x H) = {pixels:,} pixels, more than "
                               f"the limit of {max_pixels:,} pixels")
    if min(width, height) < min_side:
        raise ImageDecodeError("too_small", f"image is {width}x{height} (W x H), smaller than the minimum side "
                               f"of {min_side} px")


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        text = str(exc)
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageDecodeError("too_large", f"image is too large to decode safely: {text}") from None
        if "truncated" in text.lower():
            raise ImageDecodeError("truncated", f"{im.format} image data is truncated: {text}") from None
        if "not available" in text:
            raise ImageDecodeError("unsupported", f"cannot decode this {im.format} image here: {text}") from None
        raise ImageDecodeError("corrupt", f"{im.format} image data is corrupt: {type(exc).__name__}: {text}") from None


def _low_bytes_16(data: bytes, im: Image.Image) -> np.ndarray | None:
    """Low bytes of a 16-bit RGB/RGBA PNG, which Pillow opens as 8-bit keeping only the high byte.

    Decodes the same data a second time with the byte-swapped unpacker (rawmode ";16L" instead of ";16B");
    the PNG unfiltering is identical, so high * 256 + low is the exact 16-bit sample. None when not applicable.
    """
    if im.mode not in ("RGB", "RGBA") or "transparency" in im.info or len(im.tile) != 1:
        return None
    tile = im.tile[0]
    args = (tile.args,) if isinstance(tile.args, str) else tuple(tile.args or ())
    if tile.codec_name not in ("zip", "raw") or not args or args[0] != f"{im.mode};16B":
        return None
    low = Image.open(io.BytesIO(data), formats=[im.format])
    try:
        low.tile = [tile._replace(args=(f"{im.mode};16L", *args[1:]) if len(args) > 1 else f"{im.mode};16L")]
        _load(low)
        return np.asarray(low)
    finally:
        low.close()


def _planes(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(colour [H, W, 1 or 3], alpha [H, W] or None, full-scale value) of a loaded image."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.int64)[..., None], None, 65535
    if mode == "I":  # 32-bit integer samples are read on the 16-bit scale, clipped to 0..65535
        return np.clip(np.asarray(im).astype(np.int64), 0, 65535)[..., None], None, 65535
    if mode == "F":  # Pillow's float convention: 0..255, clipped; NaN -> 0
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return np.clip(arr, 0.0, 255.0)[..., None], None, 255
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    one_channel = mode in ("1", "L", "LA", "La")
    target = ("LA" if has_alpha else "L") if one_channel else ("RGBA" if has_alpha else "RGB")
    try:
        conv = im if mode == target else im.convert(target)
    except ValueError as exc:
        raise ImageDecodeError("unsupported", f"cannot convert Pillow mode {mode!r} to RGB: {exc}") from None
    arr = np.asarray(conv)
    arr = arr[..., None] if arr.ndim == 2 else arr
    if has_alpha:
        return arr[..., :-1], arr[..., -1], 255
    return arr, None, 255


def _to_uint8(color: np.ndarray, alpha: np.ndarray | None, full: int) -> np.ndarray:
    """Scale to 0..255 (x * 255 / full, rounded), composite alpha over ALPHA_BACKGROUND, expand gray to RGB."""
    if color.shape[-1] == 1:
        color = np.repeat(color, 3, axis=-1)
    if alpha is not None:
        a = alpha.astype(np.int64)[..., None]
        bg = np.asarray(ALPHA_BACKGROUND, dtype=np.int64) * (full // 255)
        num = color.astype(np.int64) * a + bg * (full - a)  # exact; no ties are possible at .5
        return np.rint(num * (255.0 / (full * full))).astype(np.uint8)
    if full == 65535:
        return ((color.astype(np.int64) + 128) // 257).astype(np.uint8)  # = round(v * 255 / 65535)
    if color.dtype != np.uint8:
        return np.rint(color).astype(np.uint8)
    return np.ascontiguousarray(color)


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF must not make a good image unusable
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to [H, W, ...] pixels, exactly as `ImageOps.exif_transpose` does."""
    ops = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
           8: lambda a: np.rot90(a, 1)}
    if orientation not in ops:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation!r}")
    return np.ascontiguousarray(ops[orientation](rgb))


def decode_image(data: bytes, *, max_pixels: int = 64_000_000, min_side: int = 8) -> DecodedImage:
    """Decode image bytes to RGB uint8, refusing bad input with ImageDecodeError(reason, message).

    The size limits are checked from the header before pixels are decoded (decompression bombs fail fast). Note that
    Pillow itself refuses images above 2 * Image.MAX_IMAGE_PIXELS at open time (also reported as too_large) and warns
    above Image.MAX_IMAGE_PIXELS; this function never changes Pillow's global settings.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageDecodeError("empty", "image data is empty (0 bytes)")
    im = _open(data)
    try:
        _check_size(im.width, im.height, max_pixels, min_side)
        mode, fmt = im.mode, im.format
        low = _low_bytes_16(data, im)
        _load(im)
        color, alpha, full = _planes(im)
        if low is not None and low.shape[:2] == color.shape[:2]:
            color = color.astype(np.int64) * 256 + low[..., :3]
            alpha = None if alpha is None else alpha.astype(np.int64) * 256 + low[..., 3]
            full = 65535
        rgb = _to_uint8(color, alpha, full)
        orientation = _orientation(im)
        rgb = apply_orientation(rgb, orientation)
        bit_depth = 16 if low is not None else _BIT_DEPTH.get(mode, 8)
        gray = mode in _ONE_CHANNEL_MODES or bool(
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
        return DecodedImage(rgb=rgb, was_grayscale=gray, mode=mode, format=fmt, exif_rotated=orientation != 1,
                            size=(rgb.shape[0], rgb.shape[1]), bit_depth=bit_depth, had_alpha=alpha is not None)
    finally:
        im.close()


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode uint8 (H, W, 3) RGB (or (H, W) gray) as PNG or JPEG bytes (JPEG with 4:4:4 chroma, `quality` 1..100)."""
    name = str(fmt).lower().lstrip(".")
    name = "jpeg" if name == "jpg" else name
    if name not in SUPPORTED_OUTPUT_FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}; expected one of {SUPPORTED_OUTPUT_FORMATS}")
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"encode_image expects uint8 (H, W, 3) or (H, W) pixels, got {arr.dtype} {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"encode_image got an empty image of shape {arr.shape}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an int in 1..100, got {quality!r}")
    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(arr))
    if name == "jpeg":
        image.save(buf, format="JPEG", quality=int(quality), subsampling=0)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()
