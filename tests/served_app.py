"""The Serve app as a user starts it, once per pytest session: `coltran serve` in a subprocess (its own local Ray
on 127.0.0.2), with the API token it generates and prints. tests/test_serve.py (HTTP) and tests/test_web.py
(Chromium) share it; conftest.py exposes it as the `served_app` fixture."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from services import VENV_BIN, free_port, log_tail, service_env, stop_marked, wait_until

from coltran.init_models import init_models

# Test settings, each chosen so that outcomes never depend on machine speed: a generous colorizer batch wait makes
# concurrent requests share batches even on a busy machine, and also puts a floor under every request's duration
# (the time-budget test asks for less); max_in_flight is what the burst test fills with held uploads.
BATCH_WAIT_S = 0.3
MAX_IN_FLIGHT = 8


@dataclass
class ServedApp:
    url: str  # http://127.0.0.1:PORT (no trailing slash)
    token: str  # the one `coltran serve` generated and printed
    models: Path
    log: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def stats(self) -> dict:
        """The ingress's load and every stage replica's record (GET /stats, authenticated)."""
        response = requests.get(f"{self.url}/stats", headers=self.auth, timeout=60)
        response.raise_for_status()
        return response.json()


@contextmanager
def run_served_app(root: Path, mark: str, timeout: float = 300.0) -> Iterator[ServedApp]:
    models = init_models(root / "models", "test")
    log = root / "serve.log"
    cmd = [str(VENV_BIN / "coltran"), "serve", "--models", str(models), "--port", str(free_port()),
           "--num-cpus", "2", "--object-store-memory", "300000000", "--batch-wait-timeout-s", str(BATCH_WAIT_S),
           "--max-in-flight", str(MAX_IN_FLIGHT)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=service_env(mark, {"RAY_USAGE_STATS_ENABLED": "0"},
                                                     drop=["COLTRAN_SERVE_TOKEN"]),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def printed() -> tuple[str, str] | None:
        if proc.poll() is not None:
            raise AssertionError(f"coltran serve exited with {proc.returncode}\n{log_tail(log)}")
        text = log.read_text(errors="replace")
        url = re.search(r"ColTran is serving at (http://127\.0\.0\.1:\d+)/", text)
        token = re.search(r"API token: ([0-9a-f]{64}) ", text)
        return (url.group(1), token.group(1)) if url and token else None

    try:
        wait_until(lambda: printed() is not None, timeout, "coltran serve", lambda: log_tail(log))
        url, token = printed()
        yield ServedApp(url, token, models, log)
    finally:
        # the verb shuts Serve and its Ray down itself on SIGTERM (SIGINT would do when typed as Ctrl-C, but a
        # process started from a backgrounded shell inherits SIGINT ignored, as pytest under CI may be)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        stop_marked(mark, "coltran serve")  # and anything of its Ray that outlived it
