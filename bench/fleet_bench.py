"""A small fleet behind a round-robin proxy, driven by vLLM's own benchmark client: with Membrain and without.

    python bench/fleet_bench.py [--json bench/results/fleet.json] [--runs 2]

Two OpenAI servers of one random-weight model, one core each (VLLM_CPU_OMP_THREADS_BIND), sit behind
bench/rr_proxy.py. `vllm.benchmarks.serve` sends the prefix_repetition dataset (by default 8 prefixes of
2048 tokens, 32 requests, 1 per second, Poisson arrivals from a fixed seed) through the proxy. The plain
arm is the same fleet with vLLM's own prefix caching only; the Membrain arm adds one shared
`membrain serve`. Arms alternate within each run (plain first in odd runs, Membrain first in even ones)
and each starts from empty caches, so both see the same requests in the same order.

Reported per run: the client's mean/p90/p99 TTFT per arm and their ratios (plain / Membrain: above 1
means Membrain is faster), and, from the proxy's per-request log, each request classified as the first
sight of its prefix in the fleet ("cold"), a prefix this instance served before ("local"), or one only
the other instance served before ("remote": a Membrain hit in the Membrain arm, a recompute in the plain
arm). The ratio "remote hit / local hit" compares medians of proxy-measured TTFT within the Membrain arm.

The default model is KV-heavy for its compute (8 layers, hidden 512, 8 KV heads, bf16: 16 KiB of KV per
token, a 2048-token prefix is 32 MiB), the shape where loads must be fast for Membrain to pay.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

import provenance  # bench/, beside this script
from arg_types import json_output, nice_value, positive_float, positive_int
from engine_metrics import histogram_mean_ms, total
from proc_profile import ProcessProfile

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing import tinymodel
from membrain_async.testing.openai_server import OpenAIServer

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = {"layers": 8, "hidden": 512, "heads": 8, "kv_heads": 8, "intermediate": 1536, "vocab_size": 1024}
BLOCK = 64

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_engine(model: str, core: int, membrain_url: str | None, logs: str, name: str,
                 max_len: int, dtype: str) -> OpenAIServer:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": str(core), "PYTHONUNBUFFERED": "1"})
    if membrain_url:
        env.update({"VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": membrain_url,
                    "VLLM_MEMBRAIN_NAMESPACE": "fleet"})
    return OpenAIServer(model, free_port(), env, os.path.join(logs, f"{name}.log"),
                        ["--served-model-name", "fleet", "--dtype", dtype, "--enforce-eager", "--block-size",
                         str(BLOCK), "--max-model-len", str(max_len), "--seed", "0"])


def wait_healthy(url: str, proc: subprocess.Popen, log: str, timeout: float = 60) -> None:
    """The proxy's /health (it answers once the backends do)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n" + open(log).read()[-3000:])
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def warm_up(url: str, seed: int) -> None:
    """One short request of its own per instance, so one-time start-up costs are not in the figures."""
    r = httpx.post(f"{url}/v1/completions", timeout=300, json={
        "model": "fleet", "prompt": tinymodel.prompt_words(300, seed=1000 + seed), "max_tokens": 4,
        "temperature": 0})
    r.raise_for_status()


def classify(log_lines: list[dict]) -> list[dict]:
    """cold / local / remote per request, in the order the proxy received them."""
    seen: dict[str, set[int]] = {}
    out = []
    for rec in sorted(log_lines, key=lambda r: r["order"]):
        where = seen.setdefault(rec["prefix"], set())
        kind = "cold" if not where else ("local" if rec["backend"] in where else "remote")
        where.add(rec["backend"])
        out.append({**rec, "kind": kind})
    return out


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_arm(arm: str, model: str, a: argparse.Namespace, logs: str, run: int) -> dict:
    server = proxy = None
    engines: list[OpenAIServer] = []
    try:
        if arm == "membrain":
            server = start_subprocess_server({"port": 0, "capacity": "4GiB"},
                                             log_path=os.path.join(logs, f"{arm}-server.log"))
            if a.server_nice:  # an operator's choice on a host whose cores are all vLLM's
                try:
                    os.setpriority(os.PRIO_PROCESS, server.process.pid, a.server_nice)
                except PermissionError:
                    raise SystemExit(f"--server-nice {a.server_nice}: not permitted (below 0 needs CAP_SYS_NICE)")
        max_len = a.prefix_len + a.suffix_len + a.output_len + 64
        engines = [start_engine(model, core, server.url if server else None, logs, f"{arm}-{core}", max_len, a.dtype)
                   for core in (0, 1)]
        for i, api in enumerate(engines):
            api.wait_ready()
            warm_up(api.url, i)
        proxy_port, proxy_log = free_port(), os.path.join(logs, f"{arm}-proxy.jsonl")
        proxy = subprocess.Popen([sys.executable, os.path.join(HERE, "rr_proxy.py"), "--port", str(proxy_port),
                                  "--log", proxy_log, *sum((["--backend", api.url] for api in engines), [])],
                                 stdout=open(os.path.join(logs, f"{arm}-proxy.log"), "w"), stderr=subprocess.STDOUT)
        wait_healthy(f"http://127.0.0.1:{proxy_port}", proxy, os.path.join(logs, f"{arm}-proxy.log"))
        result_name = f"{arm}-client.json"
        profile = ProcessProfile(a.profile or logs, f"run{run}-{arm}")
        for core, api in enumerate(engines):
            profile.watch(f"engine{core}", api.proc.pid, sample=bool(a.profile))
        if server is not None:
            profile.watch("server", server.process.pid)
        profile.watch("proxy", proxy.pid)
        with profile:
            client = subprocess.run(
                [sys.executable, os.path.join(HERE, "vllm_client.py"), "--backend", "vllm", "--base-url", f"http://127.0.0.1:{proxy_port}",
                 "--endpoint", "/v1/completions", "--model", "fleet", "--tokenizer", model,
                 "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(a.prefix_len),
                 "--prefix-repetition-suffix-len", str(a.suffix_len),
                 "--prefix-repetition-num-prefixes", str(a.num_prefixes),
                 "--prefix-repetition-output-len", str(a.output_len), "--num-prompts", str(a.num_prompts),
                 "--request-rate", str(a.rate), "--seed", str(a.seed), "--ignore-eos", "--temperature", "0",
                 "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,90,99",
                 "--save-result", "--save-detailed", "--result-dir", logs, "--result-filename", result_name],
                capture_output=True, text=True, timeout=1800)
        if client.returncode != 0:
            raise RuntimeError(f"bench client failed:\n{client.stdout[-3000:]}\n{client.stderr[-3000:]}")
        with open(os.path.join(logs, result_name)) as f:
            res = json.load(f)
        # vLLM's own time to first token (from the request's arrival in the engine), to tell time spent inside
        # the engine from time spent in the API servers and the proxy; and the lookups' round trip and wait.
        texts = [httpx.get(f"{api.url}/metrics", timeout=10).text for api in engines]
        engine_side = {f"{key}_mean_ms": mean for key, name in (
            ("engine_ttft", "vllm:time_to_first_token_seconds"), ("lookup_rtt", "vllm:membrain_lookup_rtt_seconds"),
            ("lookup_wait", "vllm:membrain_lookup_seconds")) if (mean := histogram_mean_ms(texts, name)) is not None}
        if server is not None:  # the connector's own account of its copies, from each engine's /metrics
            connector = {name: total(texts, f"vllm:membrain_{name}")
                         for name in ("save_copy_seconds_sum", "save_copy_seconds_count", "saved_bytes_total",
                                      "host_buffers_allocated_total", "loaded_bytes_total", "load_seconds_sum")}
        stop(proxy)  # the proxy writes each request's line as its response ends
        with open(proxy_log) as f:
            reqs = classify([json.loads(line) for line in f if line.strip()])
        metrics = {}
        if server is not None:
            metrics = httpx.get(f"{server.url}/v1/stats", timeout=10).json()
        out = {k: res.get(k) for k in ("completed", "failed", "duration", "mean_ttft_ms", "median_ttft_ms",
                                       "p90_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "p99_itl_ms",
                                       "request_throughput", "output_throughput")}
        out["cpu"] = profile.summary
        out["engine_side"] = engine_side
        if server is not None:
            out["connector"] = connector
        out["requests"] = [{k: r[k] for k in ("order", "backend", "kind", "proxy_ttft_s")} for r in reqs]
        for kind in ("cold", "local", "remote"):
            xs = [r["proxy_ttft_s"] for r in reqs if r["kind"] == kind and r["proxy_ttft_s"] is not None]
            out[f"{kind}_n"] = len(xs)
            out[f"{kind}_median_ttft_s"] = median(xs)
        if metrics:
            out["server_stats"] = {"keys": metrics.get("keys"), "bytes_in": metrics.get("bytes_in"),
                                   "bytes_out": metrics.get("bytes_out"),
                                   "ram_hits": metrics.get("tiers", {}).get("ram", {}).get("hits")}
        return out
    finally:
        if proxy is not None:
            stop(proxy)
        for api in engines:
            api.stop()
        if server is not None:
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=json_output, default=os.path.join(HERE, "results", "fleet.json"))
    p.add_argument("--runs", type=positive_int, default=2)
    p.add_argument("--num-prefixes", type=positive_int, default=8)
    p.add_argument("--prefix-len", type=positive_int, default=2048)
    p.add_argument("--suffix-len", type=positive_int, default=64)
    p.add_argument("--output-len", type=positive_int, default=32)
    p.add_argument("--num-prompts", type=positive_int, default=32)
    p.add_argument("--rate", type=positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=tinymodel.compute_dtype(),
                   help="the engines' dtype (default: bfloat16 where the CPU has bf16 instructions, else float32)")
    p.add_argument("--server-nice", type=nice_value, default=0,
                   help="the Membrain server's nice value (default 0, as started; below 0 needs privilege)")
    p.add_argument("--profile", metavar="DIR",
                   help="sample each engine core with py-spy (--native --threads) into DIR; CPU seconds per "
                        "process and thread are recorded either way")
    for k, v in MODEL.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=positive_int, default=v)
    a = p.parse_args()
    if a.profile:
        try:
            os.makedirs(a.profile, exist_ok=True)
        except OSError as exc:
            p.error(f"--profile {a.profile}: {exc.strerror}")
    shape = {k: getattr(a, k) for k in MODEL}
    started = provenance.utc_now()
    with tempfile.TemporaryDirectory(prefix="membrain-fleet-") as tmp:
        model = str(tinymodel.generate(os.path.join(tmp, "model"), max_positions=8192, **shape))
        runs = []
        for i in range(a.runs):
            order = ("plain", "membrain") if i % 2 == 0 else ("membrain", "plain")
            arms = {}
            for arm in order:
                logs = os.path.join(a.profile or tmp, f"run{i}")  # kept with the profiles
                os.makedirs(logs, exist_ok=True)
                arms[arm] = run_arm(arm, model, a, logs, i)
                print(f"run {i} {arm}: mean TTFT {arms[arm]['mean_ttft_ms']:.0f} ms, p99 "
                      f"{arms[arm]['p99_ttft_ms']:.0f} ms; cold/local/remote medians "
                      f"{arms[arm]['cold_median_ttft_s']} / {arms[arm]['local_median_ttft_s']} / "
                      f"{arms[arm]['remote_median_ttft_s']} s", flush=True)
                if "connector" in arms[arm]:
                    print(f"    connector: {arms[arm]['connector']}", flush=True)
                for name, cpu in arms[arm]["cpu"].items():
                    print(f"    {name}: {cpu['cpu_s']:.1f} CPU-s {cpu.get('parts', '')}", flush=True)
            pl, mb = arms["plain"], arms["membrain"]
            ratios = {f"{m}_plain_over_membrain": pl[f"{m}_ttft_ms"] / mb[f"{m}_ttft_ms"]
                      for m in ("mean", "median", "p90", "p99")}
            if mb["remote_median_ttft_s"] and mb["local_median_ttft_s"]:
                ratios["remote_hit_over_local_hit"] = mb["remote_median_ttft_s"] / mb["local_median_ttft_s"]
            runs.append({"order": list(order), "arms": arms, "ratios": ratios})
            print(f"run {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
    out = {"bench": "fleet", "date": started, "commit": provenance.commit(), "server_nice": a.server_nice, "model": shape, "dtype": a.dtype, "block_size": BLOCK, "cpu": provenance.cpu_model(),
           "workload": {k: getattr(a, k) for k in ("num_prefixes", "prefix_len", "suffix_len", "output_len",
                                                    "num_prompts", "rate", "seed")},
           "aims": {"mean_plain_over_membrain": ">= 1.3", "p99": "membrain <= plain",
                    "remote_hit_over_local_hit": "<= 1.5"},
           "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
