"""The shipped dashboard (deploy/grafana) and alert rules (deploy/prometheus) against a real Prometheus
scraping a real `membrain serve` with its bearer token: promtool accepts the rules, every expression is
valid PromQL, and every server series they read exists. tests/e2e/test_e2e_monitoring.py adds an engine."""

import re
from pathlib import Path

import httpx
import orjson
import pytest

from membrain_async.server import embedded_server

from ..monitoring import (Prometheus, check_rules_with_promtool, dashboard_expressions, membrain_scrape_config,
                         require_prometheus, rule_expressions, series_names)

OPS_TOKEN = "ops-secret-prometheus"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_series_names_are_what_an_expression_reads():
    expr = ('histogram_quantile(0.99, sum by (op, le) (rate(membrain_request_duration_seconds_bucket'
            '{op=~"get|put", instance=~".*"}[5m]))) > 1e3 * on (instance) group_left (version) membrain_build_info'
            ' unless vllm:membrain_lookups_total offset 1h')
    assert series_names(expr) == {"membrain_request_duration_seconds_bucket", "membrain_build_info",
                                  "vllm:membrain_lookups_total"}


def test_promtool_accepts_the_alert_rules():
    require_prometheus()
    check_rules_with_promtool()


def served_with_traffic(tmp_path):
    """A `membrain serve` with an auth file and a disk tier, a put, a hit, a miss and one refused request."""
    auth = tmp_path / "auth.json"
    auth.write_bytes(orjson.dumps({"tokens": [{"token": OPS_TOKEN, "namespaces": ["*"], "scope": "readwrite"}]}))
    token_file = tmp_path / "token"
    token_file.write_text(OPS_TOKEN)
    srv = embedded_server(mode="subprocess", capacity="16MiB", auth_file=str(auth), disk_path=str(tmp_path / "disk"),
                          disk_capacity="64MiB")
    return srv, token_file


def test_prometheus_scrapes_the_server_and_every_server_series_of_the_dashboard_and_rules_exists(tmp_path):
    require_prometheus()
    server_cm, token_file = served_with_traffic(tmp_path)
    with server_cm as srv:
        headers = {"authorization": f"Bearer {OPS_TOKEN}"}
        with httpx.Client(base_url=srv.url, headers=headers, timeout=10) as c:
            assert c.put("/memory/ns/k", content=bytes(5000)).status_code == 201
            assert c.post("/v1/lookup/ns", json={"keys": ["k", "absent"]}).json() == {"count": 1}
            assert c.get("/memory/ns/k", headers={"authorization": "Bearer wrong"}).status_code == 401
        prom = Prometheus(tmp_path, [membrain_scrape_config(srv.url, token_file)])
        try:
            prom.wait_for('membrain_request_errors_total{status="401"}', "scraping the server's refusal")
            assert prom.query('up{job="membrain"}')[0]["value"][1] == "1"  # the token was accepted
            expressions = dashboard_expressions() + rule_expressions()
            for expr in expressions:
                prom.query(expr)  # valid PromQL, as Prometheus itself parses it
            names = set().union(*map(series_names, expressions))
            server_names = {n for n in names if not n.startswith("vllm:")}
            assert {"up", "membrain_request_duration_seconds_bucket", "membrain_disk_degraded"} <= server_names
            assert prom.missing_series(server_names) == set()
            prom.wait_rules_evaluated()
            assert set(prom.rules_health().values()) == {"ok"}
        finally:
            prom.stop()


def exposed_series(tmp_path) -> tuple[set[str], set[str]]:
    """The series names (with `_total` and `_info` as exposed) of a server with a disk tier, and of the
    connector; and the histograms among them, whose `_bucket`, `_sum` and `_count` series a page may name."""
    from membrain_async.vllm.shared.stats import COUNTERS, TIMERS

    with embedded_server(capacity="16MiB", disk_path=str(tmp_path / "disk"), disk_capacity="16MiB") as srv:
        families = list(srv.server.service.metrics.registry.collect())
    suffix = {"counter": "_total", "info": "_info"}
    server = {f.name + suffix.get(f.type, "") for f in families if f.name.startswith("membrain_")}
    connector = {name + "_total" for name, _ in COUNTERS.values()} | {name for name, _ in TIMERS.values()}
    histograms = {f.name for f in families if f.type == "histogram"} | {name for name, _ in TIMERS.values()}
    return server | connector, histograms


def named_series(text: str) -> set[str]:
    """Every `membrain_*` or `vllm:membrain_*` name a page writes in backticks, brace lists expanded
    (`membrain_tier_{bytes,keys}`), a trailing `*` kept as a wildcard (`membrain_disk_*`)."""
    names = set()
    for head, alts, tail in re.findall(r"`((?:vllm:)?membrain_\w*)(?:\{([\w,]+)\})?(\w*\*?)", text):
        names |= {head + alt + tail for alt in (alts.split(",") if alts else [""])}
    return names - {"membrain_async"}  # the package, not a series


def test_docs_name_every_series_the_server_and_connector_expose_and_no_other(tmp_path):
    exposed, _ = exposed_series(tmp_path)
    named = named_series((DOCS / "monitoring.md").read_text())
    assert exposed <= named, sorted(exposed - named)
    assert named <= exposed, sorted(named - exposed)


def test_every_series_any_page_or_the_readme_names_is_exposed(tmp_path):
    exposed, histograms = exposed_series(tmp_path)
    exposed |= {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}
    pages = [*DOCS.glob("*.md"), DOCS.parent / "README.md"]
    assert len(pages) > 5
    for page in pages:
        for name in named_series(page.read_text()):
            if name.endswith("*"):
                assert any(e.startswith(name[:-1]) for e in exposed), f"{page.name}: {name} matches no series"
            else:
                assert name in exposed, f"{page.name}: {name} is not a series Membrain exposes"
