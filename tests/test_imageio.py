"""Tests of coltran.imageio: the bad/odd image corpus, EXIF orientation, 16-bit and alpha handling, bombs, encoding,
and the hostile archive fixtures of tests/corpus.py."""

from __future__ import annotations

import io
import stat
import tarfile
import time
import zipfile

import numpy as np
import pytest
from corpus import build_bad_image_corpus, build_hostile_tar, build_hostile_zip, write_png16
from PIL import Image, ImageFile, ImageOps

from coltran.imageio import (
    ALPHA_BACKGROUND,
    REASONS,
    SUPPORTED_OUTPUT_FORMATS,
    DecodedImage,
    ImageDecodeError,
    apply_orientation,
    decode_image,
    encode_image,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    items = build_bad_image_corpus(tmp_path_factory.mktemp("corpus"))
    return {item.name: item for item in items}


def _check(item) -> list[str]:
    data = item.path.read_bytes()
    try:
        out = decode_image(data)
    except ImageDecodeError as exc:
        if item.expect == "ok":
            return [f"{item.name}: expected ok, got {exc.reason}: {exc}"]
        return [] if exc.reason == item.reason else [f"{item.name}: reason {exc.reason}, expected {item.reason}"]
    if item.expect != "ok":
        return [f"{item.name}: expected failure {item.reason}, decoded {out.size} {out.mode}"]
    problems = []
    assert isinstance(out, DecodedImage)
    if out.rgb.dtype != np.uint8 or out.rgb.ndim != 3 or out.rgb.shape[2] != 3 or out.size != out.rgb.shape[:2]:
        problems.append(f"{item.name}: bad output array {out.rgb.dtype} {out.rgb.shape} size={out.size}")
    for field in ("size", "was_grayscale", "mode", "exif_rotated", "bit_depth"):
        want = getattr(item, field)
        if want is not None and getattr(out, field) != want:
            problems.append(f"{item.name}: {field} = {getattr(out, field)!r}, expected {want!r}")
    if item.rgb is not None and out.rgb.shape == item.rgb.shape:
        worst = int(np.abs(out.rgb.astype(np.int32) - item.rgb).max())
        if worst > item.tolerance:
            problems.append(f"{item.name}: pixels differ by up to {worst} (tolerance {item.tolerance})")
    return problems


def test_corpus_every_expectation(corpus):
    problems = [p for item in corpus.values() for p in _check(item)]
    assert not problems, "\n".join(problems)


def test_corpus_covers_every_reason_and_required_case(corpus):
    assert {item.reason for item in corpus.values() if item.expect == "fail"} == set(REASONS)
    modes = {item.mode for item in corpus.values() if item.expect == "ok"}
    assert {"RGB", "L", "CMYK", "I;16", "RGBA", "P", "LA", "1", "I", "F"} <= modes


def test_pillow_global_state_untouched(corpus):
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    for item in corpus.values():
        _check(item)
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == before == (False, before[1])


def test_bombs_fail_fast_before_decoding(corpus):
    for name in ("bomb_header_30000.png", "bomb_zeros_8500.png"):
        data = corpus[name].path.read_bytes()
        assert len(data) < 200_000
        start = time.perf_counter()
        with pytest.raises(ImageDecodeError) as err:
            decode_image(data)
        assert err.value.reason == "too_large" and time.perf_counter() - start < 0.5
    zeros = corpus["bomb_zeros_8500.png"].path.read_bytes()
    with pytest.raises(ImageDecodeError, match="8500x8500"):
        decode_image(zeros)
    with Image.open(io.BytesIO(zeros)) as im:  # a genuine, decodable 72 Mpx image: only the pre-check stops it
        assert im.size == (8500, 8500) and im.mode == "L"


def test_size_limits_and_messages():
    img = encode_image(np.zeros((16, 24, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match=r"24x16 .*minimum side of 20 px") as err:
        decode_image(img, min_side=20)
    assert err.value.reason == "too_small" and isinstance(err.value, ValueError)
    with pytest.raises(ImageDecodeError, match="384 pixels, more than the limit of 100") as err:
        decode_image(img, max_pixels=100)
    assert err.value.reason == "too_large"
    tiny = encode_image(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match=r"1x1 .*minimum side of 8 px"):
        decode_image(tiny)
    assert decode_image(bytearray(img)).size == decode_image(memoryview(img)).size == (16, 24)
    with pytest.raises(TypeError, match="bytes"):
        decode_image("not bytes")
    with pytest.raises(ValueError, match="unknown ImageDecodeError reason"):
        ImageDecodeError("weird", "x")


def test_sixteen_bit_rgb_uses_both_bytes(corpus):
    """Pillow alone truncates 16-bit RGB PNGs to the high byte; decode_image must round v * 255 / 65535."""
    data = corpus["rgb16.png"].path.read_bytes()
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int32)
    ours = decode_image(data).rgb.astype(np.int32)
    assert np.count_nonzero(ours != naive) > 50 and np.abs(ours - naive).max() == 1
    exact = np.array([[[0, 257, 65535], [128, 129, 385]]], np.uint16).repeat(8, 0).repeat(4, 1)
    assert decode_image(write_png16(exact)).rgb[0, 0].tolist() == [0, 1, 255]
    assert decode_image(write_png16(exact)).rgb[0, 4].tolist() == [0, 1, 1]  # 0.498 -> 0, 0.502 -> 1, 1.498 -> 1


def test_alpha_flattens_over_white(corpus):
    assert ALPHA_BACKGROUND == (255, 255, 255)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (200, 10, 10, 0)  # fully transparent -> white
    rgba[:, 4:] = (200, 10, 10, 255)  # opaque -> unchanged
    out = decode_image(encode_png_rgba(rgba)).rgb
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 7].tolist() == [200, 10, 10]
    assert decode_image(corpus["palette_trns.png"].path.read_bytes()).had_alpha
    assert not decode_image(corpus["rgb.jpg"].path.read_bytes()).had_alpha


def encode_png_rgba(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    src = np.random.default_rng(orientation).integers(0, 256, (10, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, format="PNG", exif=exif.tobytes())
    out = decode_image(buf.getvalue())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
    assert np.array_equal(out.rgb, expected) and out.exif_rotated == (orientation != 1)
    assert out.size == ((16, 10) if orientation >= 5 else (10, 16))
    assert np.array_equal(apply_orientation(src, orientation), expected)


def test_exif_rot6_puts_left_edge_on_top(corpus):
    out = decode_image(corpus["exif_rot6.jpg"].path.read_bytes())
    assert out.size == (64, 32)
    assert out.rgb[:28].mean(axis=(0, 1)).round().tolist()[0] > 240  # red (stored left half) on top
    assert out.rgb[36:].mean(axis=(0, 1))[2] > 240  # blue at the bottom


def test_encode_image_roundtrip_and_errors():
    img = np.random.default_rng(7).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    assert SUPPORTED_OUTPUT_FORMATS == ("png", "jpeg")
    assert np.array_equal(decode_image(encode_image(img)).rgb, img)
    smooth = np.repeat(np.linspace(0, 255, 20).astype(np.uint8)[None, :, None], 12, 0).repeat(3, 2)
    for fmt in ("jpeg", "JPG"):
        data = encode_image(smooth, fmt, quality=90)
        assert data[:3] == b"\xff\xd8\xff" and np.abs(decode_image(data).rgb.astype(int) - smooth).max() <= 6
    gray = decode_image(encode_image(img[..., 0]))
    assert gray.was_grayscale and np.array_equal(gray.rgb[..., 2], img[..., 0])
    with pytest.raises(ValueError, match="'bmp'.*png"):
        encode_image(img, "bmp")
    with pytest.raises(ValueError, match="uint8"):
        encode_image(img.astype(np.float32))
    with pytest.raises(ValueError, match="quality"):
        encode_image(img, "jpeg", quality=0)


def test_grayscale_detection_for_rgb_data():
    gray_rgb = np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8)[..., None], 3, 2)
    assert decode_image(encode_image(gray_rgb)).was_grayscale
    gray_rgb[3, 3, 1] += 1
    assert not decode_image(encode_image(gray_rgb)).was_grayscale


def test_hostile_tar_fixture(tmp_path, corpus):
    good = corpus["rgb.jpg"].path.read_bytes()
    members = build_hostile_tar(tmp_path / "hostile.tar", good)
    with tarfile.open(tmp_path / "hostile.tar", encoding="utf-8", errors="surrogateescape") as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == [m.name for m in members]
        for info, member in zip(infos, members, strict=True):
            if member.expect == "ok":
                assert info.isfile() and decode_image(tar.extractfile(info).read()).size == (48, 64)
            elif member.reason == "link":
                assert info.issym() or info.islnk()
            elif member.reason == "special":
                assert info.isfifo()
            elif member.reason == "directory":
                assert info.isdir() and member.expect == "skip"
    _check_common_members(members)
    bad = [m for m in members if m.reason == "bad_name"]
    assert len(bad) == 1 and bad[0].expect == "reject"
    with pytest.raises(UnicodeEncodeError):
        bad[0].name.encode("utf-8")
    assert sum(m.reason == "link" for m in members) == 3 and sum(m.reason == "special" for m in members) == 1


def test_hostile_zip_fixture(tmp_path, corpus):
    good = corpus["rgb.jpg"].path.read_bytes()
    members = build_hostile_zip(tmp_path / "hostile.zip", good)
    with zipfile.ZipFile(tmp_path / "hostile.zip") as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == [m.name for m in members]
        for info, member in zip(infos, members, strict=True):
            kind = info.external_attr >> 16
            if member.expect == "ok":
                assert decode_image(zf.read(info)).size == (48, 64)
            elif member.reason == "link":
                assert stat.S_ISLNK(kind)
            elif member.reason == "directory":
                assert info.is_dir()
    _check_common_members(members)


def _check_common_members(members):
    unsafe = [m.name for m in members if m.reason == "unsafe_path"]
    assert len(unsafe) == 3 and all(n.startswith("/") or ".." in n.split("/") for n in unsafe)
    dups = [m for m in members if m.name == "dup.jpg"]
    assert [(m.expect, m.reason) for m in dups] == [("ok", None), ("reject", "duplicate")]
    assert sum(m.expect == "ok" for m in members) == 4  # photos/a.jpg, photos/sub/b.jpg, top.jpg, first dup.jpg
    assert all(m.expect in ("ok", "reject", "skip") for m in members)
    assert all((m.reason is None) == (m.expect == "ok") for m in members)
