"""Summarise a reliability run (`nox -s reliability`) into bench/results/reliability.{json,md}.

Input: the JSON lines the tests append to $MEMBRAIN_RELIABILITY_LOG (fault scenarios with the tokens
they produced, fuzz case counts, peak server RSS) and pytest's JUnit XML for pass/fail counts.

    python bench/reliability_report.py --log run.jsonl --junit junit.xml --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import xml.etree.ElementTree as ET
from datetime import datetime, timezone


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def junit_counts(path: str) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed_tests": []}
    for suite in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed_tests"].append(f"{case.get('classname')}::{case.get('name')}")
    return out


def summarise(entries: list[dict], junit: dict) -> dict:
    scenarios = [e for e in entries if e.get("kind") == "scenario"]
    fuzz = [e for e in entries if e.get("kind") == "fuzz"]
    memory = [e for e in entries if e.get("kind") == "memory"]
    restarts = [e for e in entries if e.get("kind") == "restart"]
    robustness_failures = [t for t in junit["failed_tests"]
                           if "fuzz" in t or "robustness" in t or "server_process" in t or "disk_tier" in t]
    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "totals": {
            "scenarios": len(scenarios),
            "faults_injected": sum(len(s["faults"]) for s in scenarios),
            "requests_served": sum(s["requests"] for s in scenarios),
            "wrong_tokens": sum(s["wrong_tokens"] for s in scenarios),
            "failed_requests": sum(s["failed_requests"] for s in scenarios),
            "fuzz_cases": sum(f["total"] for f in fuzz),
            "server_crashes": len(robustness_failures),
            "tests": junit["tests"],
            "tests_failed": junit["failures"] + junit["errors"],
        },
        "scenarios": scenarios,
        "fuzz": fuzz,
        "memory": memory,
        "restarts": restarts,
        "failed_tests": junit["failed_tests"],
    }


def markdown(report: dict) -> str:
    t = report["totals"]
    lines = [
        "# Reliability report",
        "",
        f"Generated {report['when']} by `nox -s reliability` on {report['machine']['cpus']} CPUs, "
        f"Python {report['machine']['python']}.",
        "",
        "| figure | value | must be |",
        "| --- | --- | --- |",
        f"| fault scenarios (real vLLM engines) | {t['scenarios']} | |",
        f"| faults injected | {t['faults_injected']} | |",
        f"| requests served under faults | {t['requests_served']} | |",
        f"| requests with wrong tokens | {t['wrong_tokens']} | 0 |",
        f"| failed requests | {t['failed_requests']} | 0 |",
        f"| fuzz cases run | {t['fuzz_cases']} | |",
        f"| server crashes (failed fuzz/robustness tests) | {t['server_crashes']} | 0 |",
        f"| tests run / failed | {t['tests']} / {t['tests_failed']} | - / 0 |",
        "",
        "## Scenarios",
        "",
        "| scenario | faults | requests | wrong tokens | failed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in report["scenarios"]:
        lines.append(f"| {s['scenario']} | {', '.join(s['faults'])} | {s['requests']} | {s['wrong_tokens']} | {s['failed_requests']} |")
    if report["memory"]:
        lines += ["", "## Server memory", "", "| test | capacity | peak RSS | bound |", "| --- | --- | --- | --- |"]
        for m in report["memory"]:
            lines.append(f"| {m['test']} | {m['capacity'] >> 20} MiB | {m['peak_rss'] >> 20} MiB | {m['limit'] >> 20} MiB |")
    if report.get("restarts"):
        lines += ["", "## Server restarts with the disk tier", "",
                  "| test | puts acknowledged | served after the restart | recovered | wrong values |",
                  "| --- | --- | --- | --- | --- |"]
        for r in report["restarts"]:
            frac = r["served"] / max(1, r["acknowledged"])
            lines.append(f"| {r['test']} | {r['acknowledged']} | {r['served']} | {frac:.0%} | {r['wrong']} |")
    if report["fuzz"]:
        lines += ["", "## Fuzz cases", ""]
        cases: dict[str, int] = {}
        for f in report["fuzz"]:
            for k, v in f["cases"].items():
                cases[k] = cases.get(k, 0) + v
        lines += [f"- {k}: {v}" for k, v in sorted(cases.items())]
    if report["failed_tests"]:
        lines += ["", "## Failed tests", ""] + [f"- {t}" for t in report["failed_tests"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", required=True)
    ap.add_argument("--junit", required=True)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    report = summarise(load(args.log), junit_counts(args.junit))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reliability.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(args.out, "reliability.md"), "w") as f:
        f.write(text)
    print(text)
    t = report["totals"]
    if t["wrong_tokens"] or t["failed_requests"] or t["server_crashes"] or t["tests_failed"]:
        raise SystemExit("reliability run found problems (see the report)")


if __name__ == "__main__":
    main()
