"""pipelines.io.sources on real ImageNet images in every layout (folder tree, tar of tars, .tar.gz, zip, flat folder +
labels file, S3 prefixes on moto), hostile archives member by member, key filters, and the pure name/label rules."""

from __future__ import annotations

import io
import tarfile

import pyarrow.fs as pafs
import pytest
from corpus import build_hostile_tar, build_hostile_zip
from layouts import SAMPLE, build_layouts, s3_bucket
from shared_data import needs_shared_data

from pipelines.io.archives import name_problem
from pipelines.io.labels import parse_labels
from pipelines.io.sources import plan_sources, read_file_bytes, read_sources, split_error

pytestmark = needs_shared_data(SAMPLE)
# What tests/corpus.py calls each rejection, and the reason the reader gives it.
CORPUS_REASON = {"unsafe_path": "unsafe_path", "link": "link", "duplicate": "duplicate_name",
                 "bad_name": "non_utf8_name", "special": "special_file"}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return build_layouts(tmp_path_factory.mktemp("layouts"))


@pytest.fixture(scope="module")
def s3(layouts, s3_server):
    with s3_bucket(s3_server, "sources-layouts") as server:
        server.upload(layouts.tree, "imagenet/train")
        per_class = layouts.root / "per_class"  # an S3 prefix of per-class tars (ImageNet train, expanded once)
        with tarfile.open(layouts.tar_of_tars) as outer:
            outer.extractall(per_class, filter="data")
        server.upload(per_class, "imagenet/train_tars")
        server.client().upload_file(str(layouts.tar_of_tars), server.bucket, "imagenet/ILSVRC2012_img_train.tar")
        yield server


@pytest.fixture(scope="module")
def ray_session(s3, ray_local):  # the session's local Ray: its workers reach the S3 server
    return ray_local


def _rows(ds) -> dict[str, dict]:
    rows = ds.take_all()
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "keys must be unique within one source"
    return by_key


@pytest.mark.ray
@pytest.mark.parametrize("layout", ["tree", "tar_of_tars", "tar_gz", "zip", "s3_tree", "s3_tars", "s3_tar_of_tars"])
def test_every_layout_gives_the_same_rows(layouts, s3, ray_session, layout):
    """The same rows from every layout; the tar of tars on S3 is indexed by range reads of its headers and each
    inner tar read by range from its offset (one work item each)."""
    src = {"s3_tree": f"s3://{s3.bucket}/imagenet/train", "s3_tars": f"s3://{s3.bucket}/imagenet/train_tars/",
           "s3_tar_of_tars": f"s3://{s3.bucket}/imagenet/ILSVRC2012_img_train.tar"}.get(layout) or \
        str(getattr(layouts, layout))
    rows = _rows(read_sources([src]))
    assert sorted(rows) == sorted(layouts.expected)
    for key, (data, label) in layouts.expected.items():
        row = rows[key]
        assert (row["bytes"], row["label"], row["error"], row["source"]) == (data, label, None, src), key


@pytest.mark.ray
def test_flat_folder_with_labels_file_inside_it(layouts, ray_session, tmp_path):
    labels_in_folder = layouts.flat / "labels.txt"  # the labels file sits among the images: not an input
    labels_in_folder.write_text(layouts.labels_file.read_text())
    try:
        rows = _rows(read_sources([str(layouts.flat)], labels_file=str(labels_in_folder)))
    finally:
        labels_in_folder.unlink()
    assert {k: r["label"] for k, r in rows.items()} == layouts.flat_labels
    unlabeled = _rows(read_sources([str(layouts.flat)]))
    assert {r["label"] for r in unlabeled.values()} == {None}


@pytest.mark.ray
def test_key_filter_skips_before_reading(layouts, ray_session):
    wanted = layouts.wnids[1]
    for src in (layouts.tree, layouts.tar_of_tars, layouts.zip):
        rows = _rows(read_sources([str(src)], key_filter=lambda key: key.startswith(wanted + "/")))
        assert sorted(rows) == sorted(k for k in layouts.expected if k.startswith(wanted + "/")), src


@pytest.mark.ray
def test_hostile_archives_every_member_accounted(tmp_path, ray_session):
    good = next(SAMPLE.glob("*.JPEG")).read_bytes()
    for name, build in (("hostile.tar", build_hostile_tar), ("hostile.zip", build_hostile_zip)):
        members = build(tmp_path / name, good)
        rows = read_sources([str(tmp_path / name)]).take_all()
        expected = [m for m in members if m.expect != "skip"]
        assert len(rows) == len(expected), name
        for member, row in zip(expected, rows, strict=True):  # one task streams the archive in order
            assert row["key"] == member.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if member.expect == "ok":
                assert row["error"] is None and row["bytes"] == good
            elif member.reason == "not_an_image":  # a safe member: judging its bytes is the decoder's job
                assert row["error"] is None and row["bytes"]
            else:
                assert row["bytes"] is None
                assert split_error(row["error"])[0] == CORPUS_REASON[member.reason], (name, member, row["error"])
    assert not (tmp_path.parent / "evil.jpg").exists() and not (tmp_path / "photos").exists()


@pytest.mark.ray
def test_broken_and_deeply_nested_archives_are_error_rows(tmp_path, layouts, ray_session):
    whole = layouts.tar_gz.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 this is no zip" * 10)
    with tarfile.open(tmp_path / "deep.tar", "w") as outer:  # deep.tar > mid.tar > inner.tar > x.JPEG
        data = layouts.tar_of_tars.read_bytes()
        info = tarfile.TarInfo("mid.tar")
        info.size = len(data)
        outer.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "mixed.tar", "w") as outer:  # a zip inside a tar is expanded like an inner tar
        data = layouts.zip.read_bytes()
        info = tarfile.TarInfo("inner.zip")
        info.size = len(data)
        outer.addfile(info, io.BytesIO(data))
    rows = read_sources([str(tmp_path)], infer_labels=False).take_all()
    errors = {r["key"]: split_error(r["error"])[0] for r in rows if r["error"]}
    mixed = {r["key"]: r["bytes"] for r in rows if r["key"].startswith("mixed/")}
    assert mixed == {f"mixed/inner/{k}": data for k, (data, _) in layouts.expected.items()}
    assert errors["cut.tar.gz"] == "unreadable_archive" and errors["junk.zip"] == "unreadable_archive"
    assert {k for k, v in errors.items() if v == "nested_archive"} == {f"deep/mid/{w}.tar" for w in layouts.wnids}
    good = [r for r in rows if r["error"] is None]
    cut = [r for r in good if r["key"].startswith("cut/")]  # the members before the cut are still used
    assert cut and len(cut) + len(mixed) == len(good) and all(r["label"] is None for r in good)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        plan_sources([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no files"):
        plan_sources([str(tmp_path / "empty")])


def test_plan_lists_once_and_finds_classes(layouts):
    plan = plan_sources([str(layouts.tree), str(layouts.tar_of_tars)])
    assert plan.num_files == len(layouts.expected) and plan.num_archives == 1
    assert plan.labeling.classes == tuple(layouts.wnids)
    items = plan.work_items(rows_per_block=16)  # 40 files in blocks of 16, one item per inner class tar
    assert [i["kind"] for i in items] == ["files"] * 3 + ["inner"] * len(layouts.wnids)
    assert [i["id"] for i in items] == [i["id"] for i in plan_sources([str(layouts.tree), str(layouts.tar_of_tars)])
                                       .work_items(rows_per_block=16)]  # stable: resumes and retries rely on it
    assert len({i["id"] for i in items}) == len(items)
    assert isinstance(plan.filesystems[0], pafs.LocalFileSystem) and len(plan.filesystems) == 1


def test_member_name_rules():
    seen: set[str] = set()  # one archive: later names are checked against the earlier ones
    cases = [("a/b.JPEG", None), ("./a/c.JPEG", None), ("../x.jpg", "unsafe_path"), ("a/../../x", "unsafe_path"),
             ("/etc/passwd", "unsafe_path"), ("C:\\x.jpg", "unsafe_path"), ("a\\..\\x.jpg", "unsafe_path"),
             ("bad\udcff.jpg", "non_utf8_name"), ("a/b.JPEG", "duplicate_name"), ("a//b.JPEG", "duplicate_name"),
             ("a/c.JPEG", "duplicate_name")]
    for name, reason in cases:
        problem = name_problem(name, seen)
        assert (split_error(problem)[0] if problem else None) == reason, name


def test_labels_file_formats():
    assert parse_labels("filename,label\na.JPEG,3\nb.JPEG,4\n") == {"a.JPEG": "3", "b.JPEG": "4"}
    loc = "ImageId,PredictionString\nILSVRC2012_val_01,n01751748 255 142 454 329 n01751748 1 2 3 4\n"
    assert parse_labels(loc) == {"ILSVRC2012_val_01": "n01751748"}
    assert parse_labels("# tiny imagenet\nval_0.JPEG\tn03444034\t0\t32\t44\t62\nx.png  7\n") == {
        "val_0.JPEG": "n03444034", "x.png": "7"}
    with pytest.raises(ValueError, match="line 2"):
        parse_labels("a.JPEG,1\nb.JPEG\n")


@pytest.mark.ray
def test_loose_files_read_in_blocks_and_unreadable_files_are_rows(layouts, ray_session, tmp_path):
    """Files are read by the consuming task, `rows_per_block` to a block; a file that vanished after the listing
    (or is over the size limit) is an error row for that key, and the other files are still read."""
    tree = tmp_path / "tree"
    for key, (data, _) in layouts.expected.items():
        (tree / key).parent.mkdir(parents=True, exist_ok=True)
        (tree / key).write_bytes(data)
    plan = plan_sources([str(tree)])
    gone = sorted(layouts.expected)[1]
    (tree / gone).unlink()
    ds = plan.to_dataset(rows_per_block=3)
    blocks = [len(batch["key"]) for batch in ds.iter_batches(batch_size=None)]
    assert sum(blocks) == len(layouts.expected) and max(blocks) <= 3
    rows = _rows(ds)
    assert split_error(rows[gone]["error"])[0] == "unreadable_file" and rows[gone]["bytes"] is None
    assert {k: r["bytes"] for k, r in rows.items() if k != gone} == \
        {k: data for k, (data, _) in layouts.expected.items() if k != gone}
    with pytest.raises(ValueError, match="rows_per_block"):
        plan.to_dataset(rows_per_block=0)


def test_file_over_the_size_limit_is_not_read(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff" * 1000)
    fs = pafs.LocalFileSystem()
    assert read_file_bytes(fs, str(path), limit=1000) == (b"\xff" * 1000, None)
    data, error = read_file_bytes(fs, str(path), limit=999)
    assert data is None and split_error(error)[0] == "file_too_large"
    data, error = read_file_bytes(fs, str(tmp_path / "missing.jpg"))
    assert data is None and split_error(error)[0] == "unreadable_file" and "missing.jpg" in error


def test_archive_gone_after_planning_gives_error_rows(layouts, tmp_path):
    """Work items of a plain tar read by offset: an archive removed after the listing gives one error row per
    inner archive (keyed by its stem) instead of failing the task."""
    gone = tmp_path / "classes.tar"
    gone.write_bytes(layouts.tar_of_tars.read_bytes())
    plan = plan_sources([str(gone)])
    items = plan.work_items()
    gone.unlink()
    rows = [row for item in items for row in plan.for_tasks().item_rows(item)]
    assert sorted(r["key"] for r in rows) == layouts.wnids
    assert all(split_error(r["error"])[0] == "unreadable_archive" and r["bytes"] is None for r in rows)
