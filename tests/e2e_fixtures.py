"""Session-wide fixtures of the end-to-end tests: one generated model, one server, one plain-vLLM baseline.

Every end-to-end test compares its greedy tokens with `baseline`, computed once by plain vLLM (Membrain
installed but not enabled) for every prompt the tests use.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing import tinymodel

from .harness import BASELINE_NAMES, Engine, P, engine_env, tokens


def server_stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/stats", timeout=5).json()


@pytest.fixture(scope="session")
def logs(tmp_path_factory):
    return str(tmp_path_factory.mktemp("engine-logs"))


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    return str(tinymodel.generate(tmp_path_factory.mktemp("model-a")))


@pytest.fixture(scope="session")
def other_model(tmp_path_factory):
    # Same architecture and tokenizer, other weights: its KV must never be mistaken for model A's.
    return str(tinymodel.generate(tmp_path_factory.mktemp("model-b"), seed=1))


@pytest.fixture(scope="session")
def e2e_server():
    srv = start_subprocess_server({"port": 0, "capacity": "512MiB"})
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def baseline(model, e2e_server, logs):
    """Plain vLLM: Membrain installed but VLLM_MEMBRAIN_ENABLED unset, pointed at a live server."""
    before = server_stats(e2e_server.url)["server"]["connections_total"]
    prompts = [P(*name.split("@")) for name in BASELINE_NAMES]
    engine = Engine(model, [{"name": "all", "prompts": prompts, "max_tokens": 12}],
                    engine_env(VLLM_MEMBRAIN_ENDPOINT=e2e_server.url), logs, "baseline")
    report = engine.phase()
    assert engine.finish() == 0
    after = server_stats(e2e_server.url)["server"]["connections_total"]
    out = dict(zip(BASELINE_NAMES, tokens(report)))
    out["_connections"] = after - before
    out["_output"] = engine.output()
    out["_text_a1"] = report["results"][BASELINE_NAMES.index("a1")]["text"]
    return out


class ReliabilityLog:
    """Scenario outcomes for the reliability report (`nox -s reliability`), appended as JSON lines.

    Recorded before the test asserts, so a failing run still says how many tokens went wrong.
    """

    def __init__(self, path: str | None):
        self.path = path

    def record(self, scenario: str, faults: list[str], reports: list[dict], expected: list[list[list[int]]],
               counters: dict | None = None) -> None:
        if not self.path:
            return
        got = [tokens(r) for r in reports]
        requests = sum(len(g) for g in got)
        wrong = sum(1 for g, e in zip(got, expected) for a, b in zip(g, e) if a != b)
        entry = {"kind": "scenario", "scenario": scenario, "faults": faults, "requests": requests, "wrong_tokens": wrong,
                 "failed_requests": requests - sum(len(g) for g in got if g), "counters": counters or {}}
        self._write(entry)

    def add(self, kind: str, **fields) -> None:
        """Other figures for the report: fuzz cases run, peak RSS against capacity."""
        if self.path:
            self._write({"kind": kind, **fields})

    def _write(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


@pytest.fixture(scope="session")
def reliability():
    return ReliabilityLog(os.environ.get("MEMBRAIN_RELIABILITY_LOG"))
