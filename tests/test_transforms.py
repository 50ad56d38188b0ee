"""Tests of coltran.transforms against the reference oracles (section 8) and the official TF preprocessing fixture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import require_shared_data

from coltran import transforms as T

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "official-coltran-tf" / "preprocess" / "preprocess.npz"


@pytest.fixture(scope="module")
def tf():
    require_shared_data(FIXTURE)
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _box(row) -> tuple[int, int, int]:
    top, left, h, w = (int(v) for v in row)
    assert h == w
    return top, left, h


# ----------------------------------------------------------------------------- quantisation, symbols, gray oracles
def test_quantisation_oracles():
    x = np.arange(256, dtype=np.uint8)
    q = T.to_3bit(x)
    assert q.dtype == np.uint8 and np.array_equal(q, x // 32)
    assert np.array_equal(T.from_3bit(q), x - x % 32)
    k = np.arange(8, dtype=np.uint8)
    assert np.array_equal(T.to_3bit(T.from_3bit(k)), k)
    assert np.array_equal(T.from_3bit(k), [0, 32, 64, 96, 128, 160, 192, 224])
    five = T.convert_bits(x, n_bits_in=8, n_bits_out=5)
    assert np.array_equal(np.bincount(five), np.full(32, 8))
    assert np.array_equal(T.convert_bits(np.arange(32), n_bits_in=5, n_bits_out=8), np.arange(0, 256, 8))
    assert T.convert_bits(x, n_bits_in=8, n_bits_out=8) is x
    with pytest.raises(TypeError, match="float"):
        T.to_3bit(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="n_bits_out"):
        T.convert_bits(x, n_bits_in=8, n_bits_out=0)


def test_symbols_roundtrip_all_512():
    triples = np.stack(np.meshgrid(np.arange(8), np.arange(8), np.arange(8), indexing="ij"), -1).reshape(512, 3)
    symbols = T.colors_to_symbols(triples.astype(np.uint8))
    assert symbols.dtype == np.int64 and np.array_equal(symbols, np.arange(512))
    assert np.array_equal(T.symbols_to_colors(symbols), triples)
    with pytest.raises(ValueError, match="shape"):
        T.colors_to_symbols(np.zeros((4, 2), np.uint8))


def test_gray_oracles():
    colours = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    gray = T.rgb_to_gray(colours)
    assert gray.dtype == np.uint8 and gray.tolist() == [0, 254, 76, 149, 29]
    v = np.arange(1, 256)
    assert np.array_equal(T.rgb_to_gray(np.repeat(v[:, None], 3, 1).astype(np.uint8)), v - 1)  # weights sum 0.9999
    assert T.rgb_to_gray(np.zeros((2, 5, 7, 3), np.uint8)).shape == (2, 5, 7)


def test_gray_all_2_24_colours_pin_tf_float32():
    """TF's float32 gray differs from the exact floor((2989R + 5870G + 1140B) / 10000) on exactly 20 of the 2^24
    colours, always by -1 (reference measurement); the float32 order of operations is what gets this right."""
    a = np.arange(256, dtype=np.uint8)
    cube = np.empty((256, 256, 256, 3), np.uint8)
    cube[..., 0], cube[..., 1], cube[..., 2] = a[:, None, None], a[None, :, None], a[None, None, :]
    gray = T.rgb_to_gray(cube)
    i = a.astype(np.int32)
    exact = (i[:, None, None] * 2989 + i[None, :, None] * 5870 + i[None, None, :] * 1140) // 10000
    diff = exact - gray
    assert np.count_nonzero(diff) == 20 and diff.max() == 1 and diff.min() == 0


# ----------------------------------------------------------------------------- torch inputs give the same values
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_torch_matches_numpy(dtype):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    t = torch.from_numpy(img).to(dtype)
    for fn in (T.rgb_to_gray, T.to_3bit, lambda x: T.colors_to_symbols(T.to_3bit(x)), T.downsample_4x,
               T.upsample_4x, lambda x: T.convert_bits(x, n_bits_in=8, n_bits_out=5)):
        out_t, out_n = fn(t), fn(img)
        assert isinstance(out_t, torch.Tensor)
        assert np.array_equal(out_t.numpy(), out_n)
    assert T.rgb_to_gray(t).dtype == dtype and T.to_3bit(t).dtype == dtype
    assert T.colors_to_symbols(T.to_3bit(t)).dtype == torch.int64
    sym = torch.arange(512, dtype=dtype if dtype != torch.uint8 else torch.int64)
    assert np.array_equal(T.symbols_to_colors(sym).numpy(), T.symbols_to_colors(sym.numpy()))
    assert np.array_equal(T.from_3bit(T.to_3bit(t)).numpy(), img - img % 32)


# ----------------------------------------------------------------------------- crops
def test_eval_crop_boxes_match_tf(tf):
    for hw, box in zip(tf["orig_hw"], tf["eval_crop_box"], strict=True):
        assert T.square_crop_box(int(hw[0]), int(hw[1]), "center") == _box(box)


def test_random_crop_is_uniform_over_valid_positions():
    rng = np.random.default_rng(1)
    boxes = [T.square_crop_box(10, 13, "random", rng) for _ in range(4000)]
    assert {b[0] for b in boxes} == {0} and {b[2] for b in boxes} == {10}
    counts = np.bincount([b[1] for b in boxes], minlength=4)
    assert len(counts) == 4 and counts.min() > 850  # 4 offsets, ~1000 each
    tall = {T.square_crop_box(9, 5, "random", rng)[:2] for _ in range(300)}
    assert tall == {(t, 0) for t in range(5)}
    assert T.square_crop_box(7, 7, "random") == (0, 0, 7)
    with pytest.raises(ValueError, match="crop mode"):
        T.square_crop_box(8, 9, "middle")


def test_recorded_train_boxes_are_valid_random_crops(tf):
    for hw, box in zip(tf["orig_hw"], tf["train_crop_box"], strict=True):
        top, left, size = _box(box)
        assert size == min(hw) and 0 <= top <= hw[0] - size and 0 <= left <= hw[1] - size


# ----------------------------------------------------------------------------- resizes
def _naive_area(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Direct per-output-pixel definition: mean over the fractional footprint [o*r, (o+1)*r) in both axes."""
    h, w = img.shape[:2]
    out = np.zeros((out_h, out_w) + img.shape[2:])
    for oy in range(out_h):
        y0, y1 = oy * h / out_h, (oy + 1) * h / out_h
        for ox in range(out_w):
            x0, x1 = ox * w / out_w, (ox + 1) * w / out_w
            for iy in range(int(np.floor(y0)), min(int(np.ceil(y1)), h)):
                wy = min(y1, iy + 1) - max(y0, iy)
                for ix in range(int(np.floor(x0)), min(int(np.ceil(x1)), w)):
                    out[oy, ox] += img[iy, ix] * wy * (min(x1, ix + 1) - max(x0, ix))
    return out / ((h / out_h) * (w / out_w))


@pytest.mark.parametrize("shape,out", [((7, 5, 3), (3, 4)), ((40, 23, 3), (7, 5)), ((4, 6), (9, 13)), ((12, 12, 2), (4, 4)), ((5, 9, 3), (5, 9))])
def test_area_resize_matches_definition(shape, out):
    img = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    got = T.area_resize(img, *out)
    assert got.shape == out + shape[2:] and got.dtype == np.uint8
    ref = _naive_area(img.astype(np.float64), *out)
    tie = np.abs(ref - np.floor(ref) - 0.5) < 1e-9  # exact .5 in real arithmetic: float error may go either way
    assert np.array_equal(got[~tie], np.rint(ref[~tie]))
    assert np.all((got[tie] == np.floor(ref[tie])) | (got[tie] == np.ceil(ref[tie])))
    assert np.allclose(T.area_weights(shape[0], out[0]).sum(axis=1), 1.0)


def test_area_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        T.area_resize(np.zeros((4, 4), np.float32), 2, 2)
    with pytest.raises(ValueError, match="positive"):
        T.area_resize(np.zeros((4, 4), np.uint8), 0, 2)


def test_downsample_is_block_mean_half_to_even_and_upsample_is_replication():
    sums = [8, 24, 40, 56, 7, 9, 100, 16 * 255, 16 * 255 - 8, 0]  # means 0.5, 1.5, 2.5, 3.5 are ties
    img = np.zeros((4, 4 * len(sums)), np.uint8)
    for j, total in enumerate(sums):
        block = np.full(16, total // 16)
        block[: total % 16] += 1
        img[:, 4 * j:4 * j + 4] = np.random.default_rng(j).permutation(block).reshape(4, 4)
    expected = [round(total / 16) for total in sums]  # Python rounds half to even
    assert T.downsample_4x(img)[0].tolist() == expected
    assert expected[:4] == [0, 2, 2, 4]
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    assert np.array_equal(T.upsample_4x(small), np.kron(small, np.ones((4, 4, 1), np.uint8)))
    assert np.array_equal(T.downsample_4x(T.upsample_4x(small)), small)
    with pytest.raises(ValueError, match="divisible"):
        T.downsample_4x(np.zeros((6, 8), np.uint8))


# ----------------------------------------------------------------------------- the official pipeline
def test_exact_model_side_transforms(tf):
    assert np.array_equal(T.downsample_4x(tf["rgb_256"]), tf["rgb_64"])  # batched [B, H, W, C]
    assert np.array_equal(T.upsample_4x(tf["rgb_64"]), tf["rgb_64_up_back_256"])
    assert np.array_equal(T.rgb_to_gray(tf["rgb_256"]), tf["gray_256"][..., 0])
    assert np.array_equal(T.rgb_to_gray(tf["rgb_64"]), tf["gray_64"][..., 0])
    assert np.array_equal(T.to_3bit(tf["rgb_64"]), tf["rgb3bit_64"])
    assert np.array_equal(T.colors_to_symbols(tf["rgb3bit_64"]), tf["symbols_64"])
    assert np.array_equal(T.symbols_to_colors(tf["symbols_64"]), tf["rgb3bit_64"])
    c = tf["train_channel_index"]
    slices = np.take_along_axis(tf["train_rgb_64"], c[:, None, None, None], axis=3)
    assert np.array_equal(slices, tf["train_slice_64"])
    assert np.array_equal(T.to_3bit(slices), tf["train_slice3bit_64"])
    assert np.array_equal(T.upsample_4x(slices), tf["train_slice_64_up_back_256"])


def test_prepare_example_eval_path_matches_tf(tf):
    mismatches = {}
    for i, name in enumerate(tf["names"]):
        ex = T.prepare_example(tf[f"decoded_{i:02d}"])
        assert ex["crop_box"] == _box(tf["eval_crop_box"][i])
        assert {k: v.shape for k, v in ex.items() if k != "crop_box"} == {
            "rgb_256": (256, 256, 3), "rgb_64": (64, 64, 3), "gray_256": (256, 256), "gray_64": (64, 64),
            "rgb3bit_64": (64, 64, 3)}
        assert all(v.dtype == np.uint8 for k, v in ex.items() if k != "crop_box")
        d = ex["rgb_256"].astype(np.int16) - tf["rgb_256"][i]
        size = ex["crop_box"][2]
        if size <= 256 or size % 256 == 0:  # upsampling and integer ratios: exact
            assert not d.any(), f"{name}: {np.count_nonzero(d)} values differ"
        else:
            assert np.abs(d).max() <= 1 and np.mean(d != 0) < 1e-4, name
        if d.any():
            mismatches[str(name)] = int(np.count_nonzero(d))
            continue
        for key in ("rgb_64", "gray_256", "gray_64", "rgb3bit_64"):
            expected = tf[key][i][..., 0] if key.startswith("gray") else tf[key][i]
            assert np.array_equal(ex[key], expected), f"{name}: {key}"
    assert sum(mismatches.values()) <= 10, mismatches  # reference: 5 values in 3 images


def test_prepare_example_train_path_matches_tf(tf):
    for i, name in enumerate(tf["names"]):
        ex = T.prepare_example(tf[f"decoded_{i:02d}"], box=_box(tf["train_crop_box"][i]))
        assert np.array_equal(ex["rgb_64"], tf["train_rgb_64"][i]), name
        channel = ex["rgb_64"][..., int(tf["train_channel_index"][i])]
        assert np.array_equal(channel, tf["train_slice_64"][i][..., 0]), name


def test_prepare_example_random_crop_and_gray_input():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    a = T.prepare_example(img, "random", np.random.default_rng(5))
    b = T.prepare_example(img, "random", np.random.default_rng(5))
    top, left, size = a["crop_box"]
    assert a["crop_box"] == b["crop_box"] and top == 0 and size == 300 and 0 <= left <= 120
    assert np.array_equal(a["rgb_256"], T.area_resize(img[:, left:left + 300], 256, 256))
    gray = img[..., 0]
    assert np.array_equal(T.prepare_example(gray)["rgb_64"], T.prepare_example(np.dstack([gray] * 3))["rgb_64"])
    with pytest.raises(ValueError, match="does not fit"):
        T.prepare_example(img, box=(10, 0, 300))
    with pytest.raises(ValueError, match="uint8"):
        T.prepare_example(img.astype(np.float32))


def test_preprocessing_never_imports_torch():
    """The preprocessing job's task code (decode, transforms, Parquet rows) runs without importing torch, which
    would add ~225 MB to every Ray worker; the tensor branches still work once torch is there (tests above)."""
    code = ("import io, sys\n"
            "import numpy as np\n"
            "from PIL import Image\n"
            "import pipelines.preprocess\n"
            "from pipelines.dataset.examples import image_examples, rows_to_table\n"
            "buf = io.BytesIO()\n"
            "Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)).save(buf, 'PNG')\n"
            "rows = image_examples('k', buf.getvalue(), split='train', train_crops=2, seed=0, max_pixels=10**8,\n"
            "                      min_side=8)\n"
            "rows_to_table([{'key': 'k', 'label': None, 'split': 'train', 'source': 's', **r} for r in rows])\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
