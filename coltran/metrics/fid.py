"""Frechet Inception Distance (Heusel et al. 2017) from feature statistics, and a cache of the statistics of
reference sets, keyed by the images' keys and content and the feature settings (coltran.metrics.inception)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coltran.metrics.inception import SETTINGS

CACHE_ENV = "COLTRAN_FID_CACHE"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of `count` feature vectors, float64; for count <= D also a factor
    (count, D) with cov = factor.T @ factor (the centred features / sqrt(count - 1)), which makes the distance
    cheap: (count x count) eigenproblems instead of (D x D) ones."""

    mean: np.ndarray
    cov: np.ndarray
    count: int
    factor: np.ndarray | None = None

    def save(self, path: str | Path) -> None:
        """Write an .npz atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                extra = {} if self.factor is None else {"factor": self.factor}
                np.savez(f, mean=self.mean, cov=self.cov, count=np.int64(self.count), **extra)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path) as data:
            factor = data["factor"] if "factor" in data.files else None
            return cls(data["mean"], data["cov"], int(data["count"]), factor)


def feature_statistics(features: np.ndarray) -> FeatureStats:
    """(N, D) features -> mean and unbiased covariance (N >= 2)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature_statistics needs (N, D) features with N >= 2, got shape {features.shape}")
    mean = features.mean(axis=0)
    factor = (features - mean) / np.sqrt(len(features) - 1)  # (N, D)
    return FeatureStats(mean, factor.T @ factor, len(features), factor if len(features) <= features.shape[1] else None)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues from rounding -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _sum_sqrt_eigenvalues(inner: np.ndarray) -> float:
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def trace_sqrt_product(a: FeatureStats, b: FeatureStats) -> float:
    """tr((S_a S_b)^(1/2)) = the sum of the square roots of the eigenvalues of a symmetric PSD matrix with the
    same non-zero spectrum as S_a S_b: S_a^(1/2) S_b S_a^(1/2) (D x D), or F S_b F^T (k x k) when S_a = F^T F
    (with both factors, the singular values of F G^T). Symmetric eigenproblems stay real and exact also for
    rank-deficient covariances (N < D), where the usual scipy.linalg.sqrtm of the non-symmetric product takes
    minutes at D = 2048 and returns rounding-level imaginary parts; the two agree (tests/test_fid.py)."""
    if a.factor is not None and b.factor is not None:
        return float(np.linalg.svd(a.factor @ b.factor.T, compute_uv=False).sum())
    if a.factor is not None or b.factor is not None:
        low, full = (a, b) if a.factor is not None else (b, a)
        return _sum_sqrt_eigenvalues(low.factor @ full.cov @ low.factor.T)
    root = _psd_sqrt(a.cov)
    return _sum_sqrt_eigenvalues(root @ b.cov @ root)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)); never negative."""
    if a.mean.shape != b.mean.shape or a.cov.shape != b.cov.shape:
        raise ValueError(f"statistics of different feature sizes: {a.mean.shape} vs {b.mean.shape}")
    diff = a.mean - b.mean
    value = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_sqrt_product(a, b)
    return max(float(value), 0.0)


def stats_key(items: Iterable[tuple[str, str]], settings: dict | None = None) -> str:
    """Cache key of a set of images: sha256 over its sorted (key, content digest) pairs and the feature settings
    (network checksum, scaling, resize) plus any extra `settings` (e.g. the preprocessing)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, **SETTINGS, **(settings or {})}, sort_keys=True).encode())
    for key, digest in sorted(items):
        h.update(f"\x00{key}\x00{digest}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "coltran" / "fid")


class StatsCache:
    """Feature statistics stored as DIR/<key>.npz; writes are atomic, so concurrent jobs can share a DIR."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be a hex digest (stats_key), got {key!r}")
        return self.root / f"{key}.npz"

    def get(self, key: str) -> FeatureStats | None:
        path = self.path(key)
        try:
            return FeatureStats.load(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as err:  # a damaged entry is recomputed, not trusted
            warnings.warn(f"ignoring unreadable FID statistics {path}: {err}", stacklevel=2)
            return None

    def put(self, key: str, stats: FeatureStats) -> Path:
        path = self.path(key)
        stats.save(path)
        return path

    def get_or_compute(self, key: str, compute: Callable[[], FeatureStats]) -> tuple[FeatureStats, bool]:
        """(statistics, whether they came from the cache)."""
        found = self.get(key)
        if found is not None:
            return found, True
        stats = compute()
        self.put(key, stats)
        return stats, False
