"""Training the three stages at once on a real Ray cluster with three labelled pools, tracked by a real MLflow
server: the session's training submission (cluster_flow.py: 16 real photos, every stage on its own pool, a worker
of the 2-worker stage SIGKILLed mid-run) checked from its logs, checkpoints and MLflow runs. A second submission
of the same run name continues the same runs, and a stage whose resume fails does not stop the other one."""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist
import yaml
from cluster_flow import KILL_STEP, NAMES, PLAN, RUN, STAGES, submission_runs
from PIL import Image
from ray.data.dataset import MaterializedDataset
from services import free_port
from torch.nn.parallel import DistributedDataParallel

from coltran.checkpoint import load_checkpoint
from coltran.configs import preset
from coltran.models import build_model
from coltran.optim import EMA, make_optimizer
from coltran.pipeline import ColTranPipeline
from coltran.sampling import sample_colorizer
from coltran.transforms import rgb_to_gray, upsample_4x
from pipelines.dataset.format import read_tensor_column
from pipelines.tracking.registry import resolve_models
from pipelines.tracking.runs import STAGE_TAG
from pipelines.train.data import DataPosition, open_train_dataset, train_batches
from pipelines.train.evaluation import evaluate, sample_grid
from pipelines.train.state import replica_spread
from pipelines.train.worker import StageLoss

pytestmark = pytest.mark.timeout(1800)


def _submit(cluster, entrypoint: str, log: Path, timeout: float = 1200) -> tuple[str, float]:
    """Submit through the job API as a user does; the job's whole log is kept in `log` for diagnosis."""
    start = time.monotonic()
    client = cluster.job_client()
    # RAY_ADDRESS for every process of the job: Ray Train's helper actors otherwise auto-detect the cluster and
    # fail when other Ray instances run on the same machine (as on a shared test box).
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
    try:
        logs = cluster.wait_job(job_id, timeout=timeout)
    finally:
        log.write_text(client.get_job_logs(job_id))
    return logs, time.monotonic() - start


def _history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.ray
@pytest.mark.slow
def test_job_trained_every_stage_and_said_so(cluster_flow):
    for stage in STAGES:
        assert f"stage {stage}: ok at step {PLAN[stage][2]}" in cluster_flow.logs["train"]
    manifest = json.loads(cluster_flow.read_bytes(f"{cluster_flow.dataset}/manifest.json"))
    assert manifest["splits"]["heldout"]["images"] >= 2 and manifest["splits"]["train"]["images"] >= 8


@pytest.mark.ray
@pytest.mark.slow
def test_stages_ran_concurrently_each_on_its_own_pool(cluster_flow, mlflow_server, ray_pool_cluster):
    client, _, runs, _ = submission_runs(mlflow_server)
    windows = {}
    for stage, run in runs.items():
        nodes = json.loads(run.data.tags["coltran.worker_nodes"])
        assert len(nodes) == PLAN[stage][0]
        assert {n["node_id"] for n in nodes} == {ray_pool_cluster.node_ids[stage]}
        assert all(n["labels"]["pool"] == stage for n in nodes)
        # from the first attempt's first logged step (or the last attempt's worker start, if earlier) to the end
        # of the step loop: the pools were held and trained at once
        tags, times = run.data.tags, [value for _, value in _history(client, run, "wallclock_s")]
        windows[stage] = (min(float(tags["coltran.attempt_started_at"]), min(times)),
                          float(tags["coltran.train_finished_at"]))
        assert windows[stage][1] >= max(times) - 1e-3
    latest_start = max(start for start, _ in windows.values())
    earliest_end = min(end for _, end in windows.values())
    assert latest_start < earliest_end, f"training windows do not overlap: {windows}"


@pytest.mark.ray
@pytest.mark.slow
def test_loss_falls_when_overfitting_a_few_images(cluster_flow, mlflow_server):
    client, _, runs, _ = submission_runs(mlflow_server)
    for stage, run in runs.items():
        losses = [value for _, value in _history(client, run, "loss")]  # window means, every LOG_EVERY steps
        assert len(losses) >= 4
        half = len(losses) // 2
        first, last = np.mean(losses[:half]), np.mean(losses[-half:])
        assert last < first - 0.1, f"{stage} loss did not fall: {losses}"
        assert _history(client, run, "loss")[-1][0] == PLAN[stage][2]


@pytest.mark.ray
@pytest.mark.slow
def test_checkpoints_hold_model_ema_optimizer_step_data_position_and_rng(cluster_flow, tmp_path):
    for stage in STAGES:
        workers, batch, steps, every = PLAN[stage]
        found = [uri for uri in cluster_flow.folders(f"{cluster_flow.storage}/{RUN}-{stage}")
                 if uri.rsplit("/", 1)[1].startswith("checkpoint_")]
        assert 1 <= len(found) <= 2, f"keep_checkpoints=2 retention broken for {stage}: {found}"
        local = tmp_path / stage  # the checkpoint as Ray Train left it in S3
        local.mkdir()
        pafs.copy_files(cluster_flow.key(found[-1]), str(local), source_filesystem=cluster_flow.fs)
        ckpt = load_checkpoint(local, weights="model", with_training_state=True, stage=stage)
        assert ckpt.step == steps and ckpt.optimizer_state and ckpt.ema_state
        state = ckpt.trainer_state
        assert state["world_size"] == workers and len(state["rng"]) == workers
        rows = cluster_flow.read_table(f"{cluster_flow.dataset}/train", columns=["key"]).num_rows
        per_epoch = (rows // workers) // (batch // workers)  # equal shards, whole batches only
        assert state["data"]["epoch"] * per_epoch + state["data"]["batch"] == steps  # batches consumed
        exported = load_checkpoint(cluster_flow.models_dir / stage, stage=stage)
        assert exported.step == steps


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_resumed_from_its_checkpoint_in_the_same_mlflow_run(cluster_flow, mlflow_server):
    client, _, runs, children = submission_runs(mlflow_server)
    assert sorted(r.data.tags[STAGE_TAG] for r in children) == sorted(STAGES)  # one child run per stage
    run = runs["color_upsampler"]
    marker = cluster_flow.read_bytes(f"{cluster_flow.storage}/{RUN}-color_upsampler.fault-injected")
    assert marker.decode().strip() == f"killed at step {KILL_STEP}"
    assert run.data.tags["coltran.restored_from_step"] == "4"  # the last checkpoint before the kill
    assert run.data.tags["coltran.final_step"] == "16" and run.info.status == "FINISHED"
    assert runs["colorizer"].data.tags["coltran.restored_from_step"] == ""  # untouched stages never restarted
    spread = _history(client, run, "ddp/replica_spread")
    assert spread and all(value == 0.0 for _, value in spread), "DDP replicas diverged"


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_holds_params_metrics_images_and_config(cluster_flow, mlflow_server):
    client, parent, runs, _ = submission_runs(mlflow_server)
    assert parent.data.params["stages.color_upsampler.scaling.num_workers"] == "2"
    assert parent.data.params["mlflow.alias"] == "candidate"
    assert parent.info.status == "FINISHED"
    resolved = client.download_artifacts(parent.info.run_id, "config/job_resolved.yaml", str(cluster_flow.root))
    assert yaml.safe_load(Path(resolved).read_text())["stages"]["spatial_upsampler"]["train"]["max_steps"] == PLAN["spatial_upsampler"][2]
    for stage, run in runs.items():
        assert run.data.params["model_config.hidden_size"] == "32"
        assert run.data.params["train.batch_size"] == str(PLAN[stage][1])
        for key in ("loss", "images_per_s", "step_time_s", "data_wait_s", "eval/bits_per_dim"):
            assert key in run.data.metrics, f"{stage} lacks metric {key}"
        assert 0 <= run.data.metrics["data_wait_s"] < run.data.metrics["step_time_s"]
        assert 0 < run.data.metrics["eval/bits_per_dim"] < 10
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert images, f"{stage} logged no sample grid"
    grid = client.download_artifacts(runs["colorizer"].info.run_id, "images", str(cluster_flow.root / "grids"))
    pngs = sorted(Path(grid).rglob("*.png"))
    assert pngs
    assert Image.open(pngs[0]).size == (2 * 64, 3 * 64)  # 2 images x (gray, sample, truth)


@pytest.mark.ray
@pytest.mark.slow
def test_registered_models_resolve_load_and_colorize(cluster_flow, mlflow_server, tmp_path):
    client = mlflow_server.client()
    for stage in STAGES:
        assert client.get_model_version_by_alias(NAMES[stage], "candidate").version
    models = resolve_models("models:/@candidate", dest=tmp_path / "models", tracking_uri=mlflow_server.uri,
                            names=NAMES)
    one = resolve_models(f"models:/{NAMES['colorizer']}@candidate", dest=tmp_path / "one",
                         tracking_uri=mlflow_server.uri)
    ckpt = load_checkpoint(one, stage="colorizer")
    assert ckpt.step == PLAN["colorizer"][2] and ckpt.meta["registered_name"] == NAMES["colorizer"]
    heldout = cluster_flow.read_table(f"{cluster_flow.dataset}/heldout")
    gray = read_tensor_column(heldout, "gray_64")[:1]
    colors = sample_colorizer(ckpt.model, torch.from_numpy(gray), seeds=[0]).colors3
    assert colors.shape == (1, 64, 64, 3) and int(colors.max()) <= 7
    pipe = ColTranPipeline.from_models(models, device="cpu")
    out = pipe([np.repeat(gray[0][..., None], 3, axis=2)], resolution="256")
    assert out[0].samples[0].rgb_256.shape == (256, 256, 3)
    mlflow.set_tracking_uri(mlflow_server.uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAMES['color_upsampler']}@candidate")
    assert pyfunc.metadata.signature.inputs.input_names() == ["gray_64", "colors3"]
    rgb = pyfunc.predict({"gray_64": gray, "colors3": colors.numpy()})
    assert rgb.shape == (1, 64, 64, 3) and rgb.dtype == np.uint8


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.last  # it moves the session flow's runs on (and fails one): every other reader of them runs first
def test_resubmission_continues_the_same_runs_and_a_failing_stage_spares_the_other(
        cluster_flow, mlflow_server, ray_pool_cluster):
    # The colour upsampler goes on to 20 steps; the colorizer (asked to go on past its 32 to 40) fails loudly on
    # resume (its checkpoint was made with another architecture) and must neither stop the colour upsampler nor
    # pass unnoticed; the spatial upsampler had finished its steps: nothing to train (no trainer started), no new
    # registered version.
    sets = ["stages.color_upsampler.train.max_steps=20",
            "stages.colorizer.train.max_steps=40", "stages.colorizer.model.overrides.hidden_size=64",
            "stages.colorizer.train.max_failures=0"]
    command = f"python -m pipelines.train {cluster_flow.job_file} " + " ".join(f"--set {shlex.quote(s)}" for s in sets)
    command += "; echo exit=$?"
    client = mlflow_server.client()
    name, spatial = NAMES["color_upsampler"], NAMES["spatial_upsampler"]
    before = {v.version for v in client.search_model_versions(f"name = '{name}'")}  # other tests register it too
    spatial_before = {v.version for v in client.search_model_versions(f"name = '{spatial}'")}
    spatial_started = submission_runs(mlflow_server)[2]["spatial_upsampler"].data.tags["coltran.attempt_started_at"]
    logs, seconds = _submit(ray_pool_cluster, command, cluster_flow.root / "resubmission.log")
    print(f"re-submission: {seconds:.1f} s")
    assert "exit=1" in logs and "stage(s) colorizer failed" in logs and "CheckpointError" in logs
    assert "stage color_upsampler: ok at step 20" in logs
    assert f"stage spatial_upsampler: ok at step {PLAN['spatial_upsampler'][2]}, registered version " \
           f"{cluster_flow.versions['spatial_upsampler']}" in logs
    client, parent, runs, children = submission_runs(mlflow_server)
    assert len(children) == 3
    assert {v.version for v in client.search_model_versions(f"name = '{spatial}'")} == spatial_before
    assert runs["spatial_upsampler"].data.tags["coltran.final_step"] == str(PLAN["spatial_upsampler"][2])
    # finished: exported and registered again (the same version) without a trainer, so no worker started for it
    steps = PLAN["spatial_upsampler"][2]
    assert f"stage spatial_upsampler: its run is at step {steps} of max_steps {steps}, nothing to train" in logs
    assert runs["spatial_upsampler"].data.tags["coltran.attempt_started_at"] == spatial_started
    up = runs["color_upsampler"]
    assert up.data.tags["coltran.restored_from_step"] == "16" and up.data.tags["coltran.final_step"] == "20"
    assert _history(client, up, "loss")[-1][0] == 20
    assert runs["colorizer"].info.status == "FAILED" and parent.info.status == "FAILED"
    assert parent.data.tags["coltran.status.colorizer"] == "failed"
    new = {v.version for v in client.search_model_versions(f"name = '{name}'")} - before
    assert len(new) == 1, f"the re-submission registered {sorted(new)} of {name}"
    assert client.get_model_version_by_alias(name, "candidate").version == new.pop()


@pytest.mark.ray
def test_small_training_splits_are_materialised_once(cluster_flow, ray_pool_driver, s3_env):
    rows = cluster_flow.read_table(f"{cluster_flow.dataset}/train", columns=["key"]).num_rows
    cached = open_train_dataset(cluster_flow.dataset, "spatial_upsampler", "train", cache_below_mb=512)
    assert isinstance(cached, MaterializedDataset) and cached.count() == rows
    assert cached.columns() == ["gray_256", "rgb_256", "rgb_64"]
    per_row_mb = (256 * 256 * 4 + 64 * 64 * 3) / 1e6
    streamed = open_train_dataset(cluster_flow.dataset, "spatial_upsampler", "train",
                                  cache_below_mb=per_row_mb * (rows - 1))  # one row over the limit
    assert not isinstance(streamed, MaterializedDataset) and streamed.count() == rows


# ---- Fast checks without Ray: the DDP wiring, the data position, evaluation and grids ----

def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # two ranks on a small machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.2:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(preset("colorizer", "test"))
    ddp = DistributedDataParallel(StageLoss(model, random_channel=False))
    optimizer = make_optimizer(model.parameters())
    grads = []
    for step in range(3):
        loss, _ = ddp(_batch(seed=10 * step + rank, size=2))
        optimizer.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    spread = replica_spread(model, world)
    torch.save({"weights": model.state_dict(), "grads": grads[0], "spread": spread}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _batch(seed: int, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (size, 64, 64, 3), generator=g, dtype=torch.uint8)
    return {"rgb_64": rgb, "gray_64": rgb_to_gray(rgb)}


def test_ddp_through_the_loss_wrapper_syncs_gradients_and_keeps_replicas_identical(tmp_path):
    port = free_port()
    torch.multiprocessing.spawn(_ddp_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), f"replicas differ at {name}"
    assert ranks[0]["spread"] == ranks[1]["spread"] == 0.0
    # The synced gradient is the gradient of the mean loss over both ranks' batches (one process, 4 images).
    torch.manual_seed(0)
    model = build_model(preset("colorizer", "test"))
    both = {k: torch.cat([_batch(0, 2)[k], _batch(1, 2)[k]]) for k in ("rgb_64", "gray_64")}
    model.loss(both)[0].backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ranks[0]["grads"][name], p.grad, rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    own = build_model(preset("colorizer", "test"))  # rank 0's data alone gives other gradients
    own.loss(_batch(0, 2))[0].backward()
    assert not torch.allclose(own.final_dense.weight.grad, ranks[0]["grads"]["final_dense.weight"])


class _Shard:
    """Stands in for a Ray DataIterator: `batches` numbered batches per epoch, recording each pass."""

    def __init__(self, batches: int):
        self.batches, self.passes = batches, []

    def iter_torch_batches(self, *, batch_size, drop_last, device, local_shuffle_buffer_size, local_shuffle_seed):
        self.passes.append(local_shuffle_seed)
        return iter([{"i": torch.tensor([k])} for k in range(self.batches)])


def test_data_position_counts_epochs_and_resume_skips_consumed_batches():
    shard, position = _Shard(3), DataPosition()
    stream = train_batches(shard, 1, position, seed=5, device=torch.device("cpu"))
    seen = [int(next(stream)["i"]) for _ in range(7)]
    assert seen == [0, 1, 2, 0, 1, 2, 0] and (position.epoch, position.batch) == (2, 1)
    assert shard.passes == [500015, 500016, 500017]  # a new shuffle seed per epoch
    resumed, again = DataPosition(epoch=2, batch=1), _Shard(3)
    stream = train_batches(again, 1, resumed, seed=5, device=torch.device("cpu"))
    assert [int(next(stream)["i"]) for _ in range(3)] == [1, 2, 0]  # epoch 2's batch 0 was consumed before
    assert again.passes == [500017, 500018] and (resumed.epoch, resumed.batch) == (3, 1)
    with pytest.raises(RuntimeError, match="gave no batch of 1 rows"):
        next(train_batches(_Shard(0), 1, DataPosition(), seed=0, device=torch.device("cpu")))


def test_a_finished_run_of_another_model_config_is_not_exported(tmp_path):
    """A re-submission exports a finished stage's latest checkpoint without a trainer (driver.finished_result):
    one saved with another model config than the job's is refused, as a trainer's restore refuses it."""
    from ray.train import Checkpoint

    from coltran.checkpoint import CheckpointError, save_checkpoint
    from pipelines.train.config import job_from_dict
    from pipelines.train.driver import export_stage

    model = build_model(preset("colorizer", "test"))
    source = save_checkpoint(tmp_path / "ray-checkpoint", model, ema_state=EMA(model).state_dict(),
                             optimizer=make_optimizer(model.parameters(), 1e-3), step=8,
                             trainer_state={"data": {"epoch": 1, "batch": 0}, "rng": [], "world_size": 1})
    job = {"run_name": "r", "storage_path": str(tmp_path / "runs"), "dataset": str(tmp_path / "data"),
           "stages": {"colorizer": {"model": {"preset": "test"}}}}
    assert export_stage(job_from_dict(job), "colorizer", Checkpoint.from_directory(str(source)), "run-id",
                        tmp_path / "same") == 8
    job["stages"]["colorizer"]["model"]["overrides"] = {"hidden_size": 64}
    with pytest.raises(CheckpointError, match="different config: hidden_size"):
        export_stage(job_from_dict(job), "colorizer", Checkpoint.from_directory(str(source)), "run-id",
                     tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("stage, side", [("colorizer", 64), ("color_upsampler", 64), ("spatial_upsampler", 256)])
def test_evaluation_uses_ema_weights_and_grids_stack_input_output_truth(stage, side):
    torch.manual_seed(0)
    model = build_model(preset(stage, "test"))
    ema = EMA(model, decay=0.5)
    images = 1 if stage == "spatial_upsampler" else 2  # 256x256 x 3 channels is slow on a CPU
    rgb = _batch(3, images)["rgb_64"]
    batch = {"rgb_64": rgb, "gray_64": rgb_to_gray(rgb)}
    if stage == "spatial_upsampler":
        batch = {"rgb_64": rgb, "rgb_256": upsample_4x(rgb), "gray_256": rgb_to_gray(upsample_4x(rgb))}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)  # raw weights move away from the EMA shadow
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = evaluate(model, ema, [batch], contextlib.nullcontext)
    with ema.swapped_into(model):
        expected = float(model.loss(batch, random_channel=False)[1]["loss"])
    assert metrics["eval/bits_per_dim"] == pytest.approx(expected)
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items()) and model.training
    grid = sample_grid(model, ema, batch, 2, contextlib.nullcontext)
    assert grid.shape == (3 * side, images * side, 3) and grid.dtype == np.uint8
    truth = batch["rgb_256" if side == 256 else "rgb_64"]
    assert np.array_equal(grid[2 * side:, :side], truth[0].numpy())
