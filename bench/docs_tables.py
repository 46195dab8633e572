"""The benchmark tables of docs/benchmarks.md, generated from the committed JSON in bench/results.

Each table sits in the page between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`; the prose
around them is written by hand. Every table names its source file with the date and commit the run recorded;
files of older runs, whose scripts wrote neither, carry the commit that wrote them (from git, marked
`recorded_from`), and the table says so.

    python bench/docs_tables.py            rewrite docs/benchmarks.md from bench/results/*.json
    python bench/docs_tables.py --check    exit 1 if the page differs from what the JSON gives

tests/unit/test_docs.py runs the check, so a rerun benchmark whose JSON is committed without the page fails CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
PAGE = os.path.join(ROOT, "docs", "benchmarks.md")

NOT_RECORDED = "not recorded"


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def recorded(doc: dict) -> tuple[str, str]:
    """(date, commit) as the run wrote them; a file of several runs gives the range of its runs' dates."""
    date = doc.get("date") or doc.get("when")
    commit = doc.get("commit")
    runs = doc.get("runs")
    if date is None and isinstance(runs, list) and runs and all(isinstance(r, dict) and r.get("date") for r in runs):
        dates = sorted(r["date"] for r in runs)
        date = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
        commits = sorted({r.get("commit") or NOT_RECORDED for r in runs})
        commit = ", ".join(commits)
    return (date or NOT_RECORDED, commit or NOT_RECORDED)


def present(*names: str) -> list[str]:
    """The named result files that exist (a benchmark repeated later writes a second file beside the first)."""
    return [n for n in names if os.path.exists(os.path.join(RESULTS, n))]


def source(*names: str) -> str:
    parts = []
    for name in names:
        doc = load(name)
        date, commit = recorded(doc)
        # Older runs recorded neither: their files carry the commit that wrote them, from git, and say so.
        origin = "; from git, the run recorded none" if doc.get("recorded_from") else ""
        parts.append(f"`bench/results/{name}` (date: {date}; commit: {commit}{origin})")
    return "Source: " + ", ".join(parts) + "."


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def f2(x: float) -> str:
    return f"{x:.2f}"


def runs_index() -> str:
    rows = []
    for name in sorted(n for n in os.listdir(RESULTS) if n.endswith(".json")):
        date, commit = recorded(load(name))
        rows.append([f"`{name}`", date, commit])
    return table(["file", "date", "commit"], rows)


def e2e_ttft() -> str:
    runs = present("e2e.json", "e2e_prefault.json", "e2e_ttft_repeats.json", "e2e_ttft_sample_loopback.json",
                   "e2e_ttft_direct.json", "e2e_ttft_xeon.json")
    return "\n\n".join(_e2e_ttft(name) for name in runs)


def _e2e_ttft(name: str) -> str:
    doc = load(name)
    rows = []
    for r in doc["ttft"]:
        loopback = r.get("warm_over_loopback_limit")
        load_rate = r.get("load_gbps")
        rows.append([
            f"{r['prefix_tokens']}",
            f"{r.get('repeats', 1)}",
            f"{r['cold_ttft_s']:.2f} s",
            f"{r['cold_with_connector_ttft_s'] / r['cold_ttft_s']:.2f}×",
            f"{r['warm_ttft_s']:.3f} s",
            f"{r['speedup']:.1f}×",
            f"{r['local_hit_ttft_s']:.3f} s",
            "-" if loopback is None else f2(loopback),
            f2(r["warm_over_limit"]),
            f"{r['loaded_bytes'] / 1e6:.0f}",
            "-" if load_rate is None else f"{load_rate:.2f} ({r['load_over_loopback']:.2f}×)",
            ("yes" if r.get("tokens_equal") else "no") + (
                "" if "prefix_cache_equals_cold" not in r
                else f" (vLLM's own prefix cache = cold on {r['prefix_cache_equals_cold']}/{r.get('repeats', 1)})"),
        ])
    header = ["prefix tokens", "prompts", "cold, no Membrain", "cold cost of the connector", "warm via Membrain",
              "speed-up", "local prefix-cache hit", "warm / limit at loopback speed", "warm / limit at memcpy speed",
              "MB loaded", "load GB/s in the engine (× loopback)", "tokens equal"]
    per_sample = [s["loopback_gbps"] for r in doc["ttft"] for s in r.get("samples", []) if s.get("loopback_gbps")]
    if per_sample:  # measured again before every warm run; each sample's ratios use its own
        loopback_note = (f"loopback receive before each warm run {min(per_sample):.2f}-{max(per_sample):.2f} GB/s "
                         f"(each sample's limit and load ratio use its own)")
    elif doc.get("ttft_loopback_gbps"):
        loopback_note = f"loopback receive {doc['ttft_loopback_gbps']:.2f} GB/s"
    else:
        loopback_note = None
    speeds = [f"memcpy {doc['ttft_memcpy_gbps']:.1f} GB/s" if doc.get("ttft_memcpy_gbps") else None, loopback_note]
    speeds = [x for x in speeds if x]
    note = f" Measured in the run: {', '.join(speeds)}." if speeds else ""
    return source(name) + note + "\n\n" + table(header, rows)


def e2e_sync_async() -> str:
    doc = load("ttft_8k_sync_async.json")
    rows = []
    for mode in ("sync", "async"):
        r = doc[mode]["ttft"][0]
        rows.append([mode, f"{r['prefix_tokens']}", f"{r['cold_ttft_s']:.1f} s",
                     f"{r['cold_with_connector_ttft_s']:.1f} s", f"{r['warm_ttft_s']:.3f} s",
                     f"{r['local_hit_ttft_s']:.3f} s"])
    header = ["load mode", "prefix tokens", "cold, no Membrain", "cold, connector on", "warm via Membrain",
              "local prefix-cache hit"]
    return source("ttft_8k_sync_async.json") + "\n\n" + table(header, rows)


def host(doc: dict) -> str:
    """The run's CPU in two words ("AMD EPYC", "Intel Xeon"), from what provenance recorded."""
    name = (doc.get("cpu") or "-").replace("(R)", "").split(" (")[0]
    return " ".join([w for w in name.split() if w != "Processor"][:2])


def e2e_no_reuse() -> str:
    files = [name for name in present("e2e.json", "e2e_no_reuse_repeat.json", "e2e_no_reuse_xeon.json",
                                      "e2e_no_reuse_xeon_repeat.json") if "no_reuse" in load(name)]
    rows = []
    for run, name in enumerate(files, 1):
        full = load(name)
        doc = full["no_reuse"]
        for workload in ("batch", "sequential"):
            w = doc[workload]
            rows.append([str(run), host(full), workload, f"{w['off_tokens_per_s_median']:.0f}",
                         f"{w['on_tokens_per_s_median']:.0f}", f"{w['overhead_pct_median_of_pairs']:.1f} %",
                         ", ".join(f"{p:.1f}" for p in w["overhead_pct_pairs"]) + " %"])
    header = ["run", "host", "workload", "tokens/s without", "tokens/s with", "cost (median of pairs)", "per pair"]
    return source(*files) + "\n\n" + table(header, rows)


def no_reuse_parts() -> str:
    files = present("no_reuse_parts.json", "no_reuse_parts_full_server.json")
    arms = [a for a in ("off", "noop", "on", "nosave", "dead") if any(a in load(n)["summary"] for n in files)]
    rows = []
    for name in files:
        doc = load(name)
        summary = doc["summary"]
        rows.append([doc["server_capacity"], str(len(doc["walls_s"]["off"]))]
                    + [f"{summary[a]['wall_median_s']:.3f} s ({summary[a]['cost_pct_vs_off']:+.1f} %)" if a in summary else "-"
                       for a in arms])
    header = ["server capacity", "rounds", *(f"{a}: wall (cost)" for a in arms)]
    return source(*files) + "\n\n" + table(header, rows)


def _stall_rows(doc: dict) -> list[list[str]]:
    """One row per arm and link rate: medians over the run's repeats."""
    links = doc.get("link", {})
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for r in doc["runs"]:
        groups.setdefault((r["arm"], r["rate"]), []).append(r)
    rows = []
    for (arm, rate), runs in groups.items():
        if rate is None:
            link = "-"
        else:
            measured = links.get(f"{rate:.0e}", {}).get("mb_per_s")  # keyed as the bench wrote the rate: "1e+08"
            nominal = f"{rate / 1e6:.0f} MB/s" if rate < 1e9 else f"{rate / 1e9:.0f} GB/s"
            link = nominal + (f" ({measured:.0f})" if measured else "")
        ttfts = [r["hit_ttft_median_s"] for r in runs if r["hit_ttft_median_s"] is not None]
        rows.append([
            arm, link, str(len(runs)),
            f"{statistics.median(r['gap_p50_ms'] for r in runs):.0f} ms",
            f"{statistics.median(r['gap_p99_ms'] for r in runs):.0f} ms",
            f"{statistics.median(r['gap_max_ms'] for r in runs):.0f} ms",
            f"{statistics.median(ttfts):.2f} s" if ttfts else "-",
        ])
    return rows


STALL_HEADER = ["arm", "link (measured MB/s)", "runs", "gap p50", "gap p99", "gap max", "hit TTFT (median)"]


def stall() -> str:
    return source("stall.json") + "\n\n" + table(STALL_HEADER, _stall_rows(load("stall.json")))


def stall_rework() -> str:
    parts = []
    for name in present("stall_local.json", "stall_default_shape.json", "stall_cheap_tail.json",
                        "stall_default_shape_repeat.json", "stall_cheap_tail_repeat.json"):
        parts.append(source(name) + "\n\n" + table(STALL_HEADER, _stall_rows(load(name))))
    return "\n\n".join(parts)


def datapath() -> str:
    after, before = load("datapath.json")["summary"], load("datapath_before.json")["summary"]
    labels = {"raw_socket": "raw socket + memcpy", "load": "load (receive into the KV pages, check)",
              "save": "save (gather, checksum, upload)"}
    rows = []
    for arm, label in labels.items():
        a, b = after[arm], before[arm]
        gil = a.get("gil_s_per_gb")
        rows.append([label, f"{a['gbps']:.2f} ({b['gbps']:.2f})",
                     f"{a.get('speed_vs_raw', 1.0):.2f} ({b.get('speed_vs_raw', 1.0):.2f})",
                     f"{a['cpu_s_per_gb']:.2f} ({b['cpu_s_per_gb']:.2f})",
                     f"{a.get('cpu_vs_raw', 1.0):.2f} ({b.get('cpu_vs_raw', 1.0):.2f})",
                     "-" if gil is None else f"{gil:.3f}"])
    header = ["arm", "GB/s (before)", "vs raw socket (before)", "CPU s per GB (before)", "CPU vs raw (before)",
              "GIL held s per GB"]
    return source("datapath.json", "datapath_before.json") + "\n\n" + table(header, rows)


def datapath_idle_engine() -> str:
    doc = load("datapath_idle_engine.json")
    summary = doc["summary"]
    rows = []
    for arm, label in (("raw_socket", "raw socket + memcpy"), ("load", "load (receive into the KV pages, check)")):
        a = summary[arm]
        rows.append([label, f"{a['wall_s'] * 1e3:.1f} ms", f"{a['gbps']:.2f}", f"{a.get('speed_vs_raw', 1.0):.2f}",
                     f"{a['loop_share']:.2f}"])
    return source("datapath_idle_engine.json") + "\n\n" + table(
        ["arm", f"{doc['config']['bytes_per_op'] / 1e6:.0f} MB in", "GB/s", "vs raw socket",
         "idle engine's progress (share of alone)"], rows)


def _store_rows(doc: dict, systems: list[str]) -> list[list[str]]:
    rows = []
    for cell in doc["cells"]:
        row = [f"{cell['size']} ×{cell['batch']}", str(cell["clients"])]
        for system in systems:
            s = cell["systems"].get(system)
            row.append(f"{s['put']:.2f} / {s['get']:.2f}" if s and "put" in s and "get" in s else "failed")
        rows.append(row)
    return rows


def store_redis() -> str:
    doc = load("store_arena_redis.json")
    header = ["payload", "clients", "raw put / get GB/s", "Membrain", "Redis"]
    lookup = doc["lookup64"]
    note = (f"64-key prefix lookup, p50 (p99): Membrain {lookup['membrain']['p50_ms']:.2f} ms "
            f"({lookup['membrain']['p99_ms']:.2f}), Redis pipelined EXISTS {lookup['redis']['p50_ms']:.2f} ms "
            f"({lookup['redis']['p99_ms']:.2f}).")
    return (source("store_arena_redis.json") + "\n\n"
            + table(header, _store_rows(doc, ["raw", "membrain", "redis"])) + "\n\n" + note)


def store_arena() -> str:
    before, after = load("store_arena_before.json"), load("store_arena_after.json")
    rows = []
    for b, a in zip(_store_rows(before, ["raw", "membrain"]), _store_rows(after, ["raw", "membrain"])):
        rows.append(b + a[2:])
    header = ["payload", "clients", "raw (before)", "Membrain before the arena", "raw (after)",
              "Membrain with the arena"]
    return source("store_arena_before.json", "store_arena_after.json") + "\n\n" + table(header, rows)


def trace_replay() -> str:
    doc = load("trace_replay.json")
    rows = []
    for r in doc["results"]:
        arms = r["arms"]
        lru, belady = arms["lru-sim"]["hit_ratio"], arms["belady-sim"]["hit_ratio"]
        adaptive = arms["membrain adaptive"]["hit_ratio"]
        gap = belady - lru
        redis = arms.get("redis", {}).get("hit_ratio")
        rows.append([
            r["trace"], f"{r['capacity_tokens'] // (1 << 20)}Mi tokens ({r['capacity_blocks']:,} blocks)",
            f"{lru:.3f}", f"{belady:.3f}", f"{arms['membrain lru']['hit_ratio']:.3f}", f"**{adaptive:.3f}**",
            f"{adaptive / lru:.2f}×", f"{(adaptive - lru) / gap:.0%}" if gap > 0 else "-",
            f"{arms['membrain lru']['prefill_tokens_saved'] / 1e6:.1f}M → "
            f"{arms['membrain adaptive']['prefill_tokens_saved'] / 1e6:.1f}M",
            f"{redis:.3f}" if redis is not None else "skipped",
        ])
    header = ["trace", "capacity", "LRU (sim)", "Belady (sim)", "server `lru`", "server `adaptive` (default)",
              "adaptive / LRU", "LRU→Belady gap closed", "prefill tokens saved, `lru` → `adaptive`",
              "Redis allkeys-lru"]
    return source("trace_replay.json") + "\n\n" + table(header, rows)


def policy_candidates() -> str:
    doc = load("policy_candidates.json")
    online = ["second-sight", "second-sight-16x", "s3-fifo", "w-tinylfu", "arc", "lfu-da", "lru-2", "freq-admit",
              "fresh-chain", "depth-bonus"]
    bounds = ["oracle-if-reused", "oracle-uses-left", "belady"]
    rows = []
    for r in doc["results"]:
        ratios = r["hit_ratio"]
        lru = ratios["lru"]
        best = max(online, key=lambda c: ratios[c])
        rows.append([r["trace"], r["capacity"], f"{lru:.3f}"]
                    + [f"**{ratios[c]:.3f}**" if c == best else f"{ratios[c]:.3f}" for c in online]
                    + [f"{ratios[c]:.3f} ({ratios[c] / lru:.2f}×)" for c in bounds])
    header = ["trace", "capacity", "lru", *online, *(f"{c} (bound)" for c in bounds)]
    return source("policy_candidates.json") + "\n\n" + table(header, rows)


def trace_shape() -> str:
    doc = load("policy_candidates.json")
    rows = []
    for name, s in doc["shape"].items():
        gaps = s["first_reuse_gap_blocks"]
        rows.append([name, f"{s['blocks']:,}", f"{s['distinct']:,}", f"{s['distinct_used_once'] / s['distinct']:.0%}",
                     f"{s['roots']:,} ({s['roots_requested_once'] / s['roots']:.0%})", f"{s['branching_blocks']:,}",
                     f"{s['infinite_cache_hit_ratio']:.3f}", f"{gaps['p25']:,} / {gaps['p50']:,} / {gaps['p75']:,}",
                     f"{s['put_used_again']['fresh']:.0%}" if s["put_used_again"]["fresh"] is not None else "-",
                     f"{s['put_used_again']['after_prefix']:.0%}"])
    header = ["trace", "blocks", "distinct", "distinct used once", "chain roots (requested once)",
              "blocks with 2+ successors", "infinite cache", "first reuse after (blocks; p25 / p50 / p75)",
              "new block used again: chain new from its root", "after a known prefix"]
    return source("policy_candidates.json") + "\n\n" + table(header, rows)


def admission_cost() -> str:
    doc = load("admission_cost.json")
    rows = [[f"`{policy}`", f"{r['admit_us']:.2f} µs", f"{r['touch_us']:.2f} µs"]
            for policy, r in doc["results"].items()]
    return source("admission_cost.json") + "\n\n" + table(["`--eviction`", "put (admit)", "lookup hit (touch)"], rows)


def put_ab() -> str:
    doc = load("trace_replay_put_ab.json")
    rows = []
    for i, run in enumerate(doc["runs"], 1):
        for r in run["results"]:
            adaptive, lru = r["arms"]["membrain adaptive"]["put_MBps"], r["arms"]["membrain lru"]["put_MBps"]
            rows.append([str(i), run["date"], run.get("commit") or NOT_RECORDED, r["trace"],
                         f"{adaptive:.0f} / {lru:.0f}", f"{adaptive / lru:.2f}×"])
    header = ["run", "date", "commit", "trace", "put MB/s, `adaptive` / `lru`", "ratio"]
    return source("trace_replay_put_ab.json") + "\n\n" + table(header, rows)


def cluster() -> str:
    doc = load("cluster.json")
    tp = doc["throughput"]
    rows = []
    for nodes in (1, 2, 4):
        row = [str(nodes)]
        for system in ("membrain", "redis-cluster", "mooncake"):
            t = tp.get(f"{system}@{nodes}")
            row.append(f"{t['put_gbps']:.2f} / {t['get_gbps']:.2f}" if t else "skipped")
        row.append(" / ".join(
            f"{tp[f'{s}@{nodes}']['lookup_p50_us']:.0f} ({tp[f'{s}@{nodes}']['lookup_p99_us']:.0f})"
            for s in ("membrain", "redis-cluster", "mooncake") if f"{s}@{nodes}" in tp))
        rows.append(row)
    header = ["nodes", "Membrain put / get GB/s", "Redis Cluster", "Mooncake",
              "lookup p50 (p99) µs, same order (present arms)"]
    loss = doc["node_loss"]
    loss_rows = [[name, f"{r['hit_rate_after']:.1%}",
                  f"{r['hit_rate_during_failover']:.1%}" if "hit_rate_during_failover" in r else "-"]
                 for name, r in loss.items()]
    return (source("cluster.json") + "\n\n" + table(header, rows) + "\n\nLosing one node of four:\n\n"
            + table(["store", "hit ratio after", "during failover"], loss_rows))


def mooncake_client() -> str:
    files = present("mooncake_client.json", "mooncake_client_repeat.json")
    labels = {"mooncake_client": "Mooncake through Membrain's client (`mooncake://`)",
              "mooncake_raw": "Mooncake's own API from registered buffers",
              "membrain_client": "a Membrain node through `MembrainClient`"}
    rows = []
    for run, name in enumerate(files, 1):
        doc = load(name)
        for key, label in labels.items():
            r = doc[key]
            lk = r["lookup_40_keys_us"]
            rows.append([str(run), label, f"{r['put_GBps']:.2f} GB/s", f"{r['get_GBps']:.2f} GB/s",
                         f"{lk['p50']:.0f} / {lk['p99']:.0f} µs"])
    return source(*files) + "\n\n" + table(["run", "path", "put", "get", "40-key lookup p50 / p99"], rows)


def fleet() -> str:
    files = present("fleet.json", "fleet_repeat.json", "fleet_engine_side.json", "fleet_server_nice.json",
                    "fleet_idle_rest.json", "fleet_unpinned.json", "fleet_unpinned_repeat.json", "fleet_wakeups.json",
                    "fleet_wakeups_off.json", "fleet_lookup_rest_10ms.json", "fleet_direct.json")
    rows = []
    runs = [(run, doc.get("server_nice", 0)) for doc in map(load, files) for run in doc["runs"]]
    for i, (run, nice) in enumerate(runs):
        label = f"{i + 1}" + (f" (server nice {nice})" if nice else "")
        for arm in run["order"]:
            m = run["arms"][arm]
            med = [m.get(f"{k}_median_ttft_s") for k in ("cold", "local", "remote")]
            engine = m.get("engine_side", {})  # runs before 2026-12-07 did not record it
            rows.append([label, arm, f"{m['mean_ttft_ms']:.0f} ms", f"{m['p90_ttft_ms']:.0f} ms",
                         f"{m['p99_ttft_ms']:.0f} ms",
                         " / ".join("-" if x is None else f"{x * 1000:.0f}" for x in med) + " ms",
                         f"{engine['engine_ttft_mean_ms']:.0f} ms" if "engine_ttft_mean_ms" in engine else "-",
                         f"{engine['lookup_wait_mean_ms']:.0f} ms" if "lookup_wait_mean_ms" in engine else "-"])
        r = run["ratios"]
        rows.append([label, "plain / Membrain", f2(r["mean_plain_over_membrain"]) + "x",
                     f2(r["p90_plain_over_membrain"]) + "x", f2(r["p99_plain_over_membrain"]) + "x",
                     "remote / local hit: " + (f2(r["remote_hit_over_local_hit"]) + "x"
                                              if "remote_hit_over_local_hit" in r else "-"), "", ""])
    return source(*files) + "\n\n" + table(
        ["run", "arm", "mean TTFT", "p90 TTFT", "p99 TTFT", "median TTFT cold / local / remote",
         "mean TTFT in vLLM", "lookup wait (mean)"], rows)


def cold_cost() -> str:
    doc = load("cold_cost.json")
    rows = []

    def ms(x) -> str:
        return "-" if x is None else f"{x:.0f} ms"

    for i, run in enumerate(doc["rounds"]):
        base = run["arms"]["plain"]["median_ttft_ms"]
        for arm in run["order"]:
            m = run["arms"][arm]
            rows.append([str(i + 1), arm, ms(m["median_ttft_ms"]), f2(m["median_ttft_ms"] / base) + "x",
                         ms(m["engine_ttft_ms"]), ms(m["lookup_rtt_ms"]), ms(m["lookup_wait_ms"]),
                         ms(m["save_copy_ms"]), ms(m["worker_thread_cpu_ms_per_request"]),
                         ms(m["worker_thread_waiting_ms_per_request"]), ms(m["server_cpu_ms_per_request"])])
    return source("cold_cost.json") + "\n\n" + table(
        ["round", "arm", "TTFT (client, median)", "vs plain", "TTFT in vLLM (mean)", "lookup round trip",
         "lookup wait", "save gather", "worker main thread CPU / request", "worker main thread runnable, off CPU / request",
         "server CPU / request"], rows)


def put() -> str:
    files = present("put.json", "put_repeat.json", "put_warm_client.json")
    rows = []
    for run, (name, cell) in ((i + 1, c) for i, f in enumerate(files) for c in load(f)["cells"].items()):
        rounds = cell["rounds"]
        rows.append([str(run), name.replace("_x", " x "), f"{statistics.median(r['raw_GBps'] for r in rounds):.2f} GB/s",
                     f"{statistics.median(r['membrain_GBps'] for r in rounds):.2f} GB/s",
                     f2(cell["median_ratio"]) + "x", ", ".join(f2(r["ratio"]) for r in rounds)])
    return source(*files) + "\n\n" + table(
        ["run", "values per put", "raw socket", "Membrain", "median ratio", "each round"], rows)


def put_parts() -> str:
    doc = load("put_parts.json")
    arms = ("raw", "server", "anyio", "anyio+deadline", "client")
    rows = []
    for size, cell in doc["cells"].items():
        med = cell["median"]
        rows.append([f"{int(size):,} B", *(f"{med[a]:.0f} µs" for a in arms), f"{cell['server_cost']:.0f} µs",
                     f"{cell['client_cost']:.0f} µs", f"{cell['deadline_cost']:.0f} µs", f2(cell["client_vs_raw"]) + "x"])
    return source("put_parts.json") + "\n\n" + table(
        ["value", "raw", "blocking client → server", "sockio on the loop", "sockio + fail_after", "MembrainClient",
         "server − raw", "client − server", "fail_after", "raw / client"], rows)


def disk() -> str:
    parts = []
    for name in ("disk.json", "disk_10gib.json"):
        doc = load(name)
        m, raw, reopen = doc["membrain"], doc["raw_after"], doc["reopen"]
        rows = [
            ["write / put", f"{raw['write_gbs']:.2f} GB/s", f"{m['put_gbs']:.2f} GB/s", f"{m['put_x_raw_write']:.2f}×"],
            ["read / get, one request at a time", f"{raw['read_gbs']:.2f} GB/s", f"{m['get_gbs']:.2f} GB/s",
             f"{m['get_x_raw_read']:.2f}×"],
            ["read / get, 4 requests in flight", f"{raw['read_gbs']:.2f} GB/s", f"{m['get4_gbs']:.2f} GB/s",
             f"{m['get4_x_raw_read']:.2f}×"],
            [f"reopen {reopen['bytes_on_disk'] / (1 << 30):.2f} GiB: hint files / scanning every header", "",
             f"{reopen['seconds']:.3f} s / {reopen['scan_seconds']:.2f} s", ""],
        ]
        parts.append(source(name) + "\n\n" + table(["", "raw (`dd`, O_DIRECT)", "Membrain disk tier", "ratio"], rows))
    return "\n\n".join(parts)


def lookup() -> str:
    doc = load("lookup.json")
    rows = []
    for phase in ("idle", "saving", "saving+engine"):
        p = doc[phase]
        rows.append([phase, f"{p['p50_ms']:.1f} ms", f"{p['p99_ms']:.1f} ms", f"{p['lookups_per_s']:.0f}",
                     f"{p['upload_MBps']:.0f}"])
    return source("lookup.json") + "\n\n" + table(["phase", "lookup p50", "p99", "lookups/s", "uploads MB/s"], rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "runs": runs_index,
    "e2e-ttft": e2e_ttft,
    "e2e-sync-async": e2e_sync_async,
    "e2e-no-reuse": e2e_no_reuse,
    "no-reuse-parts": no_reuse_parts,
    "stall": stall,
    "stall-rework": stall_rework,
    "datapath": datapath,
    "datapath-idle-engine": datapath_idle_engine,
    "store-redis": store_redis,
    "store-arena": store_arena,
    "trace-replay": trace_replay,
    "policy-candidates": policy_candidates,
    "trace-shape": trace_shape,
    "admission-cost": admission_cost,
    "put-ab": put_ab,
    "cluster": cluster,
    "mooncake-client": mooncake_client,
    "disk": disk,
    "fleet": fleet,
    "put": put,
    "put-parts": put_parts,
    "cold-cost": cold_cost,
    "lookup": lookup,
}

_MARKED = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n).*?(<!-- end generated: (?P=name) -->)", re.S)


def render(page: str) -> str:
    """The page with every marked section replaced by its table; a marker naming no table is an error."""
    seen = set()

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in SECTIONS:
            raise KeyError(f"docs/benchmarks.md marks a table '{name}' that bench/docs_tables.py does not make")
        seen.add(name)
        return m.group(1) + SECTIONS[name]() + "\n" + m.group(3)

    out = _MARKED.sub(fill, page)
    missing = set(SECTIONS) - seen
    if missing:
        raise KeyError(f"docs/benchmarks.md has no markers for: {', '.join(sorted(missing))}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is not up to date")
    args = ap.parse_args()
    with open(PAGE) as f:
        page = f.read()
    new = render(page)
    if args.check:
        if new != page:
            print("docs/benchmarks.md is out of date: run python bench/docs_tables.py", file=sys.stderr)
            return 1
        return 0
    if new != page:
        with open(PAGE, "w") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
