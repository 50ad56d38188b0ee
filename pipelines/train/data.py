"""Training data: the preprocessed training split as a Ray Dataset whose per-worker shards become an endless
stream of torch batches that remembers its position (epoch, batch within the epoch); the fixed held-out set."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray.data
import torch

from pipelines.dataset.format import read_tensor_column
from pipelines.io.parquet import read_parquet
from pipelines.io.s3 import resolve_path

# The uint8 tensor columns each stage's `loss` reads.
STAGE_COLUMNS = {
    "colorizer": ["gray_64", "rgb_64"],
    "color_upsampler": ["gray_64", "rgb_64"],
    "spatial_upsampler": ["gray_256", "rgb_256", "rgb_64"],
}
SHUFFLE_BUFFER = 256  # rows; a local shuffle on top of the random crops made at preprocessing


COLUMN_BYTES = {"gray_64": 64 * 64, "rgb_64": 64 * 64 * 3, "gray_256": 256 * 256, "rgb_256": 256 * 256 * 3}


def open_train_dataset(root: str, stage: str, split: str, cache_below_mb: float = 0.0) -> ray.data.Dataset:
    """The training split with only the columns `stage` reads. When those columns total at most `cache_below_mb`
    MB (row count from the Parquet footers), the dataset is materialised once in the object store: otherwise
    every epoch is a new Ray Data execution that lists, opens and decodes the Parquet again, which dominates
    step time on small datasets."""
    fs, path = resolve_path(root)
    ds = read_parquet(f"{path}/{split}", fs, columns=STAGE_COLUMNS[stage])
    if cache_below_mb > 0:
        files = _parquet_files(fs, f"{path}/{split}", root, split)
        rows = pads.dataset(files, filesystem=fs, format="parquet").count_rows()
        if rows * sum(COLUMN_BYTES[c] for c in STAGE_COLUMNS[stage]) <= cache_below_mb * 1e6:
            ds = ds.materialize()
    return ds


def _parquet_files(fs: pafs.FileSystem, directory: str, root: str, split: str) -> list[str]:
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(directory, recursive=True))
                   if i.path.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {root}/{split}; expected the {split} split there")
    return files


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # batches of this epoch already consumed


def epoch_batches(root: str, split: str, world: int, batch_size: int) -> int:
    """Batches one worker's shard gives per epoch, from the Parquet footers (no row is read): Ray Train splits the
    training set with `streaming_split(world, equal=True)`, so every shard holds rows // world rows, and
    `drop_last` keeps whole batches only."""
    fs, path = resolve_path(root)
    rows = pads.dataset(_parquet_files(fs, f"{path}/{split}", root, split), filesystem=fs,
                        format="parquet").count_rows()
    return (rows // world) // batch_size


def train_batches(shard, batch_size: int, position: DataPosition, seed: int, device: torch.device,
                  per_epoch: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from a worker's shard, advancing `position` in place.

    On resume mid-epoch (`position.batch` > 0) the epoch goes on for the `per_epoch - position.batch` batches it
    had left and then ends: the shard is iterated only that far (the iterator is closed early, which Ray Data's
    streaming split supports), so the batches consumed before the checkpoint are never read, collated or copied
    again. Ray Data hands blocks to workers dynamically, so no run replays an exact sample order: what resume
    keeps is the epoch count and each epoch's length. Every rank restores the same position and holds the same
    number of rows, so all ranks end the shortened epoch at the same batch. Without `per_epoch` the consumed
    batches are read and dropped (the fallback for shards of unknown length)."""
    while True:
        skip, produced = position.batch, 0
        remaining = per_epoch - skip if per_epoch is not None and skip else None
        if remaining is not None and remaining <= 0:  # saved just after the epoch's last batch
            position.epoch, position.batch = position.epoch + 1, 0
            continue
        batches = iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                                local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                                local_shuffle_seed=seed * 100_003 + position.epoch))
        try:
            for batch in batches:
                produced += 1
                if remaining is None and produced <= skip:
                    continue
                position.batch += 1
                yield batch
                if remaining is not None and produced >= remaining:
                    break  # the rest of the epoch was consumed before the checkpoint
        finally:
            if hasattr(batches, "close"):
                batches.close()  # tells the streaming split now that this shard's epoch is over
        if produced == 0:
            raise RuntimeError(f"the training shard gave no batch of {batch_size} rows; the dataset is smaller "
                               "than one per-worker batch")
        position.epoch, position.batch = position.epoch + 1, 0


def eval_batches(root: str, split: str, stage: str, rows: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The first `rows` rows of the held-out split (files in name order), a fixed set read with plain pyarrow
    (no Ray Data execution, so every evaluation and every attempt sees the same images), as CPU torch batches."""
    fs, path = resolve_path(root)
    files = _parquet_files(fs, f"{path}/{split}", root, split)
    table = pads.dataset(files, filesystem=fs, format="parquet").head(rows, columns=STAGE_COLUMNS[stage])
    if table.num_rows == 0:
        raise RuntimeError(f"the held-out split {root}/{split} is empty; expected rows for evaluation")
    tensors = {name: torch.from_numpy(read_tensor_column(table, name)) for name in STAGE_COLUMNS[stage]}
    return [{name: t[start:start + batch_size] for name, t in tensors.items()}
            for start in range(0, table.num_rows, batch_size)]
