"""Helpers for end-to-end tests: real vLLM engines as subprocesses, real servers, generated models."""

from __future__ import annotations

import os
import socket

from membrain_async.testing import tinymodel
from membrain_async.testing.driver import EngineProcess

ENGINE_KWARGS = {
    "dtype": "bfloat16",
    "enforce_eager": True,
    "block_size": 32,
    "max_model_len": 2048,
    "seed": 0,
}
BLOCK = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_env(**membrain: str | None) -> dict[str, str]:
    """The parent's environment without any VLLM_MEMBRAIN_* setting, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in membrain.items():
        if v is not None:
            env[k] = v
    return env


class Engine(EngineProcess):
    """An engine process with the test suite's engine settings."""

    def __init__(self, model: str, phases: list[dict], env: dict[str, str], log_dir: str, name: str,
                 engine_kwargs: dict | None = None):
        super().__init__(model, phases, env, log_dir, name, {**ENGINE_KWARGS, **(engine_kwargs or {})})


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
    # Never-poison scenarios: pairs sharing a 256-word prefix, one prefix per scenario.
    **{f"s{i}{t}": tinymodel.prompt_words(256, seed=200 + i) + " " + tinymodel.prompt_words(72, seed=300 + 10 * i + k)
       for i in range(1, 6) for k, t in enumerate("xy")},
    # One fresh prompt per fault scenario, so nothing an earlier scenario stored can help or hurt it.
    **{f"f{i}": tinymodel.prompt_words(160, seed=100 + i) for i in range(1, 10)},
}
# "name@salt" is the prompt with that cache_salt.
BASELINE_NAMES = ["a1", "b1", "salted@alice", "salted@bob", "x", "y", "z", *(f"f{i}" for i in range(1, 10)),
                  *(f"s{i}{t}" for i in range(1, 6) for t in "xy")]


def P(name: str, salt: str | None = None) -> dict:
    return {"text": PROMPTS[name], **({"cache_salt": salt} if salt else {})}


def proc_status(pid: int, field: str) -> int:
    """A /proc/<pid>/status size field in bytes (VmHWM: the kernel's own record of peak RSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)
