"""Full-resolution output: the predicted colour's chroma on the input's own luminance.

ColTran predicts 256x256 colour. A photo keeps its own detail if only the chroma comes from the model: we work
in YCbCr (ITU-R BT.601 full range, as JPEG), because it is linear and exactly invertible, so the output's luma
equals the input's within rounding; Lab would need a non-linear round trip whose gamut clipping moves the
lightness. Predicted Cb/Cr planes are resized (bicubic) to the input size and recombined with the input's Y.
Where Y + chroma leaves the RGB cube, the chroma is scaled towards grey just enough to fit, which keeps Y.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
# RGB = Y + CHROMA_TO_RGB @ (Cb - 128, Cr - 128)
CHROMA_TO_RGB = np.array([[0.0, 1.402], [-0.344136, -0.714136], [1.772, 0.0]])
RGB_TO_CHROMA = np.array([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def luma(image: np.ndarray) -> np.ndarray:
    """BT.601 luma (float64, 0..255) of an (H, W, 3) RGB image, or the values of an (H, W) gray image."""
    image = np.asarray(image, dtype=np.float64)
    return image if image.ndim == 2 else image @ LUMA_WEIGHTS


def chroma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 2) Cb - 128, Cr - 128 of an RGB image."""
    return np.asarray(rgb, dtype=np.float64) @ RGB_TO_CHROMA.T


def resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    if plane.shape == (height, width):
        return plane.astype(np.float64)
    img = Image.fromarray(plane.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)


def transfer_chroma(luma_source: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): `luma_source`'s luma (H, W[, 3]) with the chroma of `colour` (h, w, 3) resized to (H, W)."""
    y = luma(luma_source)
    height, width = y.shape
    cbcr = chroma(colour)
    cbcr = np.stack([resize_plane(cbcr[..., k], height, width) for k in range(2)], axis=-1)
    offset = cbcr @ CHROMA_TO_RGB.T  # (H, W, 3) colour offset around grey; its luma is 0
    # Largest t in [0, 1] with y + t * offset inside [0, 255] for every channel.
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(offset > 0, (255.0 - y[..., None]) / offset, np.inf)
        down = np.where(offset < 0, -y[..., None] / offset, np.inf)
    t = np.clip(np.minimum(up, down).min(axis=-1), 0.0, 1.0)
    rgb = y[..., None] + t[..., None] * offset
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
