"""The per-worker training loop of one stage on Ray Train V2 (reference sec. 5): RMSprop, EMA updated every
step, bf16 autocast on CUDA only, upsamplers on one random channel per example, DDP across workers, periodic
held-out evaluation with EMA and raw weights, checkpoints through `ray.train.report`; rank 0 logs to MLflow."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from coltran.models import build_model, count_parameters
from coltran.optim import EMA, make_optimizer
from pipelines.io.s3 import resolve_path
from pipelines.tracking.runs import RunLogger
from pipelines.train.config import TrainSpec, job_from_dict
from pipelines.train.data import epoch_batches, eval_batches, train_batches
from pipelines.train.evaluation import evaluate, sample_grid
from pipelines.train.state import TrainState, replica_spread, restore, save_and_report

FAULT_ENV = "COLTRAN_TEST_KILL_AT"  # test only: "<stage>:<step>" kills rank 0 once (first attempt) at that step


class StageLoss(nn.Module):
    """The stage's `loss` as `forward`, so that it runs through DDP's forward and gradients are all-reduced."""

    def __init__(self, model: nn.Module, random_channel: bool):
        super().__init__()
        self.model, self.random_channel = model, random_channel

    def forward(self, batch: dict, generator: torch.Generator | None = None):
        return self.model.loss(batch, random_channel=self.random_channel, generator=generator)


class _Window:
    """Per-step metrics summed between two log steps (tensors, so CUDA is not synchronised every step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.data_s, self.start = 0, 0.0, time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], data_s: float) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.steps, self.data_s = self.steps + 1, self.data_s + data_s

    def reduce(self, world: int, device: torch.device, flag: bool) -> tuple[dict[str, float], bool]:
        """Window means averaged over ranks, and whether `flag` is set on any rank (one all-reduce)."""
        keys = sorted(self.sums)
        values = torch.stack([torch.as_tensor(self.sums[k], device=device) for k in keys] +
                             [torch.tensor(float(flag), device=device)])
        if world > 1:
            dist.all_reduce(values)  # sums over ranks; the flag's sum is > 0 when any rank set it
        means = values[:-1] / (world * self.steps)
        return dict(zip(keys, means.tolist(), strict=True)), bool(values[-1].item() > 0)


def train_loop(config: dict) -> None:
    """Ray Train entry point. `config`: {"job": job dict, "stage", "mlflow_run_id", "tracking_uri"}."""
    job, stage = job_from_dict(config["job"]), config["stage"]
    spec = job.stage(stage)
    model_cfg = spec.model_config(stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives on objects use the current device
    torch.manual_seed(spec.train.seed)  # the same initial weights on every rank
    model = build_model(model_cfg).to(device)
    state = initial_state(model, spec.train, rank)
    restore(state, model_cfg, rank=rank, world=world)
    ddp = ray.train.torch.prepare_model(StageLoss(model, random_channel=stage != "colorizer"))
    logger = RunLogger(config["mlflow_run_id"], config["tracking_uri"]) if rank == 0 else None
    _start_tags(logger, state, world, device)
    per_worker = spec.train.batch_size // world
    evals = []
    if rank == 0 and spec.train.eval_every_steps:
        evals = eval_batches(job.dataset, job.eval_split, stage, spec.train.eval_batches * per_worker, per_worker)
    loop = _Loop(job, stage, state, ddp, logger, evals, rank, world, device, config["mlflow_run_id"])
    loop.run(ray.train.get_dataset_shard("train"), per_worker)
    if logger is not None:
        logger.tags({"coltran.train_finished_at": time.time(), "coltran.final_step": state.step})


def initial_state(model: nn.Module, train: TrainSpec, rank: int) -> TrainState:
    """Step-0 state: EMA from the initial weights (warming up unless `train.ema_warmup` is false), RMSprop, and
    the rank's generator of upsampler channels."""
    return TrainState(model=model, ema=EMA(model, train.ema_decay, warmup=train.ema_warmup),
                      optimizer=make_optimizer(model.parameters(), train.lr),
                      generator=torch.Generator().manual_seed(train.seed * 7919 + rank + 1))


def _start_tags(logger: RunLogger | None, state: TrainState, world: int, device: torch.device) -> None:
    context = ray.get_runtime_context()
    node = {"node_id": context.get_node_id(), "labels": dict(context.get_node_labels()), "pid": os.getpid()}
    nodes = [node] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(nodes, node)
    if logger is not None:
        logger.tags({"coltran.worker_nodes": json.dumps(nodes), "coltran.world_size": world,
                     "coltran.device": str(device), "coltran.num_parameters": count_parameters(state.model),
                     "coltran.attempt_started_at": time.time(),
                     "coltran.restored_from_step": state.restored_from if state.restored_from is not None else ""})


class _Loop:
    """The step loop: log / evaluate / checkpoint on their intervals; the final step always checkpoints."""

    def __init__(self, job, stage, state, ddp, logger, evals, rank, world, device, run_id):
        self.job, self.stage, self.state, self.ddp, self.logger = job, stage, state, ddp, logger
        self.train = job.stage(stage).train
        self.evals, self.rank, self.world, self.device = evals, rank, world, device
        self.meta = {"run_name": job.run_name, "mlflow_run_id": run_id}
        self.saved_step, self.saved_at = state.step, time.monotonic()

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # exact fp32 on CPU

    def run(self, shard, per_worker: int) -> None:
        state, t = self.state, self.train
        if state.step < t.max_steps:
            per_epoch = None
            if state.position.batch:  # resuming mid-epoch: its length lets the skipped batches go unread
                per_epoch = epoch_batches(self.job.dataset, self.job.train_split, self.world, per_worker)
            batches = train_batches(shard, per_worker, state.position, t.seed + self.rank, self.device, per_epoch)
            window = _Window()
            while state.step < t.max_steps:
                self._maybe_fault()
                tic = time.perf_counter()
                batch = next(batches)
                waited = time.perf_counter() - tic  # before the step: data_wait_s is the wait alone
                window.add(self._step(batch), waited)
                window = self._after_step(window)

    def _step(self, batch: dict) -> dict:
        state = self.state
        with self.autocast():
            loss, metrics = self.ddp(batch, state.generator)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.ema.update(state.model)
        state.step += 1
        return metrics

    def _after_step(self, window: _Window) -> _Window:
        step, t, last = self.state.step, self.train, self.state.step == self.train.max_steps
        time_due = t.checkpoint_every_seconds > 0 and time.monotonic() - self.saved_at >= t.checkpoint_every_seconds
        checkpoint = last or (t.checkpoint_every_steps > 0 and step % t.checkpoint_every_steps == 0)
        if step % t.log_every_steps == 0 or last:
            means, time_due = window.reduce(self.world, self.device, time_due)
            self._log(means, window)
            window, checkpoint = _Window(), checkpoint or time_due
        metrics = {}
        if t.eval_every_steps and (step % t.eval_every_steps == 0 or last) and self.rank == 0:
            metrics = self._evaluate()
        if checkpoint:
            self._checkpoint(metrics)
        return window

    def _log(self, means: dict[str, float], window: _Window) -> None:
        if self.logger is None:
            return
        seconds = time.perf_counter() - window.start
        means.update(images_per_s=self.train.batch_size * window.steps / seconds,
                     step_time_s=seconds / window.steps, data_wait_s=window.data_s / window.steps,
                     wallclock_s=time.time())
        self.logger.metrics(means, self.state.step)

    def _evaluate(self) -> dict:
        state, tic = self.state, time.perf_counter()
        metrics = evaluate(state.model, state.ema, self.evals, self.autocast)
        if self.train.sample_images and self.evals:
            grid = sample_grid(state.model, state.ema, self.evals[0], self.train.sample_images, self.autocast)
            self.logger.image(grid, key="samples", step=state.step)
        metrics["eval/seconds"] = time.perf_counter() - tic
        self.logger.metrics(metrics, state.step)
        return metrics

    def _checkpoint(self, metrics: dict) -> None:
        spread = replica_spread(self.state.model, self.world)
        metrics = {**metrics, "step": self.state.step, "ddp/replica_spread": spread}
        save_and_report(self.state, metrics, rank=self.rank, world=self.world, meta=self.meta)
        if self.logger is not None:
            self.logger.metrics({"ddp/replica_spread": spread}, self.state.step)
        self.saved_step, self.saved_at = self.state.step, time.monotonic()

    def _maybe_fault(self) -> None:
        """Test hook: SIGKILL rank 0 at step N of the first attempt (a marker in the run storage says done)."""
        target = os.environ.get(FAULT_ENV, "")
        stage, _, step = target.partition(":")
        if self.rank != 0 or stage != self.stage or not step.isdigit() or int(step) != self.state.step:
            return
        run_dir = f"{self.job.storage_path}/{self.job.stage_run_name(self.stage)}"
        fs, marker = resolve_path(f"{run_dir}.fault-injected")
        if fs.get_file_info(marker).type != pafs.FileType.NotFound:
            return
        _wait_until_registered(run_dir, self.saved_step)
        with fs.open_output_stream(marker) as out:
            out.write(b"killed at step %d\n" % self.state.step)
        os.kill(os.getpid(), signal.SIGKILL)


def _wait_until_registered(run_dir: str, step: int, timeout: float = 120.0) -> None:
    """Ray Train registers a reported checkpoint when its controller next polls the workers (every ~2 s); a
    worker killed before that loses it. The fault hook waits for the registration (Ray's snapshot file) so
    that the kill tests resumption rather than that race."""
    fs, path = resolve_path(f"{run_dir}/checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with fs.open_input_stream(path) as f:
                latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            latest = {}
        if (latest.get("metrics") or {}).get("step") == step:
            return
        time.sleep(0.5)
