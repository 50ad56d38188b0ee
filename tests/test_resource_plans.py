"""Resource plans of the batch and evaluation jobs (pipelines.inference.plan): the plans computed for clusters of 2, 8
and 64 CPUs with and without GPUs, with pool labels and an autoscaler, explicit settings kept, unplaceable plans
refused; then on a real local Ray started with this machine's own CPU count: the plan Ray's report gives, a
deliberately unplaceable plan refused before anything runs, and `coltran preprocess` of a folder with its defaults
(`coltran colorize` with its defaults: test_batch.py's folder run)."""

from __future__ import annotations

import json
import os
import time

import pytest

from coltran.configs import ConfigError
from pipelines.batch.settings import PoolSpec
from pipelines.batch.settings import load_settings as batch_settings
from pipelines.cli import main as coltran_main
from pipelines.evaluate.job import ASKS as EVAL_ASKS
from pipelines.evaluate.settings import POOLS, EvalSettings
from pipelines.inference.plan import (
    MIN_SHARE,
    READ_TASK_CPUS,
    STAGE_ASKS,
    Cluster,
    Node,
    PlanError,
    cluster_from_ray,
    fits,
    plan_pools,
)

CPUS = os.cpu_count() or 1


def _batch_specs(**overrides: PoolSpec) -> dict[str, PoolSpec]:
    settings = batch_settings(data={"sources": ["x"], "models": "m", "out": "o"})
    return {stage: overrides.get(stage, getattr(settings, stage)) for stage in STAGE_ASKS}


def _eval_specs(**overrides: PoolSpec) -> dict[str, PoolSpec]:
    settings = EvalSettings()
    return {name: overrides.get(name, getattr(settings, name)) for name in POOLS}


JOBS = {"colorize": (_batch_specs, STAGE_ASKS), "evaluate": (_eval_specs, EVAL_ASKS)}


def _plan(job: str, nodes, device: str = "cpu", autoscaler=(), **overrides):
    specs, asks = JOBS[job][0](**overrides), JOBS[job][1]
    return plan_pools(job, specs, asks, task_cpus=READ_TASK_CPUS, device=device,
                      cluster=Cluster(tuple(nodes), tuple(autoscaler)))


def _at_once(plan, size: str = "pool_min") -> tuple[float, float]:
    """CPUs and GPUs the pools hold with every pool at `size`."""
    pools = plan.pools.values()
    return (sum(getattr(p, size) * p.num_cpus for p in pools), sum(getattr(p, size) * p.num_gpus for p in pools))


@pytest.mark.parametrize("job", JOBS)
def test_two_cpus_share_one_cpu_between_the_pools_and_keep_one_for_a_task(job):
    plan = _plan(job, [Node(2)])
    assert plan.kind == "shared" and plan.device == "cpu"
    assert all(p.pool_min == p.pool_max == 1 and p.num_gpus == 0 and p.label is None for p in plan.pools.values())
    share = {"colorize": 0.33, "evaluate": 0.2}[job]  # the CPU left beside a 1-CPU task, split evenly, rounded down
    assert {p.num_cpus for p in plan.pools.values()} == {share}
    cpus, _ = _at_once(plan, "pool_max")
    assert cpus + READ_TASK_CPUS <= 2 and cpus >= 1 - len(plan.pools) * MIN_SHARE
    # the defaults the issue reported stuck (Inception 1, colorizer 0.5, the rest 0.25: 2.25 CPUs + a 1-CPU task)
    # are exactly what this replaces
    old = {"bits": 0.25, "colorizer": 0.5, "color_upsampler": 0.25, "spatial_upsampler": 0.25, "inception": 1}
    assert not fits([(old[n], 0.0, None) for n in POOLS], READ_TASK_CPUS, [Node(2)])
    text = plan.describe()
    assert text.startswith(f"resource plan for {job}: shared") and f"1 actor x {share} CPU" in text


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("cpus", [8, 64])
def test_larger_clusters_get_whole_cpus_and_more_actors_for_the_slow_stages(job, cpus):
    plan = _plan(job, [Node(cpus)])
    asks = JOBS[job][1]
    assert plan.kind == "dedicated"
    assert all(p.num_cpus == 1 and p.pool_min == 1 and p.num_gpus == 0 for p in plan.pools.values())
    held, _ = _at_once(plan, "pool_max")
    kept = max(READ_TASK_CPUS, cpus // 8)  # for reading, decoding and writing
    assert held == cpus - kept  # every other CPU becomes an actor
    extra = held - len(plan.pools)
    weights = sum(asks[n].weight for n in plan.pools)
    for name, pool in plan.pools.items():  # the extra actors follow the stage weights (to one actor)
        assert abs(pool.pool_max - 1 - extra * asks[name].weight / weights) <= 1, (name, pool)
    assert plan.pools["colorizer"].pool_max >= plan.pools["color_upsampler"].pool_max
    assert plan.pools["spatial_upsampler"].pool_max >= plan.pools["color_upsampler"].pool_max


@pytest.mark.parametrize("job", JOBS)
def test_one_gpu_is_shared_and_many_gpus_are_dedicated(job):
    one = _plan(job, [Node(16, 1)], device="cuda")
    assert one.kind == "shared"
    cpus, gpus = _at_once(one)
    assert gpus <= 1 and all(p.num_gpus >= 0.2 for p in one.pools.values())
    assert cpus + READ_TASK_CPUS <= 16 and all(float(p.num_cpus).is_integer() for p in one.pools.values())
    many = _plan(job, [Node(64, 8)], device="cuda")
    assert many.kind == "dedicated" and many.pools["colorizer"].num_gpus == 1
    cpus, gpus = _at_once(many, "pool_max")
    assert gpus <= 8 and gpus > 8 - 1 and cpus + READ_TASK_CPUS <= 64  # the GPUs bound the actors
    assert many.pools["colorizer"].pool_max > 1
    on_cpu = _plan(job, [Node(64, 8)], device="cpu")  # device cpu asks for no GPU even where there are some
    assert all(p.num_gpus == 0 for p in on_cpu.pools.values())
    tiny = _plan(job, [Node(2, 8)], device="cuda")  # a shared GPU share never exceeds the stage's own ask
    assert all(p.num_gpus <= EVAL_ASKS[n].gpus for n, p in tiny.pools.items())


def test_stage_pools_go_to_nodes_with_their_pool_label():
    nodes = [Node(2, pool="cpu"), *(Node(2, pool=stage) for stage in STAGE_ASKS)]  # like tests/ray_pool.py
    plan = _plan("evaluate", nodes)
    assert {n: p.label for n, p in plan.pools.items()} == {
        "bits": None, "colorizer": "colorizer", "color_upsampler": "color_upsampler",
        "spatial_upsampler": "spatial_upsampler", "inception": None}
    args = plan.pools["colorizer"].map_args()
    assert args["label_selector"] == {"pool": "colorizer"} and plan.pools["bits"].map_args()["label_selector"] == {}
    assert "on pool=colorizer" in plan.describe()
    crowded = _plan("colorize", [Node(1, pool="cpu"), Node(1, pool="colorizer"), Node(1, pool="color_upsampler"),
                                 Node(1, pool="spatial_upsampler")])
    assert crowded.kind == "dedicated"  # each stage's node holds its actor; the cpu node keeps the task's CPU
    assert all(p.pool_max == 1 for p in crowded.pools.values())


def test_tasks_go_to_the_cpu_pool_when_it_holds_them():
    pools = [Node(2, pool=stage) for stage in STAGE_ASKS]
    plan = _plan("colorize", [Node(2, pool="cpu"), *pools])
    assert plan.task_pool == "cpu" and plan.task_args() == {"label_selector": {"pool": "cpu"}}
    assert "on pool=cpu" in plan.describe().splitlines()[-1]
    assert _plan("colorize", [Node(2)]).task_args() == {}  # a laptop: no labels, no selector
    assert _plan("colorize", [Node(8), *pools]).task_pool is None  # no CPU pool: tasks go anywhere
    # a CPU pool too small for a reading task beside nothing: tasks stay unpinned rather than never placed
    small = _plan("colorize", [Node(0.5, pool="cpu"), *pools])
    assert small.task_pool is None and small.task_args() == {}



def test_pools_and_tasks_follow_the_pool_settings():
    nodes = [Node(2, pool="cpu"), Node(2, pool="gpu-a"), Node(2, pool="gpu-b")]
    plan = plan_pools("colorize", _batch_specs(colorizer=PoolSpec(pool="gpu-a"), color_upsampler=PoolSpec(pool="gpu-b"),
                                               spatial_upsampler=PoolSpec(pool="gpu-b")),
                      STAGE_ASKS, task_cpus=READ_TASK_CPUS, device="cpu", cluster=Cluster(tuple(nodes)),
                      task_pool="gpu-a")
    assert [p.label for p in plan.pools.values()] == ["gpu-a", "gpu-b", "gpu-b"] and plan.task_pool == "gpu-a"
    with pytest.raises(PlanError, match="pool=nowhere"):  # a pool the cluster lacks is refused, not waited for
        plan_pools("colorize", _batch_specs(colorizer=PoolSpec(pool="nowhere")), STAGE_ASKS,
                   task_cpus=READ_TASK_CPUS, device="cpu", cluster=Cluster(tuple(nodes)))
    with pytest.raises(PlanError, match="tasks are asked to run on pool=nowhere"):
        plan_pools("colorize", _batch_specs(), STAGE_ASKS, task_cpus=READ_TASK_CPUS, device="cpu",
                   cluster=Cluster(tuple(nodes)), task_pool="nowhere")
    with pytest.raises(ConfigError, match="write.pool"):
        batch_settings(data={"sources": ["x"], "models": "m", "out": "o", "prepare": {"pool": "cpu"},
                            "write": {"pool": "other"}})


def test_explicit_settings_are_kept_when_they_fit():
    plan = _plan("colorize", [Node(2)], colorizer=PoolSpec(num_cpus=0.5, pool_min=1, pool_max=1))
    assert plan.kind == "shared" and plan.pools["colorizer"].num_cpus == 0.5
    assert plan.pools["color_upsampler"].num_cpus == plan.pools["spatial_upsampler"].num_cpus == 0.25
    big = _plan("colorize", [Node(8)], spatial_upsampler=PoolSpec(pool_min=2, pool_max=3, num_cpus=2))
    su = big.pools["spatial_upsampler"]
    assert (su.pool_min, su.pool_max, su.num_cpus) == (2, 3, 2)
    gpu = _plan("colorize", [Node(64, 8)], device="cuda", colorizer=PoolSpec(num_gpus=0.25))
    assert gpu.pools["colorizer"].num_gpus == 0.25
    over = _plan("colorize", [Node(2)], colorizer=PoolSpec(num_cpus=0.3, pool_max=8))  # max beyond the cluster
    assert over.pools["colorizer"].pool_max == 8 and not over.max_fits and "pool_max do not all fit" in over.describe()


@pytest.mark.parametrize("overrides, culprit", [
    ({"colorizer": PoolSpec(num_cpus=3)}, "colorizer: 1 actor x 3 CPU <- larger than any node"),
    ({"inception": PoolSpec(num_cpus=1, pool_min=4)}, "inception: 4 actors x 1 CPU"),
])
def test_a_plan_that_can_never_be_placed_is_refused_naming_what_it_needs(overrides, culprit):
    with pytest.raises(PlanError) as err:
        _plan("evaluate", [Node(2)], **overrides)
    text = str(err.value)
    assert "can never be placed" in text and culprit in text
    assert "tasks: one of 1 CPU" in text and "The cluster has 1 node, 2 CPUs, 0 GPUs" in text


def test_cuda_without_gpus_and_tasks_larger_than_any_node_are_refused():
    with pytest.raises(PlanError, match=r"(?s)needs, all at once, .* GPU.*The cluster has 1 node, 8 CPUs, 0 GPUs"):
        _plan("colorize", [Node(8)], device="cuda")
    specs = _batch_specs()
    with pytest.raises(PlanError, match="tasks: one of 4 CPU .* larger than any node"):
        plan_pools("colorize", specs, STAGE_ASKS, task_cpus=4, device="cpu", cluster=Cluster((Node(2),)))


def test_an_autoscaling_cluster_is_planned_on_the_nodes_it_may_add():
    head = Node(0)  # cluster/ray-cluster.yaml: the head runs nothing, workers start at zero
    plan = _plan("evaluate", [head], device="cuda", autoscaler=[Node(30, 0, count=4), Node(10, 1, count=8)])
    assert plan.kind == "dedicated" and plan.waits_for_nodes and "waits for the autoscaler" in plan.describe()
    with pytest.raises(PlanError, match="may add up to 2 nodes, 2 CPUs"):  # even fully grown it is too small
        _plan("evaluate", [head], device="cuda", autoscaler=[Node(1, 1, count=2)])


# --- on a real local Ray with this machine's CPU count -------------------------------------------------------

@pytest.fixture(scope="module")
def ray_here(ray_local):
    assert ray_local.num_cpus == CPUS  # this machine's CPU count, no extra logical CPUs
    return ray_local


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from coltran.init_models import init_models

    return init_models(tmp_path_factory.mktemp("models"), "test")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Generated photos (pipelines.demo.photos, CC0): DIR/train/<class>/*.jpg, 3 per class."""
    from pipelines.demo.photos import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("photos"), per_class=3) / "train"


@pytest.mark.ray
def test_the_plan_is_sized_from_what_ray_reports(ray_here):
    cluster = cluster_from_ray()
    assert sum(n.cpus for n in cluster.nodes) == CPUS and cluster.autoscaler == ()
    plan = plan_pools("colorize", _batch_specs(), STAGE_ASKS, task_cpus=READ_TASK_CPUS, device="cpu", cluster=cluster)
    assert fits([(p.num_cpus, p.num_gpus, p.label) for p in plan.pools.values()], READ_TASK_CPUS, cluster.nodes)
    assert plan.kind == ("shared" if CPUS < len(plan.pools) + READ_TASK_CPUS else "dedicated")


@pytest.mark.ray
@pytest.mark.parametrize("verb", ["colorize", "evaluate"])
def test_an_unplaceable_plan_is_refused_before_anything_runs(verb, ray_here, models, photos, tmp_path, capsys):
    out = tmp_path / "out"
    pool = "colorizer" if verb == "colorize" else "inception"
    argv = [verb, str(photos), "--models", str(models), "--out", str(out), f"--set={pool}.num_cpus={CPUS + 1}"]
    if verb == "evaluate":
        argv += ["--reference", str(photos), "--num-images", "2", "--num-reference", "2", "--no-mlflow"]
    start = time.monotonic()
    code = coltran_main(argv)
    err = capsys.readouterr().err
    print(f"{verb} refused in {time.monotonic() - start:.1f} s")
    # the planner's static refusal (not a placement that timed out: that would wait, or hang until pytest's timeout)
    assert code == 2, err
    assert f"error: {verb}: this resource plan can never be placed" in err
    assert f"{pool}: 1 actor x {CPUS + 1} CPU <- larger than any node" in err
    assert f"The cluster has 1 node, {CPUS} CPUs" in err
    assert not out.exists()  # refused before anything was written


@pytest.mark.ray
def test_preprocess_with_its_defaults(ray_here, photos, tmp_path):
    dest = tmp_path / "dataset"
    start = time.monotonic()
    assert coltran_main(["preprocess", str(photos), str(dest)]) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    print(f"preprocess of 12 photos with defaults on {CPUS} CPUs: {time.monotonic() - start:.1f} s")
    assert sum(split["images"] for split in manifest["splits"].values()) == 12
    assert manifest["failures"]["count"] == 0
