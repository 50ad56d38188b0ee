"""Turning a user's image (PIL, numpy gray/RGB, encoded bytes) into the pipeline's inputs.

Colour inputs are converted to gray first (the model never sees their colours). Gray is always the training
gray of an RGB image (TF weights, truncating), so a grayscale photo is treated as RGB (v, v, v) exactly as the
grayscale ImageNet photos were in training. Crop policy: 'full' (default) area-resizes the whole frame to
256x256, so the user gets back their whole picture at its own aspect; 'center' takes the paper's centre square.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from coltran.imageio import decode_image
from coltran.transforms import area_resize, downsample_4x, rgb_to_gray, square_crop_box

CROPS = ("full", "center")
RESOLUTIONS = ("full", "256")  # of the pipeline's outputs: the input's own size, or 256x256


@dataclass
class PreparedImage:
    gray_64: np.ndarray  # (64, 64) uint8
    gray_256: np.ndarray  # (256, 256) uint8
    luma_source: np.ndarray  # (H, W, 3) uint8: the region whose luma the full-resolution output keeps
    was_grayscale: bool

    @property
    def size(self) -> tuple[int, int]:
        return self.luma_source.shape[:2]


def to_rgb_array(image) -> tuple[np.ndarray, bool]:
    """(H, W, 3) uint8 and whether the source was grayscale, from bytes, a PIL image or a numpy array."""
    if isinstance(image, bytes | bytearray | memoryview):
        decoded = decode_image(bytes(image))
        return decoded.rgb, decoded.was_grayscale
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")  # one robust path for every mode (16-bit, alpha, palette, CMYK...)
        decoded = decode_image(buf.getvalue())
        return decoded.rgb, decoded.was_grayscale
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1), True
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return arr, bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
    raise ValueError(f"numpy images must be (H, W) gray or (H, W, 3) RGB, got shape {arr.shape}")


def prepare_image(image, crop: str = "full") -> PreparedImage:
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    rgb, was_gray = to_rgb_array(image)
    if crop == "center":
        top, left, size = square_crop_box(*rgb.shape[:2], mode="center")
        rgb = rgb[top : top + size, left : left + size]
    rgb_256 = area_resize(rgb, 256, 256)
    return PreparedImage(gray_64=rgb_to_gray(downsample_4x(rgb_256)), gray_256=rgb_to_gray(rgb_256),
                         luma_source=np.ascontiguousarray(rgb), was_grayscale=was_gray)
