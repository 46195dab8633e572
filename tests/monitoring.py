"""A real Prometheus (Debian's package) for the monitoring tests, the series the shipped dashboard and
alert rules read, and an OTLP/HTTP listener standing in for an OpenTelemetry collector."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from .harness import free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "membrain.json"
RULES = DEPLOY / "prometheus" / "membrain-alerts.yml"
# What Grafana puts in for the dashboard's variables, so its expressions are plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$model_name": ".*"}

_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan"}


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers, ranges,
    grouping clauses and function calls are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {n for n in names if n not in _KEYWORDS}


def dashboard_expressions() -> list[str]:
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            out.append(expr)
    return out


def rule_expressions() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def check_rules_with_promtool() -> None:
    r = subprocess.run([shutil.which("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def require_prometheus() -> None:
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.skip("Debian's prometheus package is not installed (nox -s tests installs it when run as root)")


class Prometheus:
    """`prometheus` on a free loopback port, with a temporary config and data directory, scraping every
    second and evaluating the shipped alert rules."""

    def __init__(self, workdir: Path, scrape_configs: list[dict]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(RULES)], "scrape_configs": scrape_configs}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        self._wait(lambda: httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200, "ready")

    def _wait(self, condition, what: str, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds  # a guard against a hang, not a performance bound
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                if condition():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"prometheus: not {what} within {seconds} s\n" + Path(self.log.name).read_text()[-3000:])

    def query(self, expr: str) -> list:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", (expr, r)
        return r["data"]["result"]

    def wait_for(self, expr: str, what: str) -> None:
        """Until `expr` returns a sample (the data a test produced was scraped)."""
        self._wait(lambda: bool(self.query(expr)), what)

    def missing_series(self, names: set[str]) -> set[str]:
        return {n for n in names if not self.query(f'count({{__name__="{n}"}})')}

    def rules_health(self) -> dict[str, str]:
        groups = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return {rule["name"]: rule["health"] for g in groups for rule in g["rules"]}

    def wait_rules_evaluated(self) -> None:
        self._wait(lambda: "unknown" not in self.rules_health().values(), "done evaluating the rules")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def membrain_scrape_config(url: str, token_file: Path) -> dict:
    """As an operator writes it: the server's /metrics needs a "*" token when the server has an auth file."""
    return {"job_name": "membrain", "static_configs": [{"targets": [url.split("//", 1)[1]]}],
            "authorization": {"type": "Bearer", "credentials_file": str(token_file)}}


def vllm_scrape_config(port: int) -> dict:
    return {"job_name": "vllm", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}


class OtlpCollector:
    """Receives OTLP/HTTP exports on a free loopback port (OTEL_EXPORTER_OTLP_ENDPOINT=`url`, protocol
    http/protobuf) and decodes the spans: {service.name: {span names}}."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                received.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> dict[str, set[str]]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        out: dict[str, set[str]] = {}
        for path, body in list(self.received):
            if path != "/v1/traces":
                continue
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                out.setdefault(service, set()).update(s.name for ss in rs.scope_spans for s in ss.spans)
        return out

    def wait_for_spans(self, service: str, names: set[str], seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds  # a guard against a hang, not a performance bound
        while not names <= self.spans().get(service, set()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert names <= self.spans().get(service, set()), self.spans()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
