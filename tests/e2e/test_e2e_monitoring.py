"""The shipped dashboard and alert rules against a real Prometheus scraping a real `membrain serve` (with its
bearer token) and a real vLLM OpenAI server running the connector: after a save and a load, every series
they read exists, and the connector's timers are histograms in the engine's /metrics. The same engine runs
with OTEL_* variables pointing at an OTLP listener: the connector's spans arrive there."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import orjson
import pytest

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing import tinymodel

from ..harness import BLOCK, engine_env, free_port
from ..monitoring import (OtlpCollector, Prometheus, check_rules_with_promtool, dashboard_expressions,
                         membrain_scrape_config, require_prometheus, rule_expressions, series_names,
                         vllm_scrape_config)

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

TOKEN = "ops-secret-monitoring"
PROMPT = tinymodel.prompt_words(200, seed=61)  # several full blocks


def _wait(condition, what: str, proc: subprocess.Popen, log_path: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds  # a guard against a hang, not a performance bound
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log_path).read()[-3000:]
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not {what} within {seconds} s\n" + open(log_path).read()[-3000:])


def test_prometheus_scrapes_server_and_engine_and_every_series_of_the_dashboard_and_rules_exists(
        model, logs, tmp_path):
    require_prometheus()
    check_rules_with_promtool()
    auth = tmp_path / "auth.json"
    auth.write_bytes(orjson.dumps({"tokens": [{"token": TOKEN, "namespaces": ["*"], "scope": "readwrite"}]}))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    srv = start_subprocess_server({"port": 0, "capacity": "256MiB", "auth_file": str(auth),
                                   "disk_path": str(tmp_path / "disk"), "disk_capacity": "256MiB"})
    port = free_port()
    # No local prefix cache: the second request of the same prompt is a Membrain hit, loaded.
    collector = OtlpCollector()
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=srv.url, VLLM_MEMBRAIN_TOKEN=TOKEN,
                     OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                     OTEL_METRICS_EXPORTER="none", OTEL_BSP_SCHEDULE_DELAY="100")
    log_path = os.path.join(logs, "monitoring-openai-server.log")
    log = open(log_path, "w")
    api = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
         "--dtype", "bfloat16", "--enforce-eager", "--block-size", str(BLOCK), "--max-model-len", "2048",
         "--no-enable-prefix-caching", "--no-enable-log-requests"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    ops = httpx.Client(base_url=srv.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    prom = None
    try:
        prom = Prometheus(tmp_path, [membrain_scrape_config(srv.url, token_file), vllm_scrape_config(port)])
        _wait(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, "serving", api, log_path)

        def complete() -> None:
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text

        complete()
        _wait(lambda: ops.get("/v1/stats").json()["keys"] > 0, "saved to Membrain", api, log_path)
        complete()  # loaded from Membrain
        assert ops.get("/memory/default/k", headers={"authorization": "Bearer wrong"}).status_code == 401

        prom.wait_for("vllm:membrain_load_seconds_count > 0", "scraping the engine's load")
        prom.wait_for('membrain_request_errors_total{status="401"}', "scraping the server's refusal")
        assert {r["metric"]["job"]: r["value"][1] for r in prom.query("up")} == {"membrain": "1", "vllm": "1"}
        for name in ("vllm:membrain_lookup_rtt_seconds_count", "membrain_request_duration_seconds_count"):
            assert prom.query(f"sum({name}) > 0"), name
        expressions = dashboard_expressions() + rule_expressions()
        for expr in expressions:
            prom.query(expr)
        names = set().union(*map(series_names, expressions))
        assert {"vllm:membrain_load_seconds_bucket", "vllm:membrain_load_error_blocks_total"} <= names
        assert prom.missing_series(names) == set()
        prom.wait_rules_evaluated()
        assert set(prom.rules_health().values()) == {"ok"}
        # The engine core's lookups and the worker's saves, exported as the OTEL_* variables said.
        collector.wait_for_spans("vllm", {"membrain.lookup", "membrain.save_batch"})
    finally:
        if prom is not None:
            prom.stop()
        collector.stop()
        ops.close()
        api.terminate()
        try:
            api.wait(30)
        except subprocess.TimeoutExpired:
            api.kill()
        log.close()
        srv.stop()
