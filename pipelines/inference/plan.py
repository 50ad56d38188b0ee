"""Resource plans of the Ray Data jobs that run model stages on actor pools (batch colorization, evaluation): how
many actors each pool gets and the CPUs and GPUs each actor reserves, sized from the cluster Ray reports, checked
to be placeable before anything runs (a plan that can never be placed is refused, naming what it needs), and
printed when the job starts. Pool settings left null are the plan's to choose; numbers given are kept if they fit.

Two kinds of plan. `dedicated`: every pool gets actors of a whole CPU (and on CUDA its stage's GPU share), and the
CPUs and GPUs left over become more actors for the slow stages (by weight). `shared`, when the cluster cannot give
each pool its own CPU (or GPU) beside a running task: one actor per pool, the pools splitting one node's CPUs (and
GPUs) between them, so everything is placed at once and nothing waits for resources that never come. Either way one
task of the largest task's CPU share (Ray Data's reading tasks ask for 1 CPU) always finds room beside the actors.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pipelines.batch.settings import PoolSpec

READ_TASK_CPUS = 1.0  # Ray Data's default CPU share of a task, kept by the shared reader (pipelines.io.sources) and
# read_parquet: one such task must always find a free CPU beside the actors, or the job waits forever
MIN_SHARE = 0.01  # the smallest CPU or GPU share an actor of a shared plan gets (Ray's grain is 0.0001)
TASK_SHARE = 8  # a dedicated plan keeps 1/TASK_SHARE of the CPUs (at least one task's worth) for the CPU tasks
EPS = 1e-6
TASK_POOL = "cpu"  # the node label of cluster/'s CPU pool: reading, decoding and writing tasks go there when it fits


class PlanError(RuntimeError):
    """The job's actor pools and tasks can never all be placed on this cluster (raised before anything runs)."""


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float = 0.0
    pool: str | None = None  # the node's `pool` label (cluster/README.md)
    count: int = 1  # identical nodes of this shape (an autoscaler node type: up to max_count of them)


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]  # alive now
    autoscaler: tuple[Node, ...] = ()  # node types an autoscaler may still start (their labels are not reported)

    @staticmethod
    def describe_nodes(nodes: Sequence[Node]) -> str:
        count = sum(n.count for n in nodes)
        cpus, gpus = sum(n.cpus * n.count for n in nodes), sum(n.gpus * n.count for n in nodes)
        pools = sorted({n.pool for n in nodes if n.pool})
        largest = max((n.cpus for n in nodes), default=0)
        return (f"{_count(count, 'node')}, {_count(cpus, 'CPU')}, {_count(gpus, 'GPU')}, largest node "
                f"{_count(largest, 'CPU')}" + (f", pools {pools}" if pools else ""))

    def describe(self) -> str:
        text = self.describe_nodes(self.nodes)
        if self.autoscaler:
            text += f"; the autoscaler may add up to {self.describe_nodes(self.autoscaler)}"
        return text


@dataclass(frozen=True)
class StageAsk:
    """What one dedicated actor of a stage asks for, and the stage's share of the actors a larger cluster adds."""

    gpus: float  # on CUDA
    weight: int  # slow stages weigh more
    cpus: float = 1.0


@dataclass(frozen=True)
class PoolPlan:
    pool_min: int
    pool_max: int
    num_cpus: float
    num_gpus: float  # 0 unless the job runs on CUDA
    label: str | None = None  # the node label pool=<label> its actors are pinned to

    def map_args(self) -> dict:
        """The `map_batches` arguments that place this pool's actors. An unpinned pool says so with an empty
        label selector: without one, Ray Data fuses a preceding task stage into the actors and the actors inherit
        that stage's selector (pool=cpu), landing where the plan put tasks, not actors."""
        import ray

        return {"compute": ray.data.ActorPoolStrategy(min_size=self.pool_min, max_size=self.pool_max),
                "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "label_selector": {"pool": self.label} if self.label else {}}

    def describe(self) -> str:
        count = f"{self.pool_min}" if self.pool_min == self.pool_max else f"{self.pool_min}-{self.pool_max}"
        text = f"{count} actor{'s' * (self.pool_max != 1)} x {_num(self.num_cpus)} CPU"
        text += f" + {_num(self.num_gpus)} GPU" if self.num_gpus else ""
        return text + (f" on pool={self.label}" if self.label else "")


@dataclass(frozen=True)
class ResourcePlan:
    job: str
    kind: str  # dedicated | shared
    pools: dict[str, PoolPlan]
    task_cpus: float  # the largest task's CPU share, always left free beside the actors
    device: str
    cluster: Cluster
    waits_for_nodes: bool = False  # placeable only once the autoscaler has added nodes
    max_fits: bool = True  # the pools at pool_max fit too (else Ray Data grows them only as far as CPUs allow)
    task_pool: str | None = None  # node label pool=<this> the CPU tasks are pinned to (None: any node)

    def task_args(self) -> dict:
        """The `map_batches` arguments that place the job's CPU tasks (reading, decoding, writing)."""
        return {"label_selector": {"pool": self.task_pool}} if self.task_pool else {}

    def describe(self) -> str:
        why = {"dedicated": "each pool has actors of its own CPUs",
               "shared": "too small to give each pool its own CPU beside a running task, so the pools share "
                         "one node's CPUs"}[self.kind] + (" and GPUs" if self.device == "cuda" else "")
        lines = [f"resource plan for {self.job}: {self.kind} ({why}); on {self.device}; cluster: "
                 f"{self.cluster.describe()}"]
        width = max(len(name) for name in self.pools)
        lines += [f"  {name:<{width}}  {pool.describe()}" for name, pool in self.pools.items()]
        spare = sum(n.cpus * n.count for n in self.cluster.nodes) - sum(a[0] for a in _actors(self.pools, "pool_max"))
        lines.append(f"  {'tasks':<{width}}  up to {_num(self.task_cpus)} CPU each (reading, decoding, writing); "
                     f"{_count(round(max(spare, self.task_cpus), 2), 'CPU')} left to them"
                     + (f", on pool={self.task_pool}" if self.task_pool else ""))
        if not self.max_fits:
            lines.append("  (the pools at pool_max do not all fit at once: Ray Data grows them only as far as the "
                         "cluster allows)")
        if self.waits_for_nodes:
            lines.append("  (the nodes up now cannot hold it: the job waits for the autoscaler to add nodes)")
        return "\n".join(lines)


# A dedicated actor's GPU share on CUDA (the colorizer's autoregressive loop gets a GPU of its own, the parallel
# upsamplers share one) and each stage's weight when a larger cluster adds actors: the slow stages weigh 2 (the
# colorizer on GPUs, the spatial upsampler on CPUs: see the README's batch benchmark).
STAGE_ASKS = {"colorizer": StageAsk(gpus=1.0, weight=2), "color_upsampler": StageAsk(gpus=0.5, weight=1),
              "spatial_upsampler": StageAsk(gpus=0.5, weight=2)}


def job_device(setting: str) -> str:
    """`auto` -> cuda when the cluster has GPUs, else cpu."""
    if setting != "auto":
        return setting
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def make_plan(job: str, specs: dict[str, PoolSpec], asks: dict[str, StageAsk], *, task_cpus: float,
              device: str, task_pool: str | None = None) -> ResourcePlan:
    """The plan on the connected Ray cluster, printed to stderr; PlanError at once if it can never be placed."""
    plan = plan_pools(job, specs, asks, task_cpus=task_cpus, device=device, cluster=cluster_from_ray(),
                      task_pool=task_pool)
    print(plan.describe(), file=sys.stderr, flush=True)
    return plan


def _num(value: float) -> str:
    return f"{value:g}" if value < 1e6 else "unbounded"


def _count(value: float, unit: str) -> str:
    return f"{_num(value)} {unit}" + ("" if 0 < value <= 1 else "s")


def _floor_share(value: float) -> float:
    """`value` rounded down to what Ray accepts: whole numbers above 1, else multiples of MIN_SHARE."""
    if value >= 1:
        return float(math.floor(value + EPS))
    return round(math.floor(value / MIN_SHARE + EPS) * MIN_SHARE, 2) if value > 0 else 0.0


def cluster_from_ray() -> Cluster:
    """The alive nodes Ray reports (CPUs, GPUs, `pool` label), and the autoscaler's node types if it reports any."""
    import ray

    nodes = []
    for info in ray.nodes():
        if info.get("Alive"):
            res = info.get("Resources") or {}
            nodes.append(Node(res.get("CPU", 0.0), res.get("GPU", 0.0), (info.get("Labels") or {}).get("pool")))
    return Cluster(tuple(nodes), _autoscaler_nodes())


def _autoscaler_nodes() -> tuple[Node, ...]:
    from ray._private.state import state  # what Ray Train reads for the same check (no public API yet)

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler information: plan on the nodes that are up
        return ()
    if config is None:
        return ()
    return tuple(Node(g.resources.get("CPU", 0.0), g.resources.get("GPU", 0.0), None,
                      g.max_count if g.max_count >= 0 else 10**6)
                 for g in config.node_group_configs if g.max_count)


# --- placement ------------------------------------------------------------------------------------------------

Actor = tuple[float, float, str | None]  # (CPUs, GPUs, pinned pool label)


def _actors(pools: dict[str, PoolPlan], size: str) -> list[Actor]:
    return [(p.num_cpus, p.num_gpus, p.label) for p in pools.values() for _ in range(getattr(p, size))]


def _pack(actors: list[Actor], free: list[list]) -> bool:
    """First fit, largest first; `free` rows are [CPUs, GPUs, label] and are used up."""
    for cpus, gpus, label in sorted(actors, key=lambda a: (a[1], a[0]), reverse=True):
        for row in free:
            if (label is None or row[2] == label) and row[0] >= cpus - EPS and row[1] >= gpus - EPS:
                row[0] -= cpus
                row[1] -= gpus
                break
        else:
            return False
    return True


def fits(actors: list[Actor], task_cpus: float, nodes: Sequence[Node], pinned: bool = True,
         task_pool: str | None = None) -> bool:
    """Whether all `actors` and one task of `task_cpus` can run at once (the task's CPUs kept on each node shape in
    turn, on nodes labelled `task_pool` only when given, the actors packed around it). `pinned=False` ignores
    labels (nodes an autoscaler would add)."""
    expanded = [n for n in nodes for _ in range(min(n.count, len(actors) + 1))]
    actors = actors if pinned else [(c, g, None) for c, g, _ in actors]
    shapes = {(n.cpus, n.gpus, n.pool): i for i, n in enumerate(expanded)
              if n.cpus >= task_cpus - EPS and (task_pool is None or n.pool == task_pool)}
    for at in shapes.values():
        free = [[n.cpus - (task_cpus if i == at else 0.0), n.gpus, n.pool] for i, n in enumerate(expanded)]
        if _pack(actors, free):
            return True
    return False


# --- sizing ---------------------------------------------------------------------------------------------------

def _start(specs: dict[str, PoolSpec], asks: dict[str, StageAsk], labels: set, device: str,
           cpus: dict[str, float] | None = None, gpus: dict[str, float] | None = None) -> dict[str, PoolPlan]:
    """Pools at their minimum size: explicit settings, else the dedicated asks (or the given shares)."""
    out = {}
    for name, spec in specs.items():
        ask = asks[name]
        size = spec.pool_min or 1
        cpu = spec.num_cpus if spec.num_cpus is not None else (cpus or {}).get(name, ask.cpus)
        gpu = spec.num_gpus if spec.num_gpus is not None else (gpus or {}).get(name, ask.gpus)
        label = spec.pool or (name if name in labels else None)  # an explicit pool is kept, placeable or not
        out[name] = PoolPlan(size, max(size, spec.pool_max or size), cpu, gpu if device == "cuda" else 0.0, label)
    return out


def _grow(pools: dict[str, PoolPlan], specs: dict[str, PoolSpec], asks: dict[str, StageAsk], task_cpus: float,
          nodes: Sequence[Node]) -> dict[str, PoolPlan]:
    """More actors for the pools without an explicit pool_max, by weight, while the CPUs kept for tasks stay free."""
    budget = sum(n.cpus * n.count for n in nodes) - max(task_cpus, sum(n.cpus * n.count for n in nodes) // TASK_SHARE)
    growing = [name for name, spec in specs.items() if spec.pool_max is None]
    while growing:
        name = min(growing, key=lambda s: pools[s].pool_max / asks[s].weight)
        trial = {**pools, name: replace(pools[name], pool_max=pools[name].pool_max + 1)}
        actors = _actors(trial, "pool_max")
        if sum(a[0] for a in actors) <= budget + EPS and fits(actors, task_cpus, nodes):
            pools = trial
        else:
            growing.remove(name)
    return pools


def _shares(specs: dict[str, PoolSpec], asks: dict[str, StageAsk], pools: dict[str, PoolPlan], task_cpus: float,
            device: str, nodes: Sequence[Node]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-actor CPU (and GPU) shares of the pools left to the plan: each group of pools (those pinned to one pool
    label; the rest) splits the best node it may use, after the explicit asks and, where no other node can run
    it, one task. A GPU share never exceeds the stage's dedicated ask."""
    cpus, gpus = {}, {}
    for label in {p.label for p in pools.values()}:
        names = [n for n, p in pools.items() if p.label == label]
        group = [n for n in nodes if n.pool == label] if label else \
            [n for n in nodes if n.pool not in {p.label for p in pools.values()}] or list(nodes)
        if not group:
            continue
        host = max(group, key=lambda n: (n.gpus, n.cpus) if device == "cuda" else (n.cpus, n.gpus))
        others = [n for n in nodes if n is not host or n.count > 1]
        task = 0.0 if any(n.cpus >= task_cpus - EPS for n in others) else task_cpus
        for key, out, total in (("num_cpus", cpus, host.cpus - task), ("num_gpus", gpus, host.gpus)):
            auto = [n for n in names if getattr(specs[n], key) is None]
            fixed = sum(getattr(pools[n], key) * pools[n].pool_min for n in names if n not in auto)
            share = _floor_share((total - fixed) / max(1, sum(pools[n].pool_min for n in auto)))
            out.update({n: max(min(share, asks[n].gpus) if key == "num_gpus" else share, MIN_SHARE) for n in auto})
    return cpus, gpus


def plan_pools(job: str, specs: dict[str, PoolSpec], asks: dict[str, StageAsk], *, task_cpus: float, device: str,
               cluster: Cluster, task_pool: str | None = None) -> ResourcePlan:
    """The plan for `specs` (pool settings, null = the plan's choice) on `cluster`; PlanError if it can never be
    placed there. A pool is pinned to nodes labelled pool=<its `pool` setting>, else pool=<its name> when the
    cluster has such nodes; the CPU tasks to pool=<task_pool> when given, else pool=cpu when that fits."""
    labels = {n.pool for n in cluster.nodes if n.pool}
    pools = _start(specs, asks, labels, device)
    if fits(_actors(pools, "pool_min"), task_cpus, cluster.nodes):
        kind, pools = "dedicated", _grow(pools, specs, asks, task_cpus, cluster.nodes)
    elif cluster.autoscaler and fits(_actors(pools, "pool_min"), task_cpus, cluster.nodes + cluster.autoscaler,
                                     pinned=False):
        return ResourcePlan(job, "dedicated", pools, task_cpus, device, cluster, waits_for_nodes=True)
    else:
        kind, pools = "shared", _start(specs, asks, labels, device, *_shares(specs, asks, pools, task_cpus,
                                                                             device, cluster.nodes))
        if not fits(_actors(pools, "pool_min"), task_cpus, cluster.nodes):
            raise PlanError(refusal(job, pools, task_cpus, device, cluster))
    # Tasks go to the CPU pool when the cluster has one that holds them beside the actors; never at the price of
    # a plan that could not be placed.
    if task_pool is not None:  # asked for: it must hold a task beside the actors
        if not fits(_actors(pools, "pool_min"), task_cpus, cluster.nodes, task_pool=task_pool):
            raise PlanError(f"{job}: the tasks are asked to run on pool={task_pool}, but no node labelled so can "
                            f"hold a task of {_num(task_cpus)} CPU beside the actors; the cluster has "
                            f"{cluster.describe()}. Set the tasks' pool to null (pool=cpu when it fits, else any "
                            "node) or to a pool the cluster has.")
    elif TASK_POOL in labels and fits(_actors(pools, "pool_min"), task_cpus, cluster.nodes, task_pool=TASK_POOL):
        task_pool = TASK_POOL
    return ResourcePlan(job, kind, pools, task_cpus, device, cluster, task_pool=task_pool,
                        max_fits=fits(_actors(pools, "pool_max"), task_cpus, cluster.nodes))


def refusal(job: str, pools: dict[str, PoolPlan], task_cpus: float, device: str, cluster: Cluster) -> str:
    """Why the smallest plan cannot be placed: what every pool needs at once, and what the cluster has."""
    actors = _actors(pools, "pool_min")
    cpus, gpus = sum(a[0] for a in actors) + task_cpus, sum(a[1] for a in actors)
    lines = [f"{job}: this resource plan can never be placed on the cluster, so the job would wait forever; "
             f"refused before starting. It needs, all at once, {_count(cpus, 'CPU')}" +
             (f" and {_count(gpus, 'GPU')}" if device == "cuda" else "") +
             ", each actor and task on one node:"]
    too_big = " <- larger than any node it may use"
    lines += [f"  {name}: {pool.describe()}" + ("" if fits(_actors({name: pool}, "pool_min"), 0.0, cluster.nodes)
                                                else too_big) for name, pool in pools.items()]
    lines += [f"  tasks: one of {_num(task_cpus)} CPU beside the actors (Ray Data's reading tasks ask for "
              f"{_num(READ_TASK_CPUS)})" + ("" if fits([], task_cpus, cluster.nodes) else too_big),
              f"The cluster has {cluster.describe()}.",
              "Lower the pool settings named above (e.g. --set colorizer.num_cpus=0.5, pool_min, num_gpus), set "
              "them to null to let the plan size them from the cluster, or add nodes."]
    return "\n".join(lines)
