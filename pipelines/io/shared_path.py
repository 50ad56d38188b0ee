"""Is an output path the same place on every node? Jobs whose tasks write under a path (preprocessing DEST, batch
OUT) ask before doing any work: on a cluster of machines that share no disk, a local path would scatter the
files over the nodes that wrote them and the driver would see only its own share. Object storage (`s3://`, any
URI with a scheme) is shared by definition; a local path is checked the way Ray Train checks its storage path:
the driver writes a marker there and a task pinned to every alive node looks for it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

CHECK_TIMEOUT_S = 120.0


class SharedPathError(RuntimeError):
    """A local output path that some nodes of the cluster cannot see."""


def is_local_path(uri: str) -> bool:
    parsed = urlparse(uri)
    return len(parsed.scheme) <= 1 or parsed.scheme == "file"  # one letter: a Windows drive


@ray.remote(num_cpus=0, max_retries=0)
def _sees(marker: str, token: str) -> bool:
    try:
        return Path(marker).read_text() == token
    except OSError:
        return False


def _node_name(node: dict) -> str:
    labels = node.get("Labels") or {}
    pool = f" (pool={labels['pool']})" if "pool" in labels else ""
    return f"{node['NodeID'][:12]} at {node.get('NodeManagerAddress', '?')}{pool}"


def _alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def _on_every_node(nodes: list[dict], task, *args) -> dict[str, Any]:
    """node id -> what the remote function `task` returned when run pinned to that node."""
    checks = {node["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote(*args) for node in nodes}
    return dict(zip(checks, ray.get(list(checks.values()), timeout=CHECK_TIMEOUT_S), strict=True))


def require_shared_path(uri: str, what: str) -> None:
    """Raise SharedPathError when `uri` is a local path that not every alive node of the connected Ray cluster
    sees; a one-node cluster (a laptop) and URIs with a scheme pass at once. Creates the directory."""
    if not is_local_path(uri):
        return
    nodes = _alive_nodes()
    if len(nodes) <= 1:
        return
    folder = Path(urlparse(uri).path if uri.startswith("file:") else uri).expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    marker = folder / f".coltran-shared-check-{os.getpid()}-{token}"
    marker.write_text(token)
    try:
        seen = _on_every_node(nodes, _sees, str(marker), token)
    finally:
        marker.unlink(missing_ok=True)
    blind = [_node_name(node) for node in nodes if not seen[node["NodeID"]]]
    if blind:
        raise SharedPathError(
            f"{what} {uri} is a local path that {len(blind)} of the cluster's {len(nodes)} nodes do not see "
            f"({'; '.join(blind)}): the files each node writes there would stay on that node's disk. Use an "
            "s3:// prefix (or another object store URI), or a path on a filesystem mounted on every node "
            "(NFS, EFS, Lustre...).")


@ray.remote(num_cpus=0, max_retries=0)
def _missing(folders: list[str]) -> list[str]:
    return [folder for folder in folders if not Path(folder).is_dir()]


def require_on_every_node(folders: list[str], what: str, advice: str) -> None:
    """Raise SharedPathError when a local input folder (one that jobs read and never write, so no marker can be
    written there) is missing on some alive node of the connected cluster; a one-node cluster passes at once."""
    folders = [str(Path(f).expanduser().absolute()) for f in folders if is_local_path(str(f))]
    nodes = _alive_nodes()
    if not folders or len(nodes) <= 1:
        return
    missing = _on_every_node(nodes, _missing, folders)
    blind = [f"{_node_name(node)} lacks {', '.join(missing[node['NodeID']])}" for node in nodes
             if missing[node["NodeID"]]]
    if blind:
        raise SharedPathError(f"{what} is a local path that {len(blind)} of the cluster's {len(nodes)} nodes do not "
                              f"have ({'; '.join(blind)}). {advice}")


def require_shared_tracking_uri(uri: str) -> None:
    """Raise SharedPathError when the MLflow store `uri` is a folder or SQLite file that not every node sees:
    workers on the other nodes would log into stores of their own, empty to everyone else."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        folder = str(Path(uri.removeprefix("sqlite:///")).expanduser().absolute().parent)
    elif is_local_path(uri):
        folder = uri
    else:
        return  # a tracking server (http(s)://, databricks, ...) is reached over the network from every node
    try:
        require_shared_path(folder, f"the MLflow store of {uri}:")
    except SharedPathError as err:
        raise SharedPathError(f"{err} Or better, point the job's tracking URI (or MLFLOW_TRACKING_URI) at an MLflow "
                              "tracking server (http://...) that every node can reach.") from None
