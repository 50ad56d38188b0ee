"""Batch colorization on a real local Ray (and a moto S3 server): folder + tar + zip + the bad-image corpus in one
run (every input accounted for, outputs sized right, full resolution keeping the input's luma, nothing outside
DEST; every setting but the seed at its default, so the resource plan is sized from this machine's CPUs), an S3
prefix plus preprocessed Parquet written to S3 (a job killed midway then resumed: test_batch_resume.py). Without
Ray: naming, seeds, settings, the manifest merge and compaction."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from corpus import build_bad_image_corpus, build_hostile_tar, build_hostile_zip
from layouts import SAMPLE, env_vars
from PIL import Image
from shared_data import needs_shared_data

from coltran.chroma import luma
from coltran.imageio import decode_image
from coltran.init_models import init_models
from pipelines.batch.manifest import ResumeError, begin_attempt, merge_parts, read_parts
from pipelines.batch.outputs import image_seed, output_relpath, put_bytes, source_labels
from pipelines.batch.settings import ConfigError, load_settings
from pipelines.cli import main as coltran_main
from pipelines.io.s3 import s3_filesystem

pytestmark = needs_shared_data(SAMPLE)
READER_REASON = {"unsafe_path": "unsafe_path", "link": "link", "duplicate": "duplicate_name",
                 "bad_name": "non_utf8_name", "special": "special_file"}


def _real(n: int, gray: bool = False) -> list:
    names = set((SAMPLE / "GRAYSCALE_FILES.txt").read_text().split())
    return [p for p in sorted(SAMPLE.glob("*.JPEG")) if (p.name in names) == gray][:n]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return init_models(tmp_path_factory.mktemp("models"), "test")


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_local):
    """The session's local Ray (its workers reach the S3 server), with the S3 server's endpoint and credentials
    set here too, for the jobs' driver side."""
    with env_vars(s3_server.env_overrides):
        yield s3_server


def _manifest(path) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    assert len({(r["key"], r["stage"] == "read" and r["reason"]) for r in rows}) == len(rows), "duplicate rows"
    return rows


# --- rules, no Ray ---------------------------------------------------------------------------------------------

def test_output_paths_never_leave_dest():
    hostile = ["../x.jpg", "/abs/y.jpg", "a/../../b.jpg", "a\\..\\..\\c.jpg", "", ".", "./.", "x\x00y\n.jpg",
               "C:\\w.jpg", "é/" + "n" * 400 + ".jpg", "bad\\xff.jpg", "//double//slash.png"]
    paths = [output_relpath(k, 0, "png") for k in hostile]
    for key, path in zip(hostile, paths, strict=True):
        parts = path.split("/")
        assert ".." not in parts and "" not in parts and not path.startswith("/"), key
        assert parts[0] not in ("_tmp", "_manifest_parts", "manifest.parquet", "_batch_state.json"), key
        assert all(len(p.encode()) <= 255 for p in parts) and "\x00" not in path and "\n" not in path, key
    assert len(set(paths)) == len(paths)
    assert output_relpath("a/b.jpg", 1, "jpeg") == "a/b_s1.jpg"  # docs/batch.md: one naming rule
    assert source_labels(["/x/photos/", "s3://b/photos", "/y/more.tar.gz"]) == {
        "/x/photos/": "photos", "s3://b/photos": "photos-2", "/y/more.tar.gz": "more"}


def test_image_seed_is_stable_and_per_key():
    assert image_seed(0, "n01/a.JPEG") == 473369386  # pinned: a seed must never change between versions
    seeds = {image_seed(b, k) for b in (0, 1) for k in ("a", "b", "a/b")}
    assert len(seeds) == 6 and all(0 <= s < 2**31 for s in seeds)


def test_settings_are_strict():
    s = load_settings(data={"sources": ["x"], "models": "m", "out": "o"},
                      overrides=["colorizer.batch_size=3", "spatial_upsampler.pool_max=2"])
    assert (s.colorizer.batch_size, s.spatial_upsampler.pool_max, s.color_upsampler.batch_size) == (3, 2, 8)
    with pytest.raises(ConfigError, match="valid keys"):
        load_settings(data={"sources": ["x"], "models": "m", "out": "o"}, overrides=["colorizer.batchsize=3"])
    with pytest.raises(ConfigError, match="mode must be one of"):
        load_settings(data={"sources": ["x"], "models": "m", "out": "o", "mode": "greedy"})
    job = load_settings(Path(__file__).resolve().parents[1] / "jobs" / "colorize.yaml", overrides=["sources=[a]", "out=/tmp/x"])
    assert job.models.startswith("models:/@") and job.colorizer.pool_max >= job.colorizer.pool_min


def test_compile_sampler_reaches_only_the_colorizer_actors_and_keeps_the_fingerprint():
    from types import SimpleNamespace

    from pipelines.batch.job import stage_actor_kwargs

    base = {"sources": ["x"], "models": "m", "out": "o"}
    compiled = load_settings(data=base, overrides=["compile_sampler=true"])
    models = {stage: SimpleNamespace(ref=f"/m/{stage}") for stage in ("colorizer", "color_upsampler",
                                                                       "spatial_upsampler")}
    kwargs = {stage: stage_actor_kwargs(compiled, stage, models, "cpu") for stage in models}
    assert [kwargs[stage]["compile_sampler"] for stage in models] == [True, False, False]
    assert stage_actor_kwargs(load_settings(data=base), "colorizer", models, "cpu")["compile_sampler"] is False
    # exact either way: a resumed run may switch it
    assert compiled.fingerprint({}) == load_settings(data=base).fingerprint({})
    with pytest.raises(ConfigError, match="compile_sampler"):
        load_settings(data={**base, "compile_sampler": "yes"})


def _part(key, status, attempt, stage="done", reason=None, minute=0):
    import datetime

    return {"key": key, "status": status, "attempt": attempt, "stage": stage, "reason": reason,
            "finished_at": datetime.datetime(2026, 1, 1, 0, minute, tzinfo=datetime.UTC)}


def test_merge_prefers_this_attempt_and_reports_earlier_work_as_skipped():
    import pyarrow as pa

    from pipelines.batch.manifest import MANIFEST_SCHEMA

    rows = [_part("a", "done", 1), _part("b", "failed", 1, "decode", "corrupt"), _part("gone", "failed", 1, "decode"),
            _part("dup", "done", 1), _part("dup", "failed", 1, "read", "duplicate_name"),
            _part("dup", "failed", 2, "read", "duplicate_name"), _part("b", "done", 2),
            _part("e", "done", 2, minute=1), _part("e", "failed", 2, "write", "write_error", minute=2),
            _part("a", "done", 1, minute=3),  # a retried task wrote `a` twice
            _part("twin", "done", 1), _part("twin", "failed", 1, "read", "duplicate_name")]  # resume skips both
    record, manifest = merge_parts(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), attempt=2)
    got = {(r["key"], r["stage"] == "read"): (r["status"], r["reason"], r["attempt"]) for r in manifest.to_pylist()}
    assert got == {("a", False): ("skipped", "already_done", 1), ("b", False): ("done", None, 2),
                   ("dup", False): ("skipped", "already_done", 1), ("dup", True): ("failed", "duplicate_name", 2),
                   ("e", False): ("done", None, 2), ("twin", False): ("skipped", "already_done", 1),
                   ("twin", True): ("failed", "duplicate_name", 1)}
    assert sorted(record.column("status").to_pylist()) == ["done"] * 5 + ["failed"] * 2


def test_compaction_keeps_every_row_in_few_parts(tmp_path):
    from pyarrow import fs as pafs

    from pipelines.batch.manifest import compact_parts, finish_attempt, write_part

    local, dest = pafs.LocalFileSystem(), str(tmp_path)
    for batch in range(12):  # 12 write batches of 3 inputs, compacted every 5 batches
        write_part(local, dest, [_part(f"k{batch}-{i}", "done", 1) for i in range(3)], attempt=1)
        if batch % 5 == 4:
            assert compact_parts(local, dest, attempt=1) == 5
    table, paths = read_parts(local, dest)
    assert table.num_rows == 36 and len(paths) == 2 + 2  # two compacted parts, two batches since
    assert compact_parts(local, dest, attempt=1, min_parts=3) == 0  # too few small parts to bother
    manifest = finish_attempt(local, dest, attempt=1)
    assert manifest.num_rows == 36 and len(read_parts(local, dest)[1]) == 1


def test_compaction_on_s3(s3_server, s3_env):
    from pipelines.batch.manifest import compact_parts, finish_attempt, write_part

    fs, dest = s3_filesystem(), f"{s3_server.create_bucket('batch-compact')}/out"
    for batch in range(4):
        write_part(fs, dest, [_part(f"k{batch}-{i}", "done", 1) for i in range(2)], attempt=1)
    assert compact_parts(fs, dest, attempt=1) == 4 and len(read_parts(fs, dest)[1]) == 1
    write_part(fs, dest, [_part("late", "failed", 1, "decode", "corrupt")], attempt=1)
    manifest = finish_attempt(fs, dest, attempt=1)
    assert manifest.num_rows == 9 and len(read_parts(fs, dest)[1]) == 1


def test_finished_keys_travel_as_a_reference_not_a_set():
    import pickle

    from pipelines.batch.resume import DoneKeys, hash_array

    keys = [f"n{i:05d}/img_{i}.JPEG" for i in range(50_000)]
    done = DoneKeys(ref=None, count=len(keys), _hashes=np.unique(hash_array(keys)))
    assert all(k in done for k in keys[::997]) and "n00001/other.JPEG" not in done and "" not in done
    assert len(pickle.dumps(done)) < 300  # what each task receives, whatever the number of finished keys
    assert pickle.loads(pickle.dumps(done))._hashes is None and not DoneKeys()


def test_exit_status_counts_failed_inputs_only_past_the_allowed_fraction():
    from pipelines.batch.job import BatchSummary

    def code(failed: int, allowed: float) -> int:
        return BatchSummary("out", 1, {"done": 3, "failed": failed, "skipped": 0}, 1.0, 1.0, allowed).exit_code

    assert code(1, 1.0) == 0 and code(3, 1.0) == 0  # the default: unusable inputs never fail the job
    assert code(1, 0.25) == 0 and code(1, 0.2) == 1 and code(0, 0.0) == 0 and code(1, 0.0) == 1
    with pytest.raises(ConfigError, match="max_failed_fraction"):
        load_settings(data={"sources": ["x"], "models": "m", "out": "o", "max_failed_fraction": 1.5})


def test_resume_refuses_other_settings(tmp_path):
    from pyarrow import fs as pafs

    local = pafs.LocalFileSystem()
    assert begin_attempt(local, str(tmp_path), {"seed": 0, "models": {"colorizer": "x"}}) == 1
    assert begin_attempt(local, str(tmp_path), {"seed": 0, "models": {"colorizer": "x"}}) == 2
    with pytest.raises(ResumeError, match="seed: earlier 0, now 1"):
        begin_attempt(local, str(tmp_path), {"seed": 1, "models": {"colorizer": "x"}})
    put_bytes(local, str(tmp_path / "other"), "manifest.parquet", b"not ours")
    with pytest.raises(ResumeError, match="not a batch destination"):
        begin_attempt(local, str(tmp_path / "other"), {})


# --- real Ray ---------------------------------------------------------------------------------------------------

def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _local_sources(root):
    """A folder of real images, a hostile tar and zip holding a real image, and the bad-image corpus: the expected
    (status, reason, stage) per manifest identity and the input bytes of every usable key."""
    (root / "photos").mkdir(parents=True)
    expected, inputs = {}, {}
    for path in _real(1) + _real(1, gray=True):
        (root / "photos" / path.name).write_bytes(path.read_bytes())
        expected[(f"photos/{path.name}", False)] = ("done", None)
        inputs[f"photos/{path.name}"] = path.read_bytes()
    good = _real(3)[2].read_bytes()
    for label, build in (("tarball", build_hostile_tar), ("zipped", build_hostile_zip)):
        for m in build(root / f"{label}.{'tar' if label == 'tarball' else 'zip'}", good):
            key = f"{label}/{_printable(m.name)}"
            if m.expect == "ok":
                expected[(key, False)], inputs[key] = ("done", None), good
            elif m.reason == "not_an_image":
                expected[(key, False)] = ("failed", "not_an_image")
            elif m.expect == "reject":
                expected[(key, True)] = ("failed", READER_REASON[m.reason])
    for item in build_bad_image_corpus(root / "corpus"):
        key = f"corpus/{item.name}"
        expected[(key, False)] = ("done", None) if item.expect == "ok" else ("failed", item.reason)
        if item.expect == "ok":
            inputs[key] = item.path.read_bytes()
    return [str(root / n) for n in ("photos", "tarball.tar", "zipped.zip", "corpus")], expected, inputs


@pytest.mark.ray
def test_folder_archives_and_bad_inputs_at_full_resolution(tmp_path, models, ray_s3, ray_local, capsys):
    sources, expected, inputs = _local_sources(tmp_path / "in")
    dest = tmp_path / "out"
    start = time.monotonic()
    code = coltran_main(["colorize", *sources, "--models", str(models), "--out", str(dest), "--seed", "7"])
    print(f"local run: {time.monotonic() - start:.1f} s for {len(expected)} inputs")
    assert code == 0  # some inputs failed, recorded in the manifest: the job itself finished
    cpus = os.cpu_count()
    assert ray_local.num_cpus == cpus  # this machine's CPU count, no extra logical CPUs
    err = capsys.readouterr().err
    assert "resource plan for colorize: " in err and f"{cpus} CPUs" in err, err[-2000:]
    rows = _manifest(dest / "manifest.parquet")
    got = {(r["key"], r["stage"] == "read"): (r["status"], r["reason"]) for r in rows}
    assert got == expected
    files = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    outputs = set()
    for row in (r for r in rows if r["status"] == "done"):
        assert row["seed"] == image_seed(7, row["key"].split("/", 1)[1]) and row["attempt"] == 1
        assert len(row["outputs"]) == 1 and row["resolution"] == "full"
        source = decode_image(inputs[row["key"]]).rgb
        with Image.open(dest / row["outputs"][0]) as im:
            out = np.asarray(im.convert("RGB"))
        assert out.shape[:2] == source.shape[:2] == (row["height"], row["width"]) == (row["out_height"],
                                                                                       row["out_width"])
        # the 8-bit luma the job keeps (half a grey level) plus the rounding of the output's RGB (another half)
        assert np.abs(luma(out) - luma(source)).max() <= 1.0 + 1e-6, row["key"]
        assert all(row[t] is not None and row[t] >= 0 for t in ("colorizer_s", "spatial_upsampler_s", "write_s"))
        outputs.update(row["outputs"])
    assert files - outputs == {"manifest.parquet", "_batch_state.json"} | {
        f for f in files if f.startswith("_manifest_parts/a00001-merged-")}
    assert len([f for f in files if f.startswith("_manifest_parts/")]) == 1
    for escaped in (tmp_path / "evil.jpg", tmp_path / "in" / "evil.jpg", tmp_path.parent / "evil.jpg",
                    tmp_path / "evil2.jpg", dest / "evil.jpg"):
        assert not escaped.exists()


@pytest.mark.ray
def test_s3_prefix_and_parquet_to_s3(tmp_path, models, ray_s3):
    from pipelines.preprocess.job import PreprocessSettings, run_preprocess

    bucket = ray_s3.create_bucket("batch-io")
    folder, flat = tmp_path / "s3in", tmp_path / "flat"
    folder.mkdir(), flat.mkdir()
    for path in _real(2, gray=False)[:1] + _real(2, gray=True)[1:]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "cut.jpg").write_bytes(_real(1)[0].read_bytes()[:5000])
    ray_s3.upload_folder(folder, bucket, "in")
    for path in _real(4)[3:4]:
        (flat / path.name).write_bytes(path.read_bytes())
    run_preprocess(PreprocessSettings(sources=[str(flat)], dest=str(tmp_path / "ds"), heldout_fraction=1.0))
    code = coltran_main(["colorize", f"s3://{bucket}/in", str(tmp_path / "ds"), "--models", str(models),
                         "--out", f"s3://{bucket}/out/", "--format", "jpeg", "--num-samples", "2",
                         "--set", "max_failed_fraction=0"])
    assert code == 1  # the truncated cut.jpg failed, and this job allows no failure
    fs = s3_filesystem()
    rows = {r["key"]: r for r in pq.read_table(f"{bucket}/out/manifest.parquet", filesystem=fs).to_pylist()}
    expected_keys = {f"in/{p.name}" for p in folder.iterdir()} | {f"ds/heldout/{p.name}" for p in flat.iterdir()}
    assert set(rows) == expected_keys
    assert (rows["in/cut.jpg"]["status"], rows["in/cut.jpg"]["reason"]) == ("failed", "truncated")
    differs = []
    for key, row in rows.items():
        if key == "in/cut.jpg":
            continue
        assert row["status"] == "done" and len(row["outputs"]) == 2
        parquet = key.startswith("ds/")
        assert row["resolution"] == ("256" if parquet else "full")
        images = []
        for rel in row["outputs"]:
            with fs.open_input_stream(f"{bucket}/out/{rel}") as f, Image.open(io.BytesIO(f.read())) as im:
                assert im.format == "JPEG" and rel.endswith(".jpg")
                images.append(np.asarray(im.convert("RGB")))
        size = (256, 256) if parquet else decode_image((folder / key.split("/", 1)[1]).read_bytes()).size
        assert all(im.shape[:2] == size == (row["out_height"], row["out_width"]) for im in images), key
        differs.append(not np.array_equal(images[0], images[1]))
    assert any(differs), "two samples per image should differ"


@pytest.mark.slow
def test_models_from_the_registry_are_pinned_and_loaded_per_stage(tmp_path, models, mlflow_server, monkeypatch):
    import torch
    from mlflow import MlflowClient

    from coltran.checkpoint import load_checkpoint
    from pipelines.batch.job import resolve_stage_models, stage_actor_kwargs
    from pipelines.inference.stages import STAGE_ACTORS
    from pipelines.tracking.names import REGISTERED_NAMES
    from pipelines.tracking.registry import register_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("COLTRAN_MODEL_CACHE", str(tmp_path / "cache"))
    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment("batch-test")).info.run_id
    # the session's MLflow server is shared: other tests may hold versions of the default names already
    versions = {stage: register_stage(models / stage, run_id=run_id, name=name, alias="production",
                                      tracking_uri=mlflow_server.uri) for stage, name in REGISTERED_NAMES.items()}
    resolved = resolve_stage_models("models:/@production")
    assert {s: m.ref for s, m in resolved.items()} == {s: f"models:/{n}/{versions[s]}" for s, n in REGISTERED_NAMES.items()}
    assert all(m.label.endswith("(untrained)") for m in resolved.values())
    settings = load_settings(data={"sources": ["x"], "models": "models:/@production", "out": "o"})
    actor = STAGE_ACTORS["colorizer"](**stage_actor_kwargs(settings, "colorizer", resolved, "cpu"))
    assert actor.pipe.color_upsampler is None and actor.pipe.spatial_upsampler is None  # one stage per actor
    expected = load_checkpoint(models / "colorizer").model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in actor.pipe.colorizer.state_dict().items())
    out = actor({"key": np.array(["k"], dtype=object), "seed": np.array([3]),
                 "gray_64": np.zeros((1, 64, 64), np.uint8)})
    assert out["colors3"].shape == (1, 1, 64, 64, 3) and out["colorizer_s"].shape == (1,)
