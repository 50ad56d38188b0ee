"""Consistency of cluster/: the launcher YAML against the schema the installed ray ships, the KubeRay manifests'
worker groups against the pools that jobs/*.yaml pin work to, and the entrypoints and import paths they name."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = {name: CLUSTER / "kuberay" / f"{name}.yaml" for name in ("raycluster", "rayjob", "rayservice")}
IMAGE_ROOT = "/home/ray/coltran"  # where cluster/Dockerfile and the launcher put this repository
POOLS = {"cpu", "colorizer", "color_upsampler", "spatial_upsampler"}
GPU_POOLS = POOLS - {"cpu"}
REQUIRED_JOB_FILES = ("train_all.yaml", "serve.yaml")


def load(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return yaml.safe_load(path.read_text())


def pools_named(node: Any) -> set[str]:
    """Every pool a job file pins work to: the string value of any `pool` key, at any depth (this covers
    `scaling: {pool: ...}` and `label_selector: {pool: ...}` alike)."""
    if isinstance(node, dict):
        found = {v for k, v in node.items() if k == "pool" and isinstance(v, str)}
        return found.union(*(pools_named(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(pools_named(v) for v in node))
    return set()


def scalings(node: Any) -> list[dict]:
    """Every mapping that asks for workers in a named pool (`pool` plus cpus_per_worker / gpus_per_worker);
    `pool: null` (run anywhere, as local job files do) pins nothing."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("pool"), str) and {"cpus_per_worker", "gpus_per_worker"} & set(node):
            found.append(node)
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            found += scalings(item)
    return found


def job_files_with_pools() -> dict[str, set[str]]:
    named = {path.name: pools_named(yaml.safe_load(path.read_text())) for path in sorted((ROOT / "jobs").glob("*.yaml"))}
    return {name: pools for name, pools in named.items() if pools}


def launcher_pools() -> dict[str, dict]:
    """pool label -> node type of cluster/ray-cluster.yaml."""
    types = load(CLUSTER / "ray-cluster.yaml")["available_node_types"]
    return {t["labels"]["pool"]: t for t in types.values() if "pool" in t.get("labels", {})}


def cluster_spec(name: str) -> dict:
    spec = load(KUBERAY[name])["spec"]
    return {"raycluster": spec, "rayjob": spec.get("rayClusterSpec"),
            "rayservice": spec.get("rayClusterConfig")}[name]


def kuberay_pools(name: str) -> dict[str, dict]:
    """pool label -> worker group of a KubeRay manifest's cluster spec."""
    groups = cluster_spec(name)["workerGroupSpecs"]
    return {g["labels"]["pool"]: g for g in groups if "pool" in g.get("labels", {})}


def pool_capacity() -> dict[str, dict[str, dict[str, float]]]:
    """cluster file -> pool -> Ray resources of one node of that pool."""
    out = {"ray-cluster.yaml": {p: {k: float(v) for k, v in t["resources"].items()}
                                for p, t in launcher_pools().items()}}
    for name in KUBERAY:
        out[f"kuberay/{name}.yaml"] = {p: {k: float(v) for k, v in g["resources"].items()}
                                       for p, g in kuberay_pools(name).items()}
    return out


def test_launcher_config_validates_against_installed_ray_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "ray-cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(config)
    validate_config(prepare_config(copy.deepcopy(config)))  # ray's own checks on top of the schema


def test_launcher_node_types_are_the_pools():
    config = load(CLUSTER / "ray-cluster.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "labels" not in head, "the head runs no training or tasks"
    pools = launcher_pools()
    assert set(pools) == POOLS and len(config["available_node_types"]) == len(POOLS) + 1
    for pool, node_type in pools.items():
        gpus = node_type["resources"].get("GPU", 0)
        assert (gpus > 0) == (pool in GPU_POOLS), f"{pool}: GPU={gpus}"
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert sum(t["max_workers"] for t in pools.values()) <= config["max_workers"]
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["file_mounts"]["/home/ray/coltran"] == "." and (ROOT / "pyproject.toml").is_file()
    assert any("/home/ray/coltran" in cmd for cmd in config["setup_commands"])
    for cmd in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token" in cmd, "token authentication must be on for every node"


@pytest.mark.parametrize("name", list(KUBERAY))
def test_kuberay_manifest_worker_groups_match_the_pools(name):
    spec = cluster_spec(name)
    assert spec["rayVersion"] == ray.__version__ and spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["resources"] == {"CPU": "0"} and "labels" not in spec["headGroupSpec"]
    groups = kuberay_pools(name)
    assert set(groups) == POOLS and len(spec["workerGroupSpecs"]) == len(POOLS)
    for pool, group in groups.items():
        params = group["rayStartParams"]
        # KubeRay rejects rayStartParams 'labels', and resources given both there and in `resources`.
        assert not {"labels", "num-cpus", "num-gpus", "resources"} & set(params), f"{pool}: {params}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > 0
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert str(limits.get("nvidia.com/gpu", "0")) == group["resources"].get("GPU", "0"), pool
        assert (pool in GPU_POOLS) == (int(group["resources"].get("GPU", "0")) > 0), pool
        assert float(limits["cpu"]) >= float(group["resources"]["CPU"]), pool


def test_kuberay_images_are_the_project_image_built_by_cluster_dockerfile():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name in KUBERAY:
        spec = cluster_spec(name)
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
        assert images == {f"coltran-ray:{version}"}, f"{name}: {images}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            for source in line.split()[2:-1]:
                assert (ROOT / source).exists(), f"cluster/Dockerfile copies {source}, which is not in the repo"


def without_serve_token(spec: dict) -> dict:
    """The RayService's cluster spec less the Serve API token its cpu workers take from a secret (the one
    difference allowed: the Ingress runs there)."""
    import copy

    spec = copy.deepcopy(spec)
    for group in spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            env = [e for e in container.get("env", []) if e["name"] != "COLTRAN_SERVE_TOKEN"]
            container.pop("env", None)
            if env:
                container["env"] = env
    return spec


def test_rayjob_and_rayservice_embed_the_raycluster_spec():
    assert cluster_spec("rayjob") == cluster_spec("raycluster")
    assert without_serve_token(cluster_spec("rayservice")) == cluster_spec("raycluster")


def runnable_module_file(module: str) -> Path | None:
    """The file `python -m module` runs from this repository (a module, or a package's __main__), or None."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations is not None:
        spec = importlib.util.find_spec(f"{module}.__main__")
    if spec is None or spec.origin is None or not Path(spec.origin).is_relative_to(ROOT):
        return None
    return Path(spec.origin)


def test_rayjob_entrypoint_names_an_existing_module_and_job_file():
    argv = shlex.split(load(KUBERAY["rayjob"])["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], f"expected `python -m <module> <job file>`, got {argv}"
    assert runnable_module_file(argv[2]), f"RayJob runs `python -m {argv[2]}`, which this repository does not have"
    job_file = argv[3]
    assert job_file.startswith(IMAGE_ROOT + "/"), f"job file {job_file} is not under the image's {IMAGE_ROOT}"
    assert (ROOT / job_file[len(IMAGE_ROOT) + 1:]).is_file(), f"RayJob names {job_file}, missing in this repo"


def test_job_files_local_paths_are_mounted_in_every_kuberay_pod():
    """Absolute paths in the pinned job files (models_dir: /mnt/shared/...) must be on a volume of every pod."""
    paths = [v for name in job_files_with_pools() for v in strings(yaml.safe_load((ROOT / "jobs" / name).read_text()))
             if v.startswith("/mnt/")]
    for name in KUBERAY:
        spec = cluster_spec(name)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            mounts = [m["mountPath"] for m in group["template"]["spec"]["containers"][0].get("volumeMounts", [])]
            for path in paths:
                assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (
                    f"{name}: group {group.get('groupName', 'head')} does not mount {path} (mounts {mounts})")


def strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def serve_config(name: str) -> dict:
    return yaml.safe_load(load(KUBERAY[name])["spec"]["serveConfigV2"])


def built_deployments(app: dict) -> list[str]:
    """Deployment names of the application that `import_path` builds from `args` (nothing is deployed)."""
    import importlib

    from ray.serve._private.build_app import build_app

    module, attribute = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attribute)
    return [d.name for d in build_app(builder(app.get("args", {})), name=app["name"]).deployments]


def test_rayservice_serve_config_builds_the_app_it_configures():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config("rayservice")
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        module = app["import_path"].split(":")[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{app['import_path']}: module missing"
        configured = {d["name"] for d in app["deployments"]}
        assert configured == set(built_deployments(app)), "serveConfigV2 deployments differ from the app's"


def deployment_pools(app: dict) -> dict[str, str]:
    """deployment -> the pool its ray_actor_options pin it to (deployments that pin none are left out)."""
    pools = {}
    for dep in app.get("deployments", []):
        pool = dep.get("ray_actor_options", {}).get("label_selector", {}).get("pool")
        if pool is not None:
            pools[dep["name"]] = pool
    return pools


def test_rayservice_serve_config_matches_jobs_serve_yaml():
    """Same applications, import paths and routes; where jobs/serve.yaml pins a deployment to a pool, the same pool
    (a local serve.yaml may leave placement out: a single machine has no pools)."""
    ours = {app["name"]: app for app in serve_config("rayservice")["applications"]}
    theirs_file = load(ROOT / "jobs" / "serve.yaml")
    assert "applications" in theirs_file, "jobs/serve.yaml should be a Serve config (`applications:` list)"
    theirs = {app["name"]: app for app in theirs_file["applications"]}
    assert set(ours) == set(theirs), "application names differ between rayservice.yaml and jobs/serve.yaml"
    for name, app in theirs.items():
        assert ours[name]["import_path"] == app["import_path"]
        assert ours[name].get("route_prefix", "/") == app.get("route_prefix", "/")
        pinned = deployment_pools(app)
        assert {d: deployment_pools(ours[name]).get(d) for d in pinned} == pinned, "deployment pools differ"


def test_serve_configs_ship_with_authentication_and_bounded_queues():
    """Neither jobs/serve.yaml nor the RayService turns the API token off; the RayService's Ingress pool gets the
    token from a Kubernetes secret; every deployment has a bounded queue."""
    apps = [*load(ROOT / "jobs" / "serve.yaml")["applications"], *serve_config("rayservice")["applications"]]
    for app in apps:
        auth = app["args"].get("auth", {})
        assert auth.get("disabled") is not True and (auth.get("token_env") or auth.get("token_file")), auth
        for dep in app["deployments"]:
            assert isinstance(dep.get("max_queued_requests"), int) and dep["max_queued_requests"] > 0, dep
    token_env = yaml.safe_load(load(KUBERAY["rayservice"])["spec"]["serveConfigV2"])["applications"][0]["args"][
        "auth"]["token_env"]
    groups = load(KUBERAY["rayservice"])["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    cpu = next(g for g in groups if g["labels"].get("pool") == "cpu")
    env = {e["name"]: e for c in cpu["template"]["spec"]["containers"] for e in c.get("env", [])}
    assert "secretKeyRef" in env[token_env]["valueFrom"], env


def test_required_job_files_exist_and_pin_pools():
    for name in REQUIRED_JOB_FILES:
        assert name in job_files_with_pools(), f"jobs/{name} is missing or pins nothing to a `pool`"


def test_every_pool_used_by_jobs_exists_in_every_cluster_file():
    used = job_files_with_pools()
    assert used, "no jobs/*.yaml names a `pool`; the consistency check would be empty"
    problems = [f"jobs/{job_file} uses pool(s) {sorted(named - set(pools))} that {cluster_file} lacks"
                for cluster_file, pools in pool_capacity().items()
                for job_file, named in used.items() if named - set(pools)]
    assert not problems, "\n".join(problems)


def test_job_scaling_fits_one_node_of_its_pool():
    problems = []
    for job_file in sorted((ROOT / "jobs").glob("*.yaml")):
        for scaling in scalings(yaml.safe_load(job_file.read_text())):
            for cluster_file, pools in pool_capacity().items():
                node = pools.get(scaling["pool"], {})
                for key, resource in (("cpus_per_worker", "CPU"), ("gpus_per_worker", "GPU")):
                    if scaling.get(key, 0) > node.get(resource, 0):
                        problems.append(f"jobs/{job_file.name}: {key}={scaling[key]} does not fit a "
                                        f"{scaling['pool']} node of {cluster_file} ({resource}={node.get(resource, 0)})")
    assert not problems, "\n".join(problems)
