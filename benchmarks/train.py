"""Training throughput per stage: this project's Ray Train loop (Ray Data shard, DDP wrapper, EMA, MLflow) against
a plain eager fp32 loop (no Ray) on the same device in the same run. CPU: `mid` presets in fp32. CUDA: `full`
presets with bf16 autocast, plus model FLOPs utilisation (FLOPs counted by torch's FlopCounterMode).

  .venv/bin/python benchmarks/train.py [--preset mid] [--stages colorizer ...] [--steps 6] [--warmup 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.flop_counter import FlopCounterMode

from coltran.configs import STAGE_NAMES, preset
from coltran.models import build_model, count_parameters
from coltran.optim import EMA, make_optimizer
from pipelines.dataset.format import TENSOR_SHAPES, tensor_array
from pipelines.train.data import STAGE_COLUMNS

# Per-device batch: CPU small enough for a 2-core machine; CUDA the per-GPU share of jobs/train_all.yaml.
BATCH = {"cpu": {"colorizer": 4, "color_upsampler": 8, "spatial_upsampler": 1},
         "cuda": {"colorizer": 28, "color_upsampler": 192, "spatial_upsampler": 8}}
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def synthetic_batch(stage: str, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 rows with the stage's columns (throughput does not depend on pixel values)."""
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, 256, (size, *TENSOR_SHAPES[name]), dtype=np.uint8) for name in STAGE_COLUMNS[stage]}


def autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(stage: str, size: str, batch: int, steps: int, warmup: int, device: torch.device,
               bf16: bool) -> dict:
    """The reference: model.loss -> backward -> RMSprop -> EMA on one in-memory batch, eager, no Ray."""
    torch.manual_seed(0)
    model = build_model(preset(stage, size)).to(device)
    optimizer, ema = make_optimizer(model.parameters()), EMA(model)
    data = {k: torch.from_numpy(v).to(device) for k, v in synthetic_batch(stage, batch).items()}
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with autocast(device, bf16):
            loss, _ = model.loss(data, random_channel=stage != "colorizer", generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model)

    flops = FlopCounterMode(display=False)
    with flops:
        step()
    for _ in range(max(warmup - 1, 0)):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - tic)
    seconds = statistics.median(times)
    return {"images_per_s": batch / seconds, "step_s": seconds, "flops": flops.get_total_flops(),
            "params": count_parameters(model)}


def write_dataset(root: Path, stage: str, rows: int) -> None:
    columns = synthetic_batch(stage, rows, seed=1)
    table = {"key": pa.array([f"synthetic/{i:06d}" for i in range(rows)])}
    table.update({name: tensor_array(list(values), TENSOR_SHAPES[name]) for name, values in columns.items()})
    for split in ("train", "heldout"):
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(table), root / split / "part-0.parquet")


def ray_loop(stage: str, size: str, batch: int, steps: int, warmup: int, device: torch.device,
             workdir: Path) -> dict:
    """One worker of this project's training job (pipelines.train) on a local Ray; per-step images/s as the
    worker logs it to MLflow (step compute plus waiting for data), median over the steps after warm-up."""
    from mlflow import MlflowClient

    from pipelines.train.config import load_job
    from pipelines.train.driver import run_job

    write_dataset(workdir / "data", stage, batch * (steps + warmup))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    train = {"batch_size": batch, "max_steps": steps + warmup, "log_every_steps": 1, "eval_every_steps": 0,
             "checkpoint_every_steps": steps + warmup, "checkpoint_every_seconds": 0, "max_failures": 0}
    stages = {s: {"enabled": s == stage} for s in STAGE_NAMES}
    stages[stage].update(model={"preset": size}, train=train,
                         scaling={"pool": None, "num_workers": 1, "use_gpu": device.type == "cuda",
                                  "cpus_per_worker": os.cpu_count() or 1})  # as many threads as plain
    # the experiment's artifacts go to the work dir (a sqlite store's default artifact root is ./mlruns)
    MlflowClient(uri).create_experiment("bench", artifact_location=(workdir / "artifacts").as_uri())
    job = load_job(data={"run_name": f"bench-{stage}", "storage_path": str(workdir / "runs"),
                         "dataset": str(workdir / "data"), "mlflow": {"tracking_uri": uri, "experiment": "bench"},
                         "stages": stages})
    outcome = run_job(job)[stage]
    if not outcome.ok:
        raise RuntimeError(f"the Ray training run of {stage} failed: {outcome.error}")
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("bench").experiment_id],
                             f"tags.`coltran.stage` = '{stage}'")[0]
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "images_per_s") if m.step > warmup]
    return {"images_per_s": statistics.median(rates), "step_s": batch / statistics.median(rates)}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="model size (default: mid on CPU, full on CUDA)")
    parser.add_argument("--stages", nargs="+", default=list(STAGE_NAMES), choices=STAGE_NAMES)
    parser.add_argument("--steps", type=int, default=6, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="only the plain loops")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.preset or ("full" if device.type == "cuda" else "mid")
    peak = peak_flops(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), preset {size}, {args.steps} timed steps after {args.warmup}")
    if not args.no_ray:
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(_node_ip_address="127.0.0.2", include_dashboard=False, object_store_memory=500_000_000,
                 num_cpus=(os.cpu_count() or 1) + 1, num_gpus=torch.cuda.device_count())  # +1: data reads
    print(f"{'stage':<18} {'loop':<14} {'batch':>5} {'images/s':>10} {'step s':>8} {'GFLOP/step':>11} {'MFU':>7}")
    for stage in args.stages:
        batch = BATCH[device.type][stage]
        results = {"plain fp32": plain_loop(stage, size, batch, args.steps, args.warmup, device, bf16=False)}
        flops = results["plain fp32"]["flops"]
        if device.type == "cuda":
            results["plain bf16"] = plain_loop(stage, size, batch, args.steps, args.warmup, device, bf16=True)
        if not args.no_ray:
            with tempfile.TemporaryDirectory(prefix=f"bench-{stage}-") as tmp:
                name = "ray bf16" if device.type == "cuda" else "ray fp32"
                results[name] = ray_loop(stage, size, batch, args.steps, args.warmup, device, Path(tmp))
        for name, r in results.items():
            mfu = f"{flops / r['step_s'] / peak:.1%}" if peak and "bf16" in name else "n/a"
            print(f"{stage:<18} {name:<14} {batch:>5} {r['images_per_s']:>10.2f} {r['step_s']:>8.3f} "
                  f"{flops / 1e9:>11.1f} {mfu:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
