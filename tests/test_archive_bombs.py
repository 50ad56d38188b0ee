"""Archive bombs (issue 20): a 2 GiB zero member in a .tar.gz, a long-name header bomb, a flat zip bomb and a tar of
tars whose inner tar is a gzip bomb are refused from their headers and the expansion budget, as failure rows, while
the reading process's peak memory stays under 2 member caps + 64 MiB; the caps are settings of the job."""

from __future__ import annotations

import functools
import io
import json
import operator
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from layouts import SAMPLE
from shared_data import needs_shared_data

from pipelines.io.archives import MAX_MEMBER_BYTES, ArchiveLimits, iter_archive
from pipelines.io.sources import split_error

pytestmark = needs_shared_data(SAMPLE)
GIB, MIB = 1 << 30, 1 << 20
ZERO_BLOCK = 64 * MIB  # compressed once, repeated: 2 GiB of zeros is written as ~2 MB without ever being held
PEAK_BOUND = 2 * MAX_MEMBER_BYTES + 64 * MIB  # what docs/preprocessing.md promises per reading process


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)  # one gzip member; concatenated members are one gzip stream
    return c.compress(data) + c.flush()


def _tar_file(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def write_zero_member_tar_gz(path: Path, good: bytes, zeros: int = 2 * GIB, header_type: bytes = tarfile.REGTYPE,
                             name: str = "zeros.JPEG") -> None:
    """good_0.JPEG, then a member of `zeros` zero bytes (or a long-name header of that size), then good_1.JPEG,
    as a stream of gzip members: the zero block is compressed once and written zeros / ZERO_BLOCK times."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = zeros, header_type, 1_700_000_000
    block = _gzip(bytes(ZERO_BLOCK))
    with path.open("wb") as out:
        out.write(_gzip(_tar_file("good_0.JPEG", good) + info.tobuf(tarfile.GNU_FORMAT)))
        for _ in range(zeros // ZERO_BLOCK):
            out.write(block)
        out.write(_gzip(bytes(zeros % ZERO_BLOCK) + b"\0" * (-zeros % 512) + _tar_file("good_1.JPEG", good)
                        + b"\0" * 1024))


def write_zip_bomb(path: Path, members: int = 40, size: int = 100 * MIB) -> None:
    """A flat zip bomb: `members` deflated members of `size` zeros each (under the member cap), ~100 KB each."""
    zeros = bytes(size)
    crc = zlib.crc32(zeros)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = c.compress(zeros) + c.flush()
    del zeros
    central, offset = [], 0
    with path.open("wb") as out:
        for i in range(members):
            name = f"bomb_{i:03d}.png".encode()
            out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(data), size, len(name), 0)
                      + name + data)
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(data), size,
                                       len(name), 0, 0, 0, 0, 0, offset) + name)
            offset += 30 + len(name) + len(data)
        out.write(b"".join(central))
        cd = sum(len(c) for c in central)
        out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, members, members, cd, offset, 0))


def write_tar_of_tars_with_bomb(path: Path, good: bytes, bomb: Path) -> None:
    """n00000001.tar and n00000003.tar hold two JPEGs each; n00000002.tar is the gzip bomb under a .tar name."""
    with tarfile.open(path, "w") as outer:
        for wnid, data in (("n00000001", None), ("n00000002", bomb.read_bytes()), ("n00000003", None)):
            if data is None:
                data = b"".join(_tar_file(f"{wnid}_{i}.JPEG", good) for i in range(2)) + b"\0" * 1024
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(data)
            outer.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> tuple[Path, bytes]:
    root = tmp_path_factory.mktemp("bombs")
    good = next(SAMPLE.glob("*.JPEG")).read_bytes()
    src = root / "src"
    src.mkdir()
    write_zero_member_tar_gz(src / "zeros.tar.gz", good)
    write_zero_member_tar_gz(src / "longname.tar.gz", good, zeros=GIB, header_type=tarfile.GNUTYPE_LONGNAME)
    write_zip_bomb(src / "flat.zip")
    write_zero_member_tar_gz(root / "inner.tar.gz", good)
    write_tar_of_tars_with_bomb(src / "classes.tar", good, root / "inner.tar.gz")
    return src, good


# Every key the sources give, with its outcome: bytes ("ok") or the failure reason.
EXPECTED = {
    "zeros/good_0.JPEG": "ok", "zeros/zeros.JPEG": "member_too_large", "zeros.tar.gz": "expansion_budget",
    "longname/good_0.JPEG": "ok", "longname.tar.gz": "header_too_large",
    "flat/bomb_000.png": "ok", "flat/bomb_001.png": "ok", "flat/bomb_002.png": "expansion_budget",
    "flat.zip": "expansion_budget",
    "classes/n00000001/n00000001_0.JPEG": "ok", "classes/n00000001/n00000001_1.JPEG": "ok",
    "classes/n00000002/good_0.JPEG": "ok", "classes/n00000002/zeros.JPEG": "member_too_large",
    "classes/n00000002": "expansion_budget",
    "classes/n00000003/n00000003_0.JPEG": "ok", "classes/n00000003/n00000003_1.JPEG": "ok",
}

READER = """
import json, resource, sys
from pipelines.io.sources import plan_sources, split_error
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
plan = plan_sources([sys.argv[1]], infer_labels=False)
items = plan.work_items()
base = hwm()
out = {}
for item in items:  # what each Ray task of the job runs, one item after another in this one process
    for row in plan.for_tasks().item_rows(item):
        out[row["key"]] = split_error(row["error"])[0] if row["error"] else "ok"
print(json.dumps({"rows": out, "base": base, "peak": hwm(), "items": len(items)}))
"""


def test_bombs_refused_from_headers_and_budget_with_bounded_memory(bombs):
    """The reader of the job's tasks (work item by work item) on all four bombs in a fresh process: the expected
    row per key, and VmHWM after reading minus VmHWM before under PEAK_BOUND (2 member caps + 64 MiB)."""
    src, _ = bombs
    assert sum(p.stat().st_size for p in src.iterdir()) < 20 * MIB  # 7 GiB of declared content in ~10 MB
    result = subprocess.run([sys.executable, "-c", READER, str(src)], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    report = json.loads(result.stdout)
    assert report["rows"] == EXPECTED
    growth = report["peak"] - report["base"]
    print(f"reader peak RSS growth {growth / MIB:.0f} MiB (bound {PEAK_BOUND / MIB:.0f} MiB), "
          f"base {report['base'] / MIB:.0f} MiB")
    assert growth < PEAK_BOUND


def test_caps_are_settable(bombs):
    """A member cap below a JPEG's size refuses it from the header; a ratio of 1 leaves a gzip bomb no room."""
    src, good = bombs
    fs = pafs.LocalFileSystem()
    rows = list(iter_archive(fs, str(src / "classes.tar"), limits=ArchiveLimits(member_bytes=len(good) - 1)))
    reasons = {m.name: split_error(m.error)[0] for m in rows}
    assert reasons["n00000001/n00000001_0.JPEG"] == "member_too_large" and all(m.data is None for m in rows)
    small = ArchiveLimits(member_bytes=len(good), expansion_ratio=1)
    rows = list(iter_archive(fs, str(src / "zeros.tar.gz"), limits=small))
    assert [(m.name, split_error(m.error)[0] if m.error else "ok") for m in rows] == [
        ("good_0.JPEG", "ok"), ("zeros.JPEG", "member_too_large"), ("", "expansion_budget")]
    with pytest.raises(ValueError, match="expansion_ratio"):
        ArchiveLimits(expansion_ratio=0.5)


@pytest.mark.ray
def test_preprocess_records_each_refusal_as_a_failure_row(bombs, tmp_path, ray_local):
    """The job's failures table has each refusal; `read_sources`, the reader of the batch and evaluation jobs, gives
    the same error rows (their manifests record them), here without the zip (a key filter skips a zip member
    unread, so it spends no budget: the filtered zip would let 100 MiB members through to the object store)."""
    from pipelines.io.sources import read_sources
    from pipelines.preprocess.job import PreprocessSettings, run_preprocess

    src, _ = bombs
    small = frozenset(k for k in EXPECTED if not k.startswith("flat"))
    manifest = run_preprocess(PreprocessSettings(sources=[str(src)], dest=str(tmp_path / "out"),
                                                 heldout_fraction=0.0, min_rows_per_file=8))
    rows = read_sources([str(src)], infer_labels=False, key_filter=functools.partial(operator.contains, small))
    errors = {r["key"]: split_error(r["error"])[0] for r in rows.select_columns(["key", "error"]).take_all()
              if r["error"]}
    assert errors == {k: v for k, v in EXPECTED.items() if v != "ok" and k in small}
    failures = {r["key"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "failures.parquet").to_pylist()}
    want = {k: v for k, v in EXPECTED.items() if v != "ok"}
    want |= {"flat/bomb_000.png": "not_an_image", "flat/bomb_001.png": "not_an_image"}  # zeros are read, not images
    assert failures == want
    stored = pq.read_table(tmp_path / "out" / "train", columns=["key"]).column("key").to_pylist()
    assert sorted(stored) == sorted(k for k, v in EXPECTED.items() if v == "ok" and not k.startswith("flat/"))
    assert manifest["failures"]["by_reason"]["expansion_budget"] == 4
