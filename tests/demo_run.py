"""`coltran demo` as the session runs it: started in the background when the session starts (conftest's early
start), niced, so that its minutes of CPU-bound training use the core the single-threaded fast tests leave idle
while those still come first; tests/test_demo.py waits for it and reads what it left."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services import VENV_BIN, log_tail, marked_pids, reap, service_env

STEPS_SCALE = "0.4"  # colorizer 120, colour upsampler 120, spatial upsampler 100 steps (see test_demo.py)
TIMEOUT_S = 2400  # from its start: niced beside the rest of the session, it may wait for CPU
NICENESS = 10  # below the tests in the foreground; its Ray processes inherit it


def yield_to_the_tests(session_leader: int) -> None:
    """Linux's autogroup scheduling (on by default) first shares the CPUs between sessions, whatever the nice
    values inside them: the demo's session, niced, still took half the machine and the fast tests ran 2-15x
    slower (test_fid's Inception test 72 s instead of 5 s). The session's own niceness makes it yield."""
    try:
        Path(f"/proc/{session_leader}/autogroup").write_text(str(NICENESS))
    except OSError:  # no autogroup (kernel setting) or not allowed: the plain nice value applies
        pass


@dataclass
class DemoOutcome:
    root: Path  # the demo's --dir
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    left: list[int]  # processes of the demo still alive 20 s after it ended


class DemoRun:
    def __init__(self, root: Path, mark: str):
        self.root, self.mark = root, mark
        home = root / "home"
        home.mkdir()
        self.out, self.err = root / "stdout.txt", root / "stderr.txt"
        # the demo's own photos and held-out count, 0.4x its steps; a user's shell with a fresh HOME: the local
        # ray.init() creates its own auth token there
        cmd = ["nice", "-n", str(NICENESS), str(VENV_BIN / "coltran"), "demo", "--dir", str(root / "run"),
               "--steps-scale", STEPS_SCALE]
        env = service_env(mark, {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"},
                          drop=("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                "MLFLOW_TRACKING_URI"))
        self.start = time.monotonic()
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        yield_to_the_tests(self.proc.pid)
        self._outcome: DemoOutcome | None = None

    def wait(self) -> DemoOutcome:
        """The demo's outcome, once it has ended (killed past TIMEOUT_S from its start)."""
        if self._outcome is None:
            try:
                self.proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - self.start)))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            seconds = time.monotonic() - self.start
            deadline = time.monotonic() + 20  # ray.shutdown() at the demo's end stops its processes
            while (left := marked_pids(self.mark)) and time.monotonic() < deadline:
                time.sleep(0.5)
            reap(self.mark)
            self._outcome = DemoOutcome(self.root / "run", self.proc.returncode, log_tail(self.out, 10**6),
                                        log_tail(self.err, 10**6), seconds, left)
        return self._outcome


@contextmanager
def run_demo(root: Path, mark: str) -> Iterator[DemoRun]:
    """Start the demo now; whatever happens, nothing of it outlives the context."""
    run = DemoRun(root, mark)
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.proc.terminate()
        reap(mark)
