"""The preprocessing job end to end on real ImageNet images: tensors equal coltran's transforms, a stable disjoint
held-out split across runs and layouts (folder tree, tar of tars, S3 on moto), counts that add up, the bad-input
corpus and hostile archives fully accounted for with nothing written outside DEST, and the CLI and YAML entries."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from corpus import build_bad_image_corpus, build_hostile_tar, build_hostile_zip
from layouts import SAMPLE, build_layouts, s3_bucket
from shared_data import needs_shared_data

from coltran.imageio import decode_image
from coltran.transforms import prepare_example, square_crop_box
from pipelines.dataset.format import TENSOR_SHAPES, crop_rng, split_of
from pipelines.preprocess.job import (
    PreprocessSettings,
    add_arguments,
    load_settings,
    main,
    read_tensor_column,
    run,
    run_preprocess,
)

pytestmark = [pytest.mark.ray, needs_shared_data(SAMPLE)]
REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"heldout_fraction": 0.25, "train_crops": 2, "seed": 7, "min_rows_per_file": 8, "batch_size": 4}
ARCHIVE_REASON = {"unsafe_path": "unsafe_path", "link": "link", "duplicate": "duplicate_name",
                  "bad_name": "non_utf8_name", "special": "special_file", "not_an_image": "not_an_image"}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return build_layouts(tmp_path_factory.mktemp("layouts"))


@pytest.fixture(scope="module")
def s3(layouts, s3_server):
    with s3_bucket(s3_server, "preprocess-layouts") as bucket:
        bucket.upload(layouts.tree, "imagenet/train")
        yield bucket


@pytest.fixture(scope="module")
def ray_session(s3, ray_local):  # the session's local Ray: its workers reach the S3 server
    return ray_local


@pytest.fixture(scope="module")
def tree_run(layouts, ray_session, tmp_path_factory):
    dest = tmp_path_factory.mktemp("out") / "tree"
    manifest = run_preprocess(PreprocessSettings(sources=[str(layouts.tree)], dest=str(dest), **SETTINGS))
    return dest, manifest


def _check_split(dest: Path, split: str, images: dict[str, bytes], crops: int, seed: int) -> dict[str, list]:
    """Every row of DEST/<split> equals coltran's transforms of its image replayed from the stored crop box, and
    that box is the centre (heldout) or the one drawn from (seed, key, crop index) (train); returns key -> rows."""
    table = pq.read_table(dest / split)
    tensors = {name: read_tensor_column(table, name) for name in TENSOR_SHAPES}
    by_key: dict[str, list] = {}
    for i, row in enumerate(table.drop_columns(list(TENSOR_SHAPES)).to_pylist()):
        by_key.setdefault(row["key"], []).append((row, {n: t[i] for n, t in tensors.items()}))
    assert set(by_key) == set(images)
    for key, rows in by_key.items():
        rgb = decode_image(images[key]).rgb
        assert sorted(r["crop_index"] for r, _ in rows) == list(range(crops))
        for row, arrays in rows:
            box = (row["crop_top"], row["crop_left"], row["crop_size"])
            rng = crop_rng(seed, key, row["crop_index"]) if split == "train" else None
            assert box == square_crop_box(*rgb.shape[:2], "random" if rng is not None else "center", rng), key
            assert row["split"] == split and split_of(key, SETTINGS["heldout_fraction"]) == split
            want = prepare_example(rgb, box=box)
            for name in TENSOR_SHAPES:
                assert arrays[name].dtype == np.uint8 and arrays[name].shape == TENSOR_SHAPES[name]
                np.testing.assert_array_equal(arrays[name], want[name], err_msg=f"{key} {name}")
    return by_key


def test_tensors_labels_and_manifest(layouts, tree_run):
    dest, manifest = tree_run
    held = set(manifest["heldout_keys"])
    images = {k: data for k, (data, _) in layouts.expected.items()}
    train = _check_split(dest, "train", {k: v for k, v in images.items() if k not in held}, 2, SETTINGS["seed"])
    heldout = _check_split(dest, "heldout", {k: v for k, v in images.items() if k in held}, 1, 0)
    assert held and train and not held & set(train) and set(heldout) == held
    for key, rows in {**train, **heldout}.items():
        h, w = decode_image(images[key]).size
        for row, _ in rows:
            assert (row["label"], row["orig_height"], row["orig_width"]) == (layouts.expected[key][1], h, w)
    assert manifest == json.loads((dest / "manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == len(train) and manifest["splits"]["heldout"]["rows"] == len(held)
    assert manifest["inputs"] == len(images) and manifest["failures"]["count"] == 0
    assert pq.read_table(dest / "failures.parquet").num_rows == 0
    assert manifest["classes"] == layouts.wnids and manifest["settings"]["train_crops"] == 2
    assert manifest["schema"]["rgb_256"]["shape"] == [256, 256, 3] and manifest["schema"]["label"]["shape"] == []
    assert sorted(p.name for p in dest.iterdir()) == ["failures.parquet", "heldout", "manifest.json", "train"]


def test_ray_and_plain_pyarrow_read_it(tree_run):
    dest, manifest = tree_run
    batch = ray.data.read_parquet(str(dest / "train")).take_batch(5)
    assert batch["rgb_256"].shape == (5, 256, 256, 3) and batch["gray_64"].dtype == np.uint8
    assert ray.data.read_parquet(str(dest / "heldout")).count() == manifest["splits"]["heldout"]["rows"]
    plain = pq.read_table(dest / "train", columns=["key", "rgb3bit_64"])
    bits = read_tensor_column(plain, "rgb3bit_64")
    assert bits.shape == (manifest["splits"]["train"]["rows"], 64, 64, 3) and bits.max() <= 7
    storage_only = plain.cast(plain.schema.set(1, plain.schema.field(1).with_type(plain.schema.field(1).type.storage_type)
                                               .with_metadata({"ARROW:extension:metadata": '{"shape":[64,64,3]}'})))
    np.testing.assert_array_equal(read_tensor_column(storage_only, "rgb3bit_64"), bits)


def test_the_product_reads_parquet_without_ray_datas_footer_actor_pool(tree_run):
    """pipelines.io.parquet: Ray Data's default Parquet reader starts 32 FooterReader actors per read (the direct
    reads above do); the product's reads (here a training split, as the training driver opens it) start none."""
    from pipelines.train.data import open_train_dataset

    def footer_readers() -> int:  # the GCS's actor table: this local Ray has no dashboard for the state API
        return sum(1 for actor in ray._private.state.state.actor_table(None).values()
                   if "FooterReader" in actor["ActorClassName"])

    dest, manifest = tree_run
    before = footer_readers()
    ds = open_train_dataset(str(dest), "colorizer", "train", cache_below_mb=512)
    assert ds.count() == manifest["splits"]["train"]["rows"] and ds.columns() == ["gray_64", "rgb_64"]
    assert footer_readers() == before


def test_heldout_is_stable_across_runs_and_layouts(layouts, tree_run, tmp_path):
    dest, manifest = tree_run
    again = run_preprocess(PreprocessSettings(sources=[str(layouts.tar_of_tars)], dest=str(tmp_path / "d"),
                                              **SETTINGS))
    assert again["heldout_keys"] == manifest["heldout_keys"]
    assert {s: c["rows"] for s, c in again["splits"].items()} == {s: c["rows"] for s, c in manifest["splits"].items()}
    first, second = (pq.read_table(d / "train", columns=["key", "crop_index", "crop_top", "crop_left"]).sort_by(
        [("key", "ascending"), ("crop_index", "ascending")]) for d in (dest, tmp_path / "d"))
    assert first.equals(second)  # the same random crops: they depend on key, crop index and seed only


def test_s3_source_to_s3_dest_through_the_cli(layouts, s3, tree_run):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dest = f"s3://{s3.bucket}/datasets/imagenet"
    args = parser.parse_args([f"s3://{s3.bucket}/imagenet/train", dest, "--heldout-fraction", "0.25",
                              "--train-crops", "2", "--seed", "7", "--min-rows-per-file", "8", "--batch-size", "4"])
    assert run(args) == 0
    fs = s3.filesystem()
    with fs.open_input_stream(f"{s3.bucket}/datasets/imagenet/manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["heldout_keys"] == tree_run[1]["heldout_keys"] and manifest["classes"] == layouts.wnids
    ds = ray.data.read_parquet(f"{dest}/train", filesystem=fs)
    assert ds.count() == manifest["splits"]["train"]["rows"] == 2 * manifest["splits"]["train"]["images"]
    listing = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="datasets/")["Contents"]
    assert all(o["Key"].startswith("datasets/imagenet/") for o in listing), [o["Key"] for o in listing]
    assert not any("_failures" in o["Key"] or "_progress" in o["Key"] for o in listing)


def _snapshot(root: Path, skip: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file() and skip not in p.parents}


def test_bad_inputs_every_item_accounted_nothing_outside_dest(tmp_path, ray_session):
    # Inputs and DEST two levels down: a traversal of up to three levels out of DEST still lands under tmp_path,
    # which only this test writes (the session's background demo and services write elsewhere in the base temp
    # directory, so a snapshot of all of it changes under the test); named escapes are looked for further up.
    jail = tmp_path / "a" / "b"
    inputs = jail / "in"
    corpus = build_bad_image_corpus(inputs / "corpus")
    good = next(SAMPLE.glob("*.JPEG")).read_bytes()
    (inputs / "archives").mkdir()
    members = {"hostile.tar": build_hostile_tar(inputs / "archives" / "hostile.tar", good),
               "hostile.zip": build_hostile_zip(inputs / "archives" / "hostile.zip", good)}
    dest = jail / "out"
    before = _snapshot(tmp_path, dest)
    manifest = run_preprocess(PreprocessSettings(sources=[str(inputs / "corpus"), str(inputs / "archives")],
                                                 dest=str(dest), heldout_fraction=0.5))
    assert _snapshot(tmp_path, dest) == before
    assert not Path("/abs/evil.jpg").exists()
    assert not [p for up in (tmp_path.parent, tmp_path.parent.parent, Path.cwd()) for p in up.glob("evil*.jpg")]
    failures = {r["key"]: r for r in pq.read_table(dest / "failures.parquet").to_pylist()}
    expect_ok = {i.name: i for i in corpus if i.expect == "ok"}
    expect_fail = {i.name: i.reason for i in corpus if i.expect == "fail"}
    for archive, listed in members.items():  # both archives have the stem `hostile`, so keys keep the suffix
        for m in listed:
            key = f"{archive}/{m.name}".encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if m.expect == "ok":
                expect_ok[key] = None
            elif m.expect == "reject":  # for dup.jpg: the first copy is used, the second is a failure
                expect_fail[key] = ARCHIVE_REASON[m.reason]
    assert {k: f["reason"] for k, f in failures.items()} == expect_fail
    assert all(f["message"] and f["source"] for f in failures.values())
    stored = 0
    for split in ("train", "heldout"):
        table = pq.read_table(dest / split)
        rgb = read_tensor_column(table, "rgb_256")
        for row, pixels in zip(table.select(["key", "was_grayscale"]).to_pylist(), rgb, strict=True):
            item = expect_ok[row["key"]]
            data = item.path.read_bytes() if item is not None else good
            crop = ("center", None) if split == "heldout" else ("random", crop_rng(0, row["key"], 0))
            np.testing.assert_array_equal(pixels, prepare_example(decode_image(data).rgb, *crop)["rgb_256"])
            assert item is None or row["was_grayscale"] == item.was_grayscale, row["key"]
        assert len(set(table.column("key").to_pylist())) == table.num_rows
        stored += table.num_rows
    assert stored == len(expect_ok)
    assert manifest["inputs"] == stored + len(failures) == sum(1 for _ in corpus) + \
        sum(1 for ms in members.values() for m in ms if m.expect != "skip")


def test_yaml_job_entry_and_settings_errors(layouts, ray_session, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(f"sources: [{layouts.flat}]\ndest: {tmp_path / 'out'}\nlabels_file: {layouts.labels_file}\n"
                   "heldout_fraction: 0.5\ntrain_crops: 3\n")
    assert main([str(job), "--set", "train_crops=1", "--set", "min_rows_per_file=4"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["train_crops"] == 1 and manifest["inputs"] == len(layouts.flat_labels)
    table = pq.read_table(tmp_path / "out" / "train", columns=["key", "label"])
    heldout = pq.read_table(tmp_path / "out" / "heldout", columns=["key", "label"])
    labels = {r["key"]: r["label"] for r in table.to_pylist() + heldout.to_pylist()}
    assert labels == layouts.flat_labels
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    assert main([str(job), "--set", "train_crops=1", "--set", "min_rows_per_file=4"]) == 0  # finished: nothing to do
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == files
    assert main([str(job), "--set", "min_rows_per_file=4"]) == 2  # another job's dataset: refused
    assert "train_crops: 1 in DEST, 3 now" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main([str(job), "--set", "dest=" + str(tmp_path / "other")]) == 2
    assert "holds no preprocessing run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="valid settings are"):
        load_settings(str(job), ["heldout=0.1"])
    with pytest.raises(ValueError, match="train_crops=0"):
        load_settings(str(job), ["train_crops=0"])
    shipped = load_settings(str(REPO / "jobs" / "preprocess.yaml"), [])
    assert shipped.sources and shipped.dest
