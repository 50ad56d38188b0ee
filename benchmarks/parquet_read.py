"""Reading a preprocessed split into Ray Data: the product's reader (`pipelines.io.parquet.read_parquet`, Ray
Data's V1 Parquet reader) against Ray Data 2.60's default `ray.data.read_parquet` (DataSourceV2, which lists
the files on a pool of FooterReader actors), alternated in the same run on one local Ray; prints the time of
each read (first and warm) and the ratio.

    python benchmarks/parquet_read.py [--images 64] [--cpus 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="generated photos to preprocess")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    import ray.data

    from pipelines.demo.photos import generate_dataset
    from pipelines.io.parquet import read_parquet
    from pipelines.preprocess.job import PreprocessSettings, run_preprocess

    root = Path(tempfile.mkdtemp(prefix="parquet-bench-"))
    generate_dataset(root / "photos", per_class=max(1, args.images // 4))
    ray.init(_node_ip_address="127.0.0.2", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=300_000_000)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        manifest = run_preprocess(PreprocessSettings(sources=[str(root / "photos" / "train")], dest=str(root / "data"),
                                                     heldout_fraction=0.1, min_rows_per_file=32))
        split, columns = str(root / "data" / "train"), ["gray_64", "rgb_64"]
        readers = {"product (V1)": lambda: read_parquet(split, None, columns=columns),
                   "ray default (V2)": lambda: ray.data.read_parquet(split).select_columns(columns)}
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.repeats):
            for name, read in readers.items():
                start = time.perf_counter()
                rows = read().materialize().count()
                times[name].append(time.perf_counter() - start)
                assert rows == manifest["splits"]["train"]["rows"], (name, rows)
        print(f"{manifest['splits']['train']['rows']} rows, {args.cpus} Ray CPUs, materialise once per read")
        for name, t in times.items():
            print(f"{name:18s} first {t[0]:.2f} s, warm best {min(t[1:] or t):.2f} s")
        product, default = times["product (V1)"], times["ray default (V2)"]
        print(f"ray default / product: first {default[0] / product[0]:.2f}x, "
              f"warm {min(default[1:] or default) / min(product[1:] or product):.2f}x")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
