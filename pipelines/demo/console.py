"""The demo's console: its own progress lines on the terminal, everything else (Ray's and MLflow's logs, worker
output, warnings, the raylet's C++ messages) in a log file, by pointing file descriptors 1 and 2 at the file for
the run. Child processes started meanwhile (Ray's) inherit the file. `verbose` leaves the terminal as it is."""

from __future__ import annotations

import os
import sys
from pathlib import Path


class Console:
    """`with Console(log_path, verbose) as console: console.say(...)`; `console.passing(prefix)` forwards the
    lines a library writes to sys.stderr that start with `prefix` to the terminal (the rest to the log)."""

    def __init__(self, log_path: str | Path, verbose: bool = False):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self._saved: list[int] = []
        self._terminal = sys.stdout

    def __enter__(self) -> Console:
        if self.verbose:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        self._terminal = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        return self

    def __exit__(self, *exc) -> None:
        if not self._saved:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = []
        self._terminal.close()
        self._terminal = sys.stdout

    def say(self, text: str) -> None:
        print(text, file=self._terminal, flush=True)
        if not self.verbose:  # the log reads as one story too
            print(text, flush=True)

    def passing(self, prefix: str, indent: str = "    ") -> _Passing:
        return _Passing(self, prefix, indent)


class _Passing:
    """A stand-in for sys.stderr while a step runs: lines starting with `prefix` go to the terminal too."""

    def __init__(self, console: Console, prefix: str, indent: str):
        self.console, self.prefix, self.indent = console, prefix, indent
        self._buffer = ""

    def __enter__(self) -> _Passing:
        self._stderr, sys.stderr = sys.stderr, self
        return self

    def __exit__(self, *exc) -> None:
        if self._buffer:
            self.write("\n")
        sys.stderr = self._stderr

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.startswith(self.prefix) and not self.console.verbose:
                print(self.indent + line, file=self.console._terminal, flush=True)
            self._stderr.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._stderr.flush()

    def isatty(self) -> bool:
        return False
