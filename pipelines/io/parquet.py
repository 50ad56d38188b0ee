"""The one way the product reads Parquet into Ray Data (training splits, Parquet batch inputs, evaluation rows).

Ray Data 2.60 reads Parquet through its DataSourceV2 by default, which lists the files on a pool of 32
`FooterReader` actors started for every read (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, a setting of the process that
runs the listing task), placed with the SPREAD strategy whatever the read's `ray_remote_args` say. On a small
cluster that is 32 Python processes per read: materialising a 91-row training split on a 2-CPU local Ray took
30.7 s the first time and 8.2-8.7 s after while another test run shared the machine (the V1 reader: 6.7 s, then
0.4-1.0 s; on the quiet machine benchmarks/parquet_read.py measures 2-4x), and a job's three training stages
starting together waited 60 s for CPUs on the 4-node test cluster (2026-12-07). The pools also ignore the
resource plan's placement (the CPU pool for reading). The V1 reader reads the footers in its own read tasks, which
`ray_remote_args` place; it is what `RAY_DATA_USE_DATASOURCE_V2=0` selects, chosen here per read instead, so other
code in the same process keeps Ray's default."""

from __future__ import annotations

import pyarrow.fs as pafs
import ray.data


def read_parquet(location: str, filesystem: pafs.FileSystem | None, columns: list[str] | None = None,
                 ray_remote_args: dict | None = None) -> ray.data.Dataset:
    """`ray.data.read_parquet` of `location` through Ray Data's V1 Parquet reader (see the module docstring),
    with only `columns` when given; `ray_remote_args` place its tasks."""
    context = ray.data.DataContext.get_current()
    default = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet(location, filesystem=filesystem, ray_remote_args=ray_remote_args or {})
    finally:
        context.use_datasource_v2 = default
    return ds.select_columns(columns) if columns is not None else ds
