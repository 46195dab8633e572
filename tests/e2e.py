"""Helpers for end-to-end tests: real vLLM engines as subprocesses, real servers, generated models."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

from membrain_async.testing import tinymodel

ENGINE_KWARGS = {
    "dtype": "bfloat16",
    "enforce_eager": True,
    "block_size": 32,
    "max_model_len": 2048,
    "seed": 0,
}
BLOCK = 32


def engine_env(**membrain: str | None) -> dict[str, str]:
    """The parent's environment without any VLLM_MEMBRAIN_* setting, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in membrain.items():
        if v is not None:
            env[k] = v
    return env


class Engine:
    """`python -m membrain_async.testing.engine` in its own process; JSON events read from its stdout."""

    def __init__(self, model: str, phases: list[dict], env: dict[str, str], log_dir: str, name: str,
                 engine_kwargs: dict | None = None):
        self.name = name
        spec = {"model": model, "engine": {**ENGINE_KWARGS, **(engine_kwargs or {})}, "phases": phases}
        fd, self.spec_path = tempfile.mkstemp(suffix=".json", dir=log_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "membrain_async.testing.engine", self.spec_path],
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
            self.log.write(line)
            self.log.flush()
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
                raise AssertionError(f"{self.name}: no '{key}' event in {timeout}s; log: {self.log_path}\n{self.tail()}") from None
            if event is None:
                raise AssertionError(f"{self.name} exited ({self.proc.poll()}) before '{key}'; log: {self.log_path}\n{self.tail()}")
            if key in event:
                return event

    def phase(self, timeout: float = 300) -> dict:
        return self.next_event("phase", timeout)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 120) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def output(self) -> str:
        return "".join(self.lines)


def run_engine(model: str, phases: list[dict], env: dict[str, str], log_dir: str, name: str,
               engine_kwargs: dict | None = None) -> list[dict]:
    """Start an engine, run every phase, return the phase reports."""
    engine = Engine(model, phases, env, log_dir, name, engine_kwargs)
    reports = [engine.phase() for _ in phases]
    rc = engine.finish()
    assert rc == 0, f"{name} exited with {rc}\n{engine.tail()}"
    return reports


def tokens(report: dict) -> list[list[int]]:
    return [r["tokens"] for r in report["results"]]


PREFIX = tinymodel.prompt_words(256, seed=11)
PROMPTS = {
    "a1": PREFIX + " " + tinymodel.prompt_words(40, seed=21),
    "b1": PREFIX + " " + tinymodel.prompt_words(40, seed=22),
    "salted": tinymodel.prompt_words(200, seed=31),
    "x": tinymodel.prompt_words(160, seed=41),
    "y": tinymodel.prompt_words(160, seed=42),
    "z": tinymodel.prompt_words(160, seed=43),
    # One fresh prompt per fault scenario, so nothing an earlier scenario stored can help or hurt it.
    **{f"f{i}": tinymodel.prompt_words(160, seed=100 + i) for i in range(1, 10)},
}
# "name@salt" is the prompt with that cache_salt.
BASELINE_NAMES = ["a1", "b1", "salted@alice", "salted@bob", "x", "y", "z", *(f"f{i}" for i in range(1, 10))]


def P(name: str, salt: str | None = None) -> dict:
    return {"text": PROMPTS[name], **({"cache_salt": salt} if salt else {})}
