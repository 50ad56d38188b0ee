"""A worker's training state (model, EMA, optimizer, step, data position, RNG of every rank) to and from a
Ray Train checkpoint whose directory is a coltran checkpoint (coltran.checkpoint format)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from coltran.checkpoint import load_checkpoint, save_checkpoint
from coltran.configs import ModelConfig
from coltran.optim import EMA
from pipelines.train.data import DataPosition


@dataclass
class TrainState:
    model: torch.nn.Module  # the bare stage model (not the DDP wrapper)
    ema: EMA
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # draws the random channel of the upsamplers
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    restored_from: int | None = None  # step of the checkpoint this attempt started from


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def save_and_report(state: TrainState, metrics: dict, *, rank: int, world: int, meta: dict) -> None:
    """Collective: every rank calls it. Rank 0 writes the checkpoint (with every rank's RNG state) and reports
    it; the others report metrics only (Ray Train V2 waits for all ranks)."""
    rng = _gather(_rng_state(state.generator), world)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    trainer_state = {"data": {"epoch": state.position.epoch, "batch": state.position.batch}, "rng": rng,
                     "world_size": world, "ema_updates": state.ema.num_updates}
    with tempfile.TemporaryDirectory(prefix="coltran-ckpt-") as tmp:
        directory = save_checkpoint(Path(tmp) / "checkpoint", state.model, ema_state=state.ema.state_dict(),
                                    optimizer=state.optimizer, step=state.step, trainer_state=trainer_state,
                                    meta=meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


def restore(state: TrainState, config: ModelConfig, *, rank: int, world: int) -> bool:
    """Load the latest checkpoint of this run into `state` if there is one; True when restored. A checkpoint
    of a different model config is an error (coltran.checkpoint.CheckpointError), never silently mixed."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as directory:
        ckpt = load_checkpoint(directory, weights="model", expected_config=config, with_training_state=True)
    state.model.load_state_dict(ckpt.model.state_dict())
    # A checkpoint written before the count was saved averaged one EMA update per step, so its step is its
    # count (TF's rule counts the global step too): a long run resumes fully warm, a short one keeps warming up
    # rather than restarting the ramp at decay 0.1, which would throw its average away.
    state.ema.load_state_dict(ckpt.ema_state, num_updates=ckpt.trainer_state.get("ema_updates", ckpt.step))
    state.optimizer.load_state_dict(ckpt.optimizer_state)
    state.step = state.restored_from = ckpt.step
    data = ckpt.trainer_state.get("data", {})
    state.position = DataPosition(epoch=int(data.get("epoch", 0)), batch=int(data.get("batch", 0)))
    rng = ckpt.trainer_state.get("rng", [])
    if len(rng) == world:  # a different worker count keeps the seeded generators instead
        torch.set_rng_state(rng[rank]["torch"])
        state.generator.set_state(rng[rank]["generator"])
        if "cuda" in rng[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[rank]["cuda"])
    return True


def replica_spread(model: torch.nn.Module, world: int) -> float:
    """Largest difference of a weight checksum across ranks: 0.0 when DDP kept the replicas identical."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973).add_(1)
        checksum = float((flat * weights).sum())
    sums = _gather(checksum, world)
    return max(sums) - min(sums)
