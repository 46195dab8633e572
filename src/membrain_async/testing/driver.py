"""Drive `python -m membrain_async.testing.engine` processes: one real vLLM engine each, as in production.

Used by the end-to-end tests, the demo and the benchmarks. Events are the JSON lines the engine prints.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time


_ERROR_LINE = re.compile(r"^\s*(?:\(\w+ pid=\d+\)\s*)?([A-Za-z_.]*(?:Error|Exception|NotImplemented\w*)\b.*)$")


def key_error(log: str) -> str:
    """The last `SomethingError: message` line of a log: the exception that ended a process."""
    lines = [m.group(1).strip() for m in map(_ERROR_LINE.match, log.splitlines()) if m]
    lines = [ln for ln in lines if ":" in ln and not ln.startswith(("Traceback", "During handling"))]
    if lines:
        return lines[-1][:400]
    return log.strip().splitlines()[-1][:400] if log.strip() else "no output"


class EventProcess:
    """A child process whose stdout lines go to a log, and whose JSON lines are its events.

    `failure` is what a missing event raises: AssertionError in tests, SystemExit in benchmarks.
    """

    failure: type[BaseException] = AssertionError

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str, name: str):
        self.name = name
        self.log_path = log_path
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        self.events: queue.Queue = queue.Queue()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.log.write(line)
                self.log.flush()
            except ValueError:  # finish() closed the log while the engine printed its last lines
                pass
            self.lines.append(line)
            if line.startswith("{"):
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    pass
        self.events.put(None)

    def next_event(self, key: str, timeout: float = 300) -> dict:
        end = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                raise self.failure(f"{self.name}: no '{key}' event in {timeout}s; log: {self.log_path}\n{self.tail()}") from None
            if event is None:
                raise self.failure(f"{self.name} exited ({self.proc.poll()}) before '{key}'; log: {self.log_path}\n{self.tail()}")
            if key in event:
                return event

    def send(self, message: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def output(self) -> str:
        return "".join(self.lines)


class EngineProcess(EventProcess):
    """`python -m membrain_async.testing.engine` in its own process; JSON events read from its stdout."""

    def __init__(self, model: str, phases: list[dict], env: dict[str, str], log_dir: str, name: str,
                 engine_kwargs: dict, interactive: bool = False):
        spec = {"model": model, "engine": engine_kwargs, "phases": phases, "interactive": interactive}
        fd, self.spec_path = tempfile.mkstemp(suffix=".json", dir=log_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        super().__init__([sys.executable, "-m", "membrain_async.testing.engine", self.spec_path], env,
                         os.path.join(log_dir, f"{name}.log"), name)

    def phase(self, timeout: float = 300) -> dict:
        return self.next_event("phase", timeout)

    def send_phase(self, phase: dict, timeout: float = 3600) -> dict:
        """Interactive mode: run one phase now and return its report."""
        self.send(phase)
        return self.phase(timeout)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 120) -> int:
        """Wait for the engine to exit (closing its stdin ends interactive mode)."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc
