"""The ColTran Ray Serve application: `build_app` (import path `pipelines.serve.app:build_app`, used by
`serve run jobs/serve.yaml`, `serve deploy` and KubeRay's RayService) and the `coltran serve` verb.

The app: Ingress (FastAPI) -> Colorizer (batched) -> ColorUpsampler -> SpatialUpsampler, one deployment per
stage; see pipelines/serve/ingress.py (HTTP) and pipelines/serve/deployments.py (the models)."""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

from coltran.configs import STAGE_NAMES

APP_NAME = "coltran"
# Upsamplers' max_batch_size None: decided by each replica's device (4 on a GPU, 1 on a CPU, where batching the
# parallel upsamplers costs more than it saves; see benchmarks/serve.py).
DEFAULT_BATCH = {"colorizer": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
                 "color_upsampler": {"max_batch_size": None, "batch_wait_timeout_s": 0.01},
                 "spatial_upsampler": {"max_batch_size": None, "batch_wait_timeout_s": 0.01}}


@dataclass
class StageSettings:
    max_batch_size: int | None
    batch_wait_timeout_s: float

    def __post_init__(self):
        size = self.max_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"max_batch_size must be an integer >= 1 (or null: by device), got {size!r}")
        if not isinstance(self.batch_wait_timeout_s, int | float) or self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be a number >= 0, got {self.batch_wait_timeout_s!r}")


@dataclass
class AppSettings:
    """`args` of the application (the `args:` mapping of a Serve config file), checked strictly."""

    models: str | dict  # models directory, `models:/@<alias>`, or {stage: checkpoint dir or models:/ URI}
    tracking_uri: str | None = None  # MLflow server for models:/ URIs (default: $MLFLOW_TRACKING_URI in replicas)
    device: str | None = None  # cpu | cuda; default: cuda when the replica has a GPU
    limits: dict = field(default_factory=dict)  # max_bytes, max_pixels, ..., timeout_s (pipelines.serve.http.Limits)
    auth: dict = field(default_factory=dict)  # token_file, token_env, disabled (pipelines.serve.http.Auth)
    colorizer: dict = field(default_factory=dict)  # max_batch_size, batch_wait_timeout_s
    compile_sampler: bool = False  # torch.compile the colorizer's steps when its replica starts (docs/sampling.md)
    color_upsampler: dict = field(default_factory=dict)
    spatial_upsampler: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: dict) -> AppSettings:
        if not isinstance(args, dict):
            raise TypeError(f"application args must be a mapping, got {type(args).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(args) - set(valid))
        if unknown:
            raise ValueError(f"unknown application args {unknown}; valid keys: {valid}")
        if "models" not in args:
            raise ValueError("application args need `models`: a models directory, models:/@<alias>, or a "
                             f"mapping of {list(STAGE_NAMES)} to checkpoint directories or models:/ URIs")
        settings = cls(**args)
        settings.check()
        return settings

    def check(self) -> None:
        from pipelines.serve.http import Auth, Limits

        if isinstance(self.models, dict):
            if sorted(self.models) != sorted(STAGE_NAMES):
                raise ValueError(f"models mapping must have exactly the keys {list(STAGE_NAMES)}, "
                                 f"got {sorted(self.models)}")
        elif not isinstance(self.models, str) or not self.models:
            raise ValueError(f"models must be a directory, a models:/ URI or a mapping, got {self.models!r}")
        valid = [f.name for f in fields(Limits)]
        if not isinstance(self.limits, dict):
            raise ValueError(f"limits must be a mapping with keys {valid}, got {self.limits!r}")
        if set(self.limits) - set(valid):
            raise ValueError(f"unknown limits {sorted(set(self.limits) - set(valid))}; valid keys: {valid}")
        Limits(**self.limits)  # raises on invalid values
        valid = [f.name for f in fields(Auth)]
        if not isinstance(self.auth, dict) or set(self.auth) - set(valid):
            raise ValueError(f"auth must be a mapping with keys {valid}, got {self.auth!r}")
        Auth(**self.auth)
        if not isinstance(self.compile_sampler, bool):
            raise ValueError(f"compile_sampler must be true or false, got {self.compile_sampler!r}")
        for stage in STAGE_NAMES:
            self.stage(stage)

    def stage(self, stage: str) -> StageSettings:
        given = getattr(self, stage)
        unknown = sorted(set(given) - set(DEFAULT_BATCH[stage]))
        if unknown:
            raise ValueError(f"unknown {stage} args {unknown}; valid keys: {sorted(DEFAULT_BATCH[stage])}")
        return StageSettings(**{**DEFAULT_BATCH[stage], **given})


@functools.cache
def _refused_app_class() -> type:
    """Made on first use: importing Ray Serve takes a second, which `coltran --help` need not pay."""
    from ray.serve.exceptions import RayServeException

    class AppRefused(ValueError, RayServeException):
        """Bad application args, or models some nodes lack: Serve reports a RayServeException from the builder
        at once, where it retries any other exception three times, each in a new worker (~30 s in all on a
        small cluster) before the application shows DEPLOY_FAILED with the traceback."""

    return AppRefused


def build_app(args: dict):
    """The application graph. Nothing is loaded here: each replica loads its own stage when it starts. A refusal
    (bad args, a models directory some nodes lack) raises a ValueError that is also a RayServeException."""
    from pipelines.io.shared_path import SharedPathError
    from pipelines.serve.deployments import Colorizer, Upsampler
    from pipelines.serve.ingress import Ingress

    try:
        settings = AppSettings.from_args(dict(args))
        _require_models_on_every_node(settings.models)
    except (ValueError, SharedPathError) as err:
        raise _refused_app_class()(str(err)) from err
    common = {"models": settings.models, "device": settings.device, "tracking_uri": settings.tracking_uri}
    col = settings.stage("colorizer")
    # @serve.batch never fills a batch above the replica's max_ongoing_requests (a config file may override).
    colorizer = Colorizer.options(max_ongoing_requests=max(32, 2 * col.max_batch_size)).bind(
        max_batch_size=col.max_batch_size, batch_wait_timeout_s=col.batch_wait_timeout_s,
        compile_sampler=settings.compile_sampler, **common)
    upsamplers = {}
    for stage, name in (("color_upsampler", "ColorUpsampler"), ("spatial_upsampler", "SpatialUpsampler")):
        ups = settings.stage(stage)
        ongoing = max(16, 2 * (ups.max_batch_size or 4))
        upsamplers[stage] = Upsampler.options(name=name, max_ongoing_requests=ongoing).bind(
            stage, max_batch_size=ups.max_batch_size, batch_wait_timeout_s=ups.batch_wait_timeout_s, **common)
    return Ingress.bind(colorizer, upsamplers["color_upsampler"], upsamplers["spatial_upsampler"],
                        limits=settings.limits, auth=settings.auth)


def _require_models_on_every_node(models: str | dict) -> None:
    """A models directory is read by replicas on whichever nodes they land: on a cluster of machines that share
    no disk it must exist on every node, else the replicas elsewhere fail one by one. Refused up front instead."""
    import ray

    from pipelines.io.shared_path import require_on_every_node

    specs = models if isinstance(models, dict) else {stage: models for stage in STAGE_NAMES}
    folders = [spec if isinstance(models, dict) else str(Path(spec).expanduser() / stage)
               for stage, spec in specs.items() if not str(spec).startswith("models:/")]
    if folders and ray.is_initialized():
        require_on_every_node(folders, f"the models {models}", "Serve from the MLflow registry (models:/@<alias>, "
                              "with tracking_uri) or from a folder mounted on every node.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.serve.http import TOKEN_ENV, Limits

    limits = Limits()
    parser.add_argument("--models", required=True, help="models directory (DIR/colorizer, ...) or "
                        "models:/@<alias> (the three registered stages at that alias, from MLflow)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--ray-address", default=None, help="an existing Ray cluster; default: start a local "
                        "one on 127.0.0.2 for as long as this command runs")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda where a replica has a GPU)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server for models:/ URIs")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_BATCH["colorizer"]["max_batch_size"],
                        help="most requests the colorizer samples together")
    parser.add_argument("--batch-wait-timeout-s", type=float,
                        default=DEFAULT_BATCH["colorizer"]["batch_wait_timeout_s"],
                        help="how long the colorizer waits to fill a batch")
    parser.add_argument("--compile-sampler", action="store_true", help="torch.compile the colorizer's sampling "
                        "steps when its replica starts (~30 s per replica on a CPU; then 2-5x faster sampling)")
    parser.add_argument("--upsampler-max-batch-size", type=int, default=None, help="requests each upsampler "
                        "takes together (default: 4 on a GPU, 1 on a CPU)")
    parser.add_argument("--object-store-memory", type=int, default=None, help="bytes of the local Ray's object "
                        "store (default: Ray's, 30%% of memory)")
    parser.add_argument("--max-bytes", type=int, default=limits.max_bytes, help="request body limit (bytes)")
    parser.add_argument("--max-pixels", type=int, default=limits.max_pixels, help="decoded image limit (pixels)")
    parser.add_argument("--max-output-pixels", type=int, default=limits.max_output_pixels,
                        help="most output pixels (width x height x num_samples) one request may ask for")
    parser.add_argument("--max-in-flight", type=int, default=limits.max_in_flight, help="requests the ingress "
                        "takes on at once; more get 429 with Retry-After")
    parser.add_argument("--timeout-s", type=float, default=limits.timeout_s, help="time budget of a request (504)")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token-file", default=None, help=f"file holding the API token (default: ${TOKEN_ENV}, "
                       "else a new token is generated and printed)")
    token.add_argument("--no-auth", action="store_true", help="serve without an API token (logged as a warning)")


def app_args(args: argparse.Namespace) -> dict:
    upsampler = {"max_batch_size": args.upsampler_max_batch_size}
    return {"models": args.models, "tracking_uri": args.tracking_uri, "device": args.device,
            "compile_sampler": args.compile_sampler,
            "colorizer": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
            "color_upsampler": upsampler, "spatial_upsampler": upsampler,
            "limits": {"max_bytes": args.max_bytes, "max_pixels": args.max_pixels, "timeout_s": args.timeout_s,
                       "max_output_pixels": args.max_output_pixels, "max_in_flight": args.max_in_flight}}


def token_settings(args: argparse.Namespace, private_dir: Path) -> tuple[dict, str]:
    """`auth` args and what to print: --no-auth, --token-file, $COLTRAN_SERVE_TOKEN, or a new token (written to a
    private file the ingress replica reads, so that it never appears in Serve's config)."""
    from pipelines.serve.http import TOKEN_ENV

    if args.no_auth:
        return {"disabled": True}, "WARNING: authentication is off (--no-auth): anyone who can reach the port can use it"
    if args.token_file:
        return {"token_file": str(Path(args.token_file).resolve())}, f"API token: the one in {args.token_file}"
    token, said = os.environ.get(TOKEN_ENV, "").strip(), f"API token: the one in ${TOKEN_ENV}"
    if not token:
        token = secrets.token_hex(32)
        said = f"API token: {token}  (header 'Authorization: Bearer <token>'; the web page asks for it once)"
    path = private_dir / "api_token"
    path.touch(mode=0o600)
    path.write_text(token)
    return {"token_file": str(path)}, said


def run(args: argparse.Namespace) -> int:
    """Start Ray (local unless --ray-address) and the app, print the URL, serve until Ctrl-C or SIGTERM."""
    import ray
    from ray import serve

    private_dir = tempfile.TemporaryDirectory(prefix="coltran-serve-")  # mode 0700
    auth, token_line = token_settings(args, Path(private_dir.name))
    app = build_app({**app_args(args), "auth": auth})
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        ray.init(_node_ip_address="127.0.0.2", num_cpus=args.num_cpus, object_store_memory=args.object_store_memory,
                 include_dashboard=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"
        print(f"ColTran is serving at {url} (web page), {url}colorize (API), {url}docs (OpenAPI); "
              f"Ctrl-C stops it\n{token_line}", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
        private_dir.cleanup()
    print("stopped", file=sys.stderr)
    return 0

