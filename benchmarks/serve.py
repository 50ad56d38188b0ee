"""Load test of the Serve app on loopback: 1 and 16 concurrent clients, the colorizer batched versus
max_batch_size=1, in one run on a local Ray. Prints requests/s, p50/p99 latency and failures per setting, the
colorizer's mean batch, and the CPU seconds all Ray processes spent per request (on a machine shared with other
work, wall-clock throughput follows their load; CPU time per request much less so).

Then an overload run: open-loop arrivals at `--overload-factor` (4) times the capacity just measured (the batched
setting's req/s at 16 clients) for `--overload-s` seconds against the batched app with its in-flight limit
(`--max-in-flight`): served req/s, the share refused with 429, p50/p99 of the served requests, and the count of
5xx answers, which must be zero. Requests carry the app's API token, as every client must.

    python benchmarks/serve.py [--models DIR] [--colorizer-preset mid] [--batch 16] [--rounds 2] [--requests 1]
                               [--overload-s 30] [--overload-factor 4] [--max-in-flight 16]

Defaults: untrained `test` preset models, resolution 256, a real photo from ../shared/data when present (else a
synthetic gray image). `--colorizer-preset mid` swaps in a wider colorizer so that, as with the paper's models,
the autoregressive stage dominates the cost of a request (at `test` size on a CPU the spatial upsampler does).
Exits 1 if any request of the closed-loop runs failed or any overload answer was a 5xx."""

from __future__ import annotations

import argparse
import io
import os
import re
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-500" / "n01530575_brambling.JPEG"


@dataclass
class LoadResult:
    setting: str
    clients: int
    requests: int
    failed: int
    seconds: float
    latencies: list[float]
    batch_sizes: list[int]
    batch_seconds: list[float]  # the colorizer's time in each sampling pass
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of Ray processes during the load, by role

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())

    @property
    def rps(self) -> float:
        return (self.requests - self.failed) / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def photo_bytes() -> bytes:
    if PHOTO.exists():
        return PHOTO.read_bytes()
    y, x = np.mgrid[0:375, 0:500]
    buf = io.BytesIO()
    Image.fromarray(((x * 3 + y * 5) % 256).astype(np.uint8), "L").save(buf, format="JPEG")
    return buf.getvalue()


def ray_cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (deployment or 'other', user + system CPU seconds) of every process this driver's local Ray
    started (all are its descendants; Ray titles a replica's process ray::ServeReplica:<app>:<deployment>)."""
    times = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cpu = proc.cpu_times()
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        found = re.search(r"ServeReplica:[^:\s]+:(\w+)", title)
        times[proc.pid] = (found.group(1) if found else "other", cpu.user + cpu.system)
    return times


def cpu_spent(before: dict, after: dict) -> dict[str, float]:
    spent: dict[str, float] = {}
    for pid, (label, seconds) in after.items():
        spent[label] = spent.get(label, 0.0) + seconds - before.get(pid, (label, 0.0))[1]
    return spent


TOKEN = secrets.token_hex(32)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def drive(url: str, body: bytes, clients: int, per_client: int) -> tuple[list[float], int, float]:
    """`clients` threads, each sending `per_client` requests back to back; (latencies, failures, wall seconds)."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        session = requests.Session()
        start_line.wait()
        for i in range(per_client):
            t0 = time.perf_counter()
            try:
                response = session.post(f"{url}/colorize", data=body, timeout=600, headers=AUTH,
                                        params={"resolution": "256", "seed": 1000 * k + i})
                ok = response.status_code == 200 and response.content[:4] == b"\x89PNG"
            except requests.RequestException:
                ok = False
            with lock:
                latencies.append(time.perf_counter() - t0)
                failures[0] += not ok

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    return latencies, failures[0], time.perf_counter() - t0


def deploy(settings: dict[str, int], models: str, token_file: Path, max_in_flight: int) -> dict[str, object]:
    """Both settings side by side (app `name` at /name), so rounds can alternate between them: on a shared
    machine the load drifts, and alternating exposes both settings to the same drift."""
    from ray import serve

    from pipelines.serve.app import build_app

    handles = {}
    for name, batch in settings.items():
        app_args = {"models": models, "colorizer": {"max_batch_size": batch, "batch_wait_timeout_s": 0.05},
                    "auth": {"token_file": str(token_file)}, "limits": {"max_in_flight": max_in_flight}}
        serve.run(build_app(app_args), name=name, route_prefix=f"/{name}")
        handles[name] = serve.get_deployment_handle("Colorizer", app_name=name)
    return handles


def run_rounds(url: str, body: bytes, handles: dict, loads: list[tuple[int, int]], rounds: int) -> list[LoadResult]:
    for name in handles:
        drive(f"{url}/{name}", body, 2, 1)  # warm-up: first calls pay for lazy initialisation
    pooled: dict[tuple[str, int], LoadResult] = {}
    for r in range(rounds):
        for clients, per_client in loads:
            for name in (list(handles) if r % 2 == 0 else list(handles)[::-1]):
                handles[name].reset_stats.remote().result()
                cpu_before = ray_cpu_seconds()
                latencies, failed, seconds = drive(f"{url}/{name}", body, clients, per_client)
                cpu_after = ray_cpu_seconds()
                stats = handles[name].stats.remote().result()
                res = pooled.setdefault((name, clients), LoadResult(name, clients, 0, 0, 0.0, [], [], []))
                res.requests += clients * per_client
                res.failed += failed
                res.seconds += seconds
                res.latencies += latencies
                res.batch_sizes += stats["batch_sizes"]
                res.batch_seconds += stats["batch_seconds"]
                for label, cpu_seconds in cpu_spent(cpu_before, cpu_after).items():
                    res.cpu[label] = res.cpu.get(label, 0.0) + cpu_seconds
                print(f"  round {r + 1}: {name}, {clients} client(s): {seconds:.1f} s, load "
                      f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return list(pooled.values())


def print_table(results: list[LoadResult]) -> None:
    print(f"{'setting':<22} {'clients':>7} {'requests':>8} {'failed':>6} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} "
          f"{'mean batch':>10} {'colorizer s/req':>15} {'CPU s/req':>9}")
    for r in results:
        mean_batch = statistics.mean(r.batch_sizes) if r.batch_sizes else float("nan")
        per_request = sum(r.batch_seconds) / max(sum(r.batch_sizes), 1)
        print(f"{r.setting:<22} {r.clients:>7} {r.requests:>8} {r.failed:>6} {r.rps:>7.2f} {r.pct(50):>7.2f} "
              f"{r.pct(99):>7.2f} {mean_batch:>10.2f} {per_request:>15.2f} {r.cpu_seconds / r.requests:>9.2f}")
    roles = ["Ingress", "Colorizer", "ColorUpsampler", "SpatialUpsampler", "other"]
    print("\nCPU seconds per request by process (other: proxy, controller, idle workers)")
    print(f"{'setting':<22} {'clients':>7} " + " ".join(f"{role:>16}" for role in roles))
    for r in results:
        print(f"{r.setting:<22} {r.clients:>7} " + " ".join(f"{r.cpu.get(role, 0.0) / r.requests:>16.2f}"
                                                           for role in roles))
    by = {(r.setting, r.clients): r for r in results}
    for clients in sorted({r.clients for r in results}):
        if ("batched", clients) in by and ("unbatched", clients) in by:
            batched, unbatched = by["batched", clients], by["unbatched", clients]
            cpu_ratio = (unbatched.cpu_seconds / unbatched.requests) / (batched.cpu_seconds / batched.requests)
            print(f"{clients} client(s): throughput batched / unbatched {batched.rps / unbatched.rps:.2f}x; "
                  f"CPU time per request unbatched / batched {cpu_ratio:.2f}x")


@dataclass
class OverloadResult:
    offered_rps: float
    seconds: float  # from the first arrival to the last answer
    statuses: list[int]  # per request; 0: no HTTP answer
    served_latencies: list[float]
    refused_latencies: list[float]

    def share(self, test) -> float:
        return sum(1 for s in self.statuses if test(s)) / max(len(self.statuses), 1)


def overload(url: str, body: bytes, rate: float, seconds: float) -> OverloadResult:
    """Open-loop arrivals at `rate` req/s for `seconds` (each request sent at its time, whatever the server does)."""
    count = max(1, int(rate * seconds))
    statuses, served, refused = [0] * count, [], []
    lock = threading.Lock()

    def send(k: int) -> None:
        t0 = time.perf_counter()
        try:
            status = requests.post(f"{url}/colorize", data=body, timeout=900, headers=AUTH,
                                   params={"resolution": "256", "seed": k}).status_code
        except requests.RequestException:
            status = 0
        with lock:
            statuses[k] = status
            (served if status == 200 else refused if status == 429 else []).append(time.perf_counter() - t0)

    with ThreadPoolExecutor(max_workers=min(count, 256)) as pool:
        start = time.perf_counter()
        for k in range(count):
            time.sleep(max(0.0, start + k / rate - time.perf_counter()))
            pool.submit(send, k)
    return OverloadResult(rate, time.perf_counter() - start, statuses, served, refused)


def print_overload(res: OverloadResult, capacity: float, factor: float, max_in_flight: int) -> None:
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    served = sum(1 for s in res.statuses if s == 200)
    fivexx = sum(1 for s in res.statuses if s >= 500)
    print(f"\nOverload: {len(res.statuses)} requests offered at {res.offered_rps:.2f} req/s ({factor:g}x the "
          f"measured capacity {capacity:.2f} req/s), max_in_flight {max_in_flight}, {res.seconds:.1f} s to the last "
          "answer")
    print(f"served {served} ({served / res.seconds:.2f} req/s), 429 share {res.share(lambda s: s == 429):.1%} "
          f"(p50 {pct(res.refused_latencies, 50) * 1000:.0f} ms, p99 {pct(res.refused_latencies, 99) * 1000:.0f} ms "
          f"to the refusal), served p50 {pct(res.served_latencies, 50):.2f} s, p99 {pct(res.served_latencies, 99):.2f} s, "
          f"5xx {fivexx}, no answer {sum(1 for s in res.statuses if s == 0)}, other "
          f"{sum(1 for s in res.statuses if s not in (0, 200, 429) and s < 500)}")


def untrained_models(root: Path, colorizer_preset: str) -> Path:
    """A models directory of untrained `test` upsamplers and an untrained colorizer of `colorizer_preset`."""
    from coltran.init_models import init_models

    models = init_models(root / "models", "test", stages=["color_upsampler", "spatial_upsampler"])
    return init_models(models, colorizer_preset, stages=["colorizer"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="models directory (default: fresh untrained test preset)")
    parser.add_argument("--colorizer-preset", default="test", choices=["test", "mid", "full"],
                        help="preset of the untrained colorizer (the upsamplers stay `test`)")
    parser.add_argument("--batch", type=int, default=16, help="the batched setting's max_batch_size")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running every load on both settings")
    parser.add_argument("--requests", type=int, default=1, help="requests per client per round at 16 clients")
    parser.add_argument("--single-requests", type=int, default=2, help="requests of the single client per round")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--overload-s", type=float, default=30.0, help="seconds of open-loop overload (0: none)")
    parser.add_argument("--overload-factor", type=float, default=4.0, help="offered load / measured capacity")
    parser.add_argument("--max-in-flight", type=int, default=16, help="the app's limits.max_in_flight")
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = tempfile.TemporaryDirectory(prefix="coltran-bench-")
    models = args.models or str(untrained_models(Path(tmp.name), args.colorizer_preset))
    body = photo_bytes()
    load_before = os.getloadavg()[0]
    token_file = Path(tmp.name) / "token"
    token_file.write_text(TOKEN)
    ray.init(_node_ip_address="127.0.0.2", num_cpus=args.num_cpus, object_store_memory=300_000_000,
             include_dashboard=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handles = deploy({"batched": args.batch, "unbatched": 1}, models, token_file, args.max_in_flight)
        results = run_rounds(f"http://127.0.0.1:{port}", body, handles,
                             [(1, args.single_requests), (16, args.requests)], args.rounds)
        capacity = max(r.rps for r in results if r.setting == "batched")
        over = None
        if args.overload_s > 0:
            print(f"  overload: {args.overload_factor:g} x {capacity:.2f} req/s for {args.overload_s:g} s",
                  file=sys.stderr, flush=True)
            over = overload(f"http://127.0.0.1:{port}/batched", body, args.overload_factor * capacity, args.overload_s)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    presets = "given models" if args.models else f"colorizer {args.colorizer_preset}, upsamplers test"
    print(f"ColTran Serve benchmark: {presets}, resolution 256, {len(body):,}-byte photo, {args.rounds} rounds, "
          f"colorizer batched = max_batch_size {args.batch}, unbatched = 1 (upsamplers: by device, 1 on a CPU); "
          f"{args.num_cpus} Ray CPUs on a "
          f"{os.cpu_count()}-CPU machine, 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print_table(sorted(results, key=lambda r: (r.clients, r.setting)))
    if over is not None:
        print_overload(over, capacity, args.overload_factor, args.max_in_flight)
    bad_overload = over is not None and any(s >= 500 or s == 0 for s in over.statuses)
    return 1 if any(r.failed for r in results) or bad_overload else 0


if __name__ == "__main__":
    sys.exit(main())
