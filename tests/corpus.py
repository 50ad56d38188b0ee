"""Fixture builders (not tests): a corpus of good, odd and hostile image files with the expected outcome of
`coltran.imageio.decode_image` for each, and hostile tar/zip archives with the expected verdict per member."""

from __future__ import annotations

import io
import struct
import tarfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class CorpusItem:
    name: str
    path: Path
    expect: str  # "ok" | "fail"
    reason: str | None  # ImageDecodeError.reason expected when expect == "fail"
    note: str
    size: tuple[int, int] | None = None  # expected decoded (H, W)
    was_grayscale: bool | None = None
    mode: str | None = None  # expected DecodedImage.mode (the source's Pillow mode)
    rgb: np.ndarray | None = None  # expected decoded pixels
    tolerance: int = 0  # max |decoded - rgb| allowed (lossy formats)
    exif_rotated: bool = False
    bit_depth: int | None = None


@dataclass
class ArchiveMember:
    name: str  # the member name as stored (tar: surrogate-escaped str for non-UTF-8 bytes)
    expect: str  # "ok" (usable image), "reject" (must not be used) or "skip" (directories)
    reason: str | None  # "unsafe_path", "link", "duplicate", "bad_name", "special", "not_an_image", "directory"
    note: str


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _filter_rows(raw: np.ndarray, bpp: int) -> bytes:
    """PNG-filter [H, row_bytes] uint8 rows, cycling filter types 0..4 so decoders must unfilter correctly."""
    out = []
    for y, row in enumerate(raw.astype(np.int64)):
        up = raw[y - 1].astype(np.int64) if y else np.zeros_like(row)
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        kind = y % 5
        if kind == 4:  # Paeth predictor on the unfiltered neighbours
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        else:
            pred = (0 * row, left, up, (left + up) // 2)[kind]
        out.append(bytes([kind]) + ((row - pred) % 256).astype(np.uint8).tobytes())
    return b"".join(out)


def write_png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG from uint16 [H, W] (gray), [H, W, 2] (gray+alpha), [H, W, 3] (RGB) or [H, W, 4] (RGBA)."""
    arr = samples if samples.ndim == 3 else samples[..., None]
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = np.frombuffer(arr.astype(">u2").tobytes(), np.uint8).reshape(h, w * c * 2)
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(_filter_rows(raw, 2 * c)))
            + _chunk(b"IEND", b""))


def _zero_png(width: int, height: int) -> bytes:
    """An all-black 8-bit gray PNG of any size, compressed row by row without allocating the image."""
    comp, row, parts = zlib.compressobj(9), bytes(width + 1), []
    for _ in range(height):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def _patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width/height of a PNG (and its CRC): the header lies about the pixel count."""
    ihdr = bytearray(png[12:29])  # type + 13 payload bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    return png[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + png[33:]


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _flatten(color: np.ndarray, alpha: np.ndarray, full: int) -> np.ndarray:
    """Reference compositing over white: round(255 * (c * a + full * (full - a)) / full^2), via Python ints."""
    num = color.astype(np.int64) * alpha[..., None] + full * (full - alpha[..., None].astype(np.int64))
    den = full * full
    return ((2 * 255 * num + den) // (2 * den)).astype(np.uint8)  # round half up; .5 ties cannot occur


def _smooth_rgb(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // (h + w)], -1).astype(np.uint8)


def _good_items(rng: np.random.Generator) -> list[tuple]:
    """(name, bytes, expect, reason, note, extra fields) for the decodable files."""
    items = []
    rgb = _smooth_rgb(48, 64)
    items.append(("rgb.jpg", _save(Image.fromarray(rgb), "JPEG", quality=95, subsampling=0), "normal RGB JPEG",
                  dict(size=(48, 64), was_grayscale=False, mode="RGB", rgb=rgb, tolerance=6)))
    gray = rgb[..., 0]
    items.append(("gray.jpg", _save(Image.fromarray(gray, "L"), "JPEG", quality=95), "true 1-channel JPEG",
                  dict(size=(48, 64), was_grayscale=True, mode="L", rgb=np.repeat(gray[..., None], 3, 2), tolerance=4)))
    cmyk = np.zeros((32, 32, 4), np.uint8)
    cmyk[:, :16] = (0, 255, 255, 0)
    cmyk[:, 16:] = (255, 0, 0, 64)
    nk = 255 - cmyk[..., 3:].astype(np.int64)  # Pillow's naive CMYK -> RGB: (255 - c)(255 - k) / 255
    expected = np.rint((255 - cmyk[..., :3].astype(np.int64)) * nk / 255).astype(np.uint8)
    items.append(("cmyk.jpg", _save(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95), "CMYK JPEG (flat red | teal)",
                  dict(size=(32, 32), was_grayscale=False, mode="CMYK", rgb=expected, tolerance=4)))
    src = np.zeros((32, 64, 3), np.uint8)
    src[:, :32] = (255, 0, 0)
    src[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    items.append(("exif_rot6.jpg", _save(Image.fromarray(src), "JPEG", quality=95, subsampling=0, exif=exif.tobytes()),
                  "stored 32x64 (H x W) left red / right blue, EXIF orientation 6 = display rotated 90 deg clockwise: "
                  "64x32 with red on top", dict(size=(64, 32), was_grayscale=False, mode="RGB", rgb=np.rot90(src, -1),
                                                tolerance=4, exif_rotated=True)))
    v = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
    items.append(("gray16.png", write_png16(v), "16-bit gray PNG, all filter types; expect round(v * 255 / 65535)",
                  dict(size=(20, 24), was_grayscale=True, mode="I;16", bit_depth=16,
                       rgb=np.repeat(((v.astype(np.int64) + 128) // 257).astype(np.uint8)[..., None], 3, 2))))
    v = rng.integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    items.append(("rgb16.png", write_png16(v), "16-bit RGB PNG; Pillow alone keeps only the high byte",
                  dict(size=(20, 24), was_grayscale=False, mode="RGB", bit_depth=16,
                       rgb=((v.astype(np.int64) + 128) // 257).astype(np.uint8))))
    v = rng.integers(0, 65536, (20, 24, 4), dtype=np.uint16)
    v[0, :4, 3], v[1, :4, 3] = 0, 65535
    items.append(("rgba16.png", write_png16(v), "16-bit RGBA PNG, composited over white at 16-bit precision",
                  dict(size=(20, 24), was_grayscale=False, mode="RGBA", bit_depth=16, rgb=_flatten(v[..., :3], v[..., 3], 65535))))
    pal = Image.fromarray(rng.integers(0, 4, (16, 16), dtype=np.uint8), "P")
    pal.putpalette([0, 0, 0, 0, 0, 255, 255, 0, 0, 10, 200, 30])
    lut = np.array([[0, 0, 0], [0, 0, 255], [255, 0, 0], [10, 200, 30]])
    alphas = np.array([0, 128, 255, 255])
    idx = np.asarray(pal)
    items.append(("palette_trns.png", _save(pal, "PNG", transparency=bytes(alphas.astype(np.uint8))),
                  "palette PNG with tRNS: entry 0 transparent (-> white), entry 1 half transparent",
                  dict(size=(16, 16), was_grayscale=False, mode="P", rgb=_flatten(lut[idx], alphas[idx], 255))))
    rgba = rng.integers(0, 256, (16, 20, 4), dtype=np.uint8)
    rgba[0, :5, 3], rgba[1, :5, 3] = 0, 255
    items.append(("rgba.png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), "RGBA PNG over white",
                  dict(size=(16, 20), was_grayscale=False, mode="RGBA", rgb=_flatten(rgba[..., :3], rgba[..., 3], 255))))
    la = rng.integers(0, 256, (16, 20, 2), dtype=np.uint8)
    items.append(("la.png", _save(Image.fromarray(la, "LA"), "PNG"), "gray + alpha PNG over white",
                  dict(size=(16, 20), was_grayscale=True, mode="LA",
                       rgb=np.repeat(_flatten(la[..., :1], la[..., 1], 255), 3, 2))))
    bits = rng.integers(0, 2, (12, 16)).astype(bool)
    items.append(("bilevel.png", _save(Image.fromarray(bits), "PNG"), "1-bit PNG: 0 -> 0, 1 -> 255",
                  dict(size=(12, 16), was_grayscale=True, mode="1", bit_depth=1,
                       rgb=np.repeat((bits * 255).astype(np.uint8)[..., None], 3, 2))))
    ints = rng.integers(0, 65536, (12, 16)).astype(np.int32)
    items.append(("int32.tif", _save(Image.fromarray(ints, "I"), "TIFF"), "mode I TIFF read on the 16-bit scale",
                  dict(size=(12, 16), was_grayscale=True, mode="I", bit_depth=32,
                       rgb=np.repeat(((ints.astype(np.int64) + 128) // 257).astype(np.uint8)[..., None], 3, 2))))
    floats = (rng.random((12, 16)) * 300 - 20).astype(np.float32)
    items.append(("float.tif", _save(Image.fromarray(floats, "F"), "TIFF"), "mode F TIFF: 0..255 scale, clipped",
                  dict(size=(12, 16), was_grayscale=True, mode="F", bit_depth=32,
                       rgb=np.repeat(np.rint(np.clip(floats, 0, 255)).astype(np.uint8)[..., None], 3, 2))))
    return items


def _bad_items(rng: np.random.Generator) -> list[tuple]:
    jpeg = _save(Image.fromarray(_smooth_rgb(64, 96)), "JPEG", quality=90)
    png = _save(Image.fromarray(_smooth_rgb(64, 96)), "PNG")
    sos = jpeg.find(b"\xff\xda")
    garbage = rng.integers(0, 256, len(jpeg), dtype=np.uint8).tobytes()
    random_bytes = b"\x00" + rng.integers(0, 256, 4095, dtype=np.uint8).tobytes()
    return [
        ("corrupt_scan.jpg", jpeg[:sos + 20] + garbage[: len(jpeg) - sos - 20], "corrupt",
         "valid JPEG headers, entropy-coded data replaced by random bytes"),
        ("corrupt_header.jpg", jpeg[:20] + garbage[:3000], "corrupt", "JPEG SOI/APP0, then garbage instead of headers"),
        ("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated", "first half of a JPEG"),
        ("truncated.png", png[: len(png) // 2], "truncated", "first half of a PNG"),
        ("empty.jpg", b"", "empty", "zero bytes"),
        ("text.txt", b"hello, this is not an image\n" * 4, "not_an_image", "plain text"),
        ("random.jpg", random_bytes, "not_an_image", "4 KiB of random bytes named .jpg"),
        ("document.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "unsupported", "a PDF, not an image"),
        ("tiny_1x1.png", _save(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), "too_small", "a 1x1 image"),
        ("bomb_header_30000.png", _patch_png_size(_save(Image.new("L", (8, 8)), "PNG"), 30000, 30000), "too_large",
         "8x8 PNG whose IHDR claims 30000x30000 (9e8 px, beyond Pillow's own bomb limit)"),
        ("bomb_zeros_8500.png", _zero_png(8500, 8500), "too_large",
         "a real, valid 8500x8500 all-black PNG (~70 KB, 72 Mpx > 64 Mpx): must be refused before decoding"),
    ]


def build_bad_image_corpus(directory: Path) -> list[CorpusItem]:
    """Write the corpus into `directory` and return one CorpusItem per file with its expected outcome."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240607)
    corpus = []
    for name, data, note, extra in _good_items(rng):
        (directory / name).write_bytes(data)
        corpus.append(CorpusItem(name, directory / name, "ok", None, note, **extra))
    for name, data, reason, note in _bad_items(rng):
        (directory / name).write_bytes(data)
        corpus.append(CorpusItem(name, directory / name, "fail", reason, note))
    return corpus


def _archive_plan(good: bytes) -> list[tuple[str, str, bytes | str | None, str, str | None, str]]:
    """(name, kind, payload, expect, reason, note); kind in file/dir/symlink/hardlink/fifo."""
    return [
        ("photos/", "dir", None, "skip", "directory", "a directory entry, nothing to decode"),
        ("photos/a.jpg", "file", good, "ok", None, "good image in a folder"),
        ("photos/sub/", "dir", None, "skip", "directory", "nested directory entry"),
        ("photos/sub/b.jpg", "file", good, "ok", None, "good image in a nested folder"),
        ("top.jpg", "file", good, "ok", None, "good image at the top level"),
        ("../evil.jpg", "file", good, "reject", "unsafe_path", "parent traversal (a valid image: reject by path)"),
        ("/abs/evil.jpg", "file", good, "reject", "unsafe_path", "absolute path"),
        ("photos/../../evil2.jpg", "file", good, "reject", "unsafe_path", "traversal hidden inside the path"),
        ("link_passwd.jpg", "symlink", "/etc/passwd", "reject", "link", "symlink to a file outside the archive"),
        ("link_inside.jpg", "symlink", "photos/a.jpg", "reject", "link", "symlink even to a member: never followed"),
        ("hard.jpg", "hardlink", "photos/a.jpg", "reject", "link", "hard link to a member (tar only)"),
        ("dup.jpg", "file", good, "ok", None, "first occurrence of a duplicated name: the one to use"),
        ("dup.jpg", "file", b"second copy, not an image", "reject", "duplicate", "later occurrence of a name"),
        ("bad\udcff.jpg", "file", good, "reject", "bad_name", "name is not valid UTF-8 (byte 0xff; tar only)"),
        ("fifo.jpg", "fifo", None, "reject", "special", "a FIFO/device-like member (tar only)"),
        ("notes.txt", "file", b"just some notes\n", "reject", "not_an_image", "a text file"),
    ]


def build_hostile_tar(path: Path, good_image_bytes: bytes) -> list[ArchiveMember]:
    """Write a tar with traversal, absolute, link, duplicate, non-UTF-8, FIFO and directory members plus good
    images; return every member in archive order with the expected verdict (first duplicate wins)."""
    members = []
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, kind, payload, expect, reason, note in _archive_plan(good_image_bytes):
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 1_700_000_000, 0o644
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = payload
            data = payload if kind == "file" else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
            members.append(ArchiveMember(name, expect, reason, note))
    with tarfile.open(path, "r", encoding="utf-8", errors="surrogateescape") as tar:  # names as readers see them
        stored = [info.name for info in tar.getmembers()]  # (tarfile drops a directory's trailing slash)
    return [ArchiveMember(n, m.expect, m.reason, m.note) for n, m in zip(stored, members, strict=True)]


def build_hostile_zip(path: Path, good_image_bytes: bytes) -> list[ArchiveMember]:
    """Zip version of build_hostile_tar: zip has no hard links, FIFOs or undecodable names, so those are left out;
    the symlinks are Unix-mode symlink entries whose content is the target."""
    members = []
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the deliberate duplicate
        for name, kind, payload, expect, reason, note in _archive_plan(good_image_bytes):
            if kind in ("hardlink", "fifo") or reason == "bad_name":
                continue
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.create_system = 3  # Unix, so external_attr carries the file type
            file_type = {"file": 0o100644, "dir": 0o040755, "symlink": 0o120777}[kind]
            info.external_attr = file_type << 16 | (0x10 if kind == "dir" else 0)
            zf.writestr(info, (payload.encode() if isinstance(payload, str) else payload) or b"")
            members.append(ArchiveMember(name, expect, reason, note.replace(" (tar only)", "")))
    return members


def small_jpeg(path: Path, index: int) -> bytes:
    """A small JPEG (40-63 x 32-48 px, varying with `index`) made from the photo at `path`."""
    with Image.open(path) as image:
        small = image.convert("RGB").resize((40 + index % 24, 32 + index % 17))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=85)
    return out.getvalue()


def build_tar_of_tars(path: Path, photos: list[Path], inner: int, per_inner: int,
                      truncated: tuple[int, ...] = ()) -> tuple[dict[str, bytes], set[str]]:
    """An ImageNet-shaped ILSVRC2012_img_train.tar: `inner` class tars n<8 digits>.tar of `per_inner` small JPEGs
    made from `photos` in turn; the inner tars numbered in `truncated` also hold a truncated JPEG. Returns the good
    images (key wnid/name -> bytes) and the keys of the truncated ones."""
    images, bad = {}, set()
    with tarfile.open(path, "w") as outer:
        for i in range(inner):
            wnid = f"n{i:08d}"
            members = {f"{wnid}_{j}.JPEG": small_jpeg(photos[(i * per_inner + j) % len(photos)], i * per_inner + j)
                       for j in range(per_inner)}
            images |= {f"{wnid}/{name}": data for name, data in members.items()}
            if i in truncated:
                members[f"{wnid}_cut.JPEG"] = members[f"{wnid}_0.JPEG"][:200]
                bad.add(f"{wnid}/{wnid}_cut.JPEG")
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    return images, bad
