"""A training worker's EMA across checkpoints: the warm-up switch reaches the EMA, the update count is saved and
restored, and a checkpoint written before counts were saved resumes with its step as the count. Data position on
resume: the batches consumed before the checkpoint are not read again (a shard that counts what it hands out)."""

from __future__ import annotations

import shutil

import pytest
import ray.train
import torch

from coltran.configs import apply_overrides, preset
from coltran.models import build_model
from pipelines.train.config import TrainSpec
from pipelines.train.data import DataPosition, epoch_batches, train_batches
from pipelines.train.state import restore, save_and_report
from pipelines.train.worker import initial_state

STAGE = "color_upsampler"


def _model():
    torch.manual_seed(0)
    return build_model(apply_overrides(preset(STAGE, "test"), {"resolution": [8, 8]}))


def _nudge(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("warmup", [True, False])
def test_initial_state_takes_the_ema_settings_from_the_job(warmup):
    model = _model()
    state = initial_state(model, TrainSpec(ema_decay=0.99, ema_warmup=warmup), rank=0)
    assert (state.ema.decay, state.ema.warmup, state.ema.num_updates) == (0.99, warmup, 0)
    assert state.ema.current_decay() == (pytest.approx(0.1) if warmup else 0.99)


@pytest.fixture
def checkpointed(tmp_path, monkeypatch):
    """A state after 3 EMA updates at step 5 (so count and step differ), saved through save_and_report."""
    model = _model()
    state = initial_state(model, TrainSpec(), rank=0)
    for seed in range(3):
        _nudge(model, seed)
        state.ema.update(model)
    state.step = 5
    reported = tmp_path / "reported"

    def report(metrics, checkpoint=None):
        shutil.copytree(checkpoint.path, reported)  # the temporary directory is gone after the call

    monkeypatch.setattr(ray.train, "report", report)
    save_and_report(state, {"step": 5}, rank=0, world=1, meta={})
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(reported)))
    return state, reported


def _resumed():
    state = initial_state(_model(), TrainSpec(), rank=0)
    _nudge(state.model, 99)  # the fresh shadow differs from the saved one
    assert restore(state, state.model.config, rank=0, world=1)
    return state


def test_restore_brings_back_the_ema_count_and_the_warmup_continues_identically(checkpointed):
    saved, _ = checkpointed
    state = _resumed()
    assert (state.step, state.ema.num_updates) == (5, 3)
    assert all(torch.equal(state.ema.shadow[n], t) for n, t in saved.ema.shadow.items())
    for s in (saved, state):
        _nudge(s.model, 7)
        s.ema.update(s.model)
    assert all(torch.equal(state.ema.shadow[n], t) for n, t in saved.ema.shadow.items())


def test_a_checkpoint_without_the_count_resumes_with_its_step_as_the_count(checkpointed):
    _, reported = checkpointed
    extras = torch.load(reported / "trainer_state.pt", weights_only=True)
    del extras["ema_updates"]  # as written before the count was saved
    torch.save(extras, reported / "trainer_state.pt")
    state = _resumed()
    assert (state.step, state.ema.num_updates) == (5, 5)
    assert state.ema.current_decay() == pytest.approx(6 / 15)


class CountingShard:
    """Stands in for a worker's Ray Data shard: every epoch hands out `per_epoch` batches, counting each one it
    reads and collates, and records whether each epoch's iterator was closed (the streaming split's signal)."""

    def __init__(self, per_epoch: int):
        self.per_epoch, self.reads, self.epochs, self.closed = per_epoch, 0, [], []

    def iter_torch_batches(self, *, local_shuffle_seed, **_):
        self.epochs.append(local_shuffle_seed)
        epoch = len(self.epochs) - 1
        self.closed.append(False)
        try:
            for i in range(self.per_epoch):
                self.reads += 1
                yield {"index": torch.tensor([epoch, i])}
        finally:
            self.closed[epoch] = True


def _batches(shard, position, per_epoch):
    return train_batches(shard, 2, position, seed=0, device=torch.device("cpu"), per_epoch=per_epoch)


def _take(batches, count):
    return [next(batches) for _ in range(count)]


def test_resume_mid_epoch_reads_only_the_batches_left_in_it():
    shard, position = CountingShard(per_epoch=10), DataPosition(epoch=3, batch=7)
    batches = _batches(shard, position, per_epoch=10)
    _take(batches, 3)  # the 3 batches epoch 3 had left
    assert shard.reads == 3 and (position.epoch, position.batch) == (3, 10)
    assert shard.epochs == [3] and shard.closed == [False]  # nothing past the epoch was asked for yet
    _take(batches, 1)  # the next batch starts epoch 4 in full
    assert shard.reads == 4 and (position.epoch, position.batch) == (4, 1)
    assert shard.epochs == [3, 4] and shard.closed == [True, False]  # epoch 3's iterator was closed early
    # the old behaviour, without the epoch's length: every consumed batch is read again and dropped
    old = CountingShard(per_epoch=10)
    _take(_batches(old, DataPosition(epoch=3, batch=7), per_epoch=None), 3)
    assert old.reads == 10


def test_resume_at_an_epoch_end_starts_the_next_epoch_without_reading():
    shard, position = CountingShard(per_epoch=4), DataPosition(epoch=1, batch=4)
    _take(_batches(shard, position, per_epoch=4), 1)
    assert shard.reads == 1 and shard.epochs == [2] and (position.epoch, position.batch) == (2, 1)


def test_a_fresh_epoch_runs_to_the_shards_end():
    shard, position = CountingShard(per_epoch=3), DataPosition()
    _take(_batches(shard, position, per_epoch=None), 5)
    assert shard.reads == 5 and (position.epoch, position.batch) == (1, 2) and shard.closed[0]


def test_epoch_length_comes_from_the_parquet_footers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "train").mkdir()
    for i, rows in enumerate((30, 23)):
        pq.write_table(pa.table({"x": list(range(rows))}), tmp_path / "train" / f"part-{i}.parquet")
    assert epoch_batches(str(tmp_path), "train", world=2, batch_size=4) == (53 // 2) // 4


@pytest.mark.ray
def test_two_shards_of_a_real_streaming_split_end_the_resumed_epoch_together(ray_local):
    """Ray Data's streaming split (equal=True, as Ray Train makes it): both ranks resume at batch 3 of 5, stop
    the epoch early, and the next epoch starts on both; nothing waits forever."""
    import threading

    import ray.data

    shards = ray.data.range(50, override_num_blocks=5).streaming_split(2, equal=True)
    positions, errors = {}, []

    def run(rank: int) -> None:
        try:
            position = DataPosition(epoch=0, batch=3)
            batches = train_batches(shards[rank], 5, position, 0, torch.device("cpu"), per_epoch=(50 // 2) // 5)
            seen = []
            for _ in range(2 + 1):
                next(batches)
                seen.append((position.epoch, position.batch))
            positions[rank] = (seen[1], seen[2])
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert positions == {rank: ((0, 5), (1, 1)) for rank in range(2)}
