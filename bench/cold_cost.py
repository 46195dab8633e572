"""What a cold prefill costs with the connector on, and where that time goes: one instance, prompts back to back.

    python bench/cold_cost.py [--json bench/results/cold_cost.json] [--rounds 2] [--requests 8]

One OpenAI server of the fleet benchmark's model, its worker bound to core 0 (VLLM_CPU_OMP_THREADS_BIND), sends
distinct prompts of about 2000 tokens one after the other, the next as soon as the last one's response ends
(as a busy instance sees them: the previous prompt's saves are still uploading when the next one arrives). Arms,
alternating within each round, each a fresh engine:
- plain: vLLM's own prefix caching only;
- membrain: the connector on, one `membrain serve` (bound to core 1, beside vLLM's engine core and API server);
- membrain, no saves: the same as a pure consumer (VLLM_MEMBRAIN_ROLE=kv_consumer), so the lookups alone.

Reported per arm: the client's median time to first token; vLLM's own (from the request's arrival in the engine
to its first token, `vllm:time_to_first_token_seconds`); the lookup's round trip and the wait it caused
(`vllm:membrain_lookup_rtt_seconds`, `vllm:membrain_lookup_seconds`); and per request the CPU seconds of the
worker's main thread (the forward, and vLLM's busy wait for the next step) and of the server, with the main
thread's time runnable but off a CPU (/proc/<tid>/schedstat).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time

import httpx
import psutil

import provenance  # bench/, beside this script
from arg_types import json_output, positive_int
from engine_metrics import histogram_mean_ms
from proc_profile import _model_worker

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing import tinymodel
from membrain_async.testing.openai_server import OpenAIServer

MODEL = {"layers": 8, "hidden": 512, "heads": 8, "kv_heads": 8, "intermediate": 1536, "vocab_size": 1024}
ARMS = {"plain": None, "membrain": "kv_both", "membrain, no saves": "kv_consumer"}
HISTOGRAMS = {"engine_ttft_ms": "vllm:time_to_first_token_seconds", "lookup_rtt_ms": "vllm:membrain_lookup_rtt_seconds",
              "lookup_wait_ms": "vllm:membrain_lookup_seconds", "save_copy_ms": "vllm:membrain_save_copy_seconds"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_token_s(url: str, prompt: str) -> float:
    t0 = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/v1/completions", timeout=300, json={
            "model": "m", "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():  # read to the end: the next prompt goes when this response is over
            if first is None and line.startswith("data:"):
                first = time.perf_counter() - t0
    return first


def histogram_means(text: str) -> dict[str, float | None]:
    return {key: histogram_mean_ms([text], name) for key, name in HISTOGRAMS.items()}


def schedstat(pid: int, tid: int) -> tuple[float, float]:
    """Seconds on a CPU and seconds runnable but waiting for one."""
    run_ns, wait_ns, _ = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def run_arm(arm: str, model: str, a: argparse.Namespace, logs: str, seed: int) -> dict:
    role = ARMS[arm]
    server = None
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0", "PYTHONUNBUFFERED": "1"})
    if role:
        server = start_subprocess_server({"port": 0, "capacity": "4GiB"}, log_path=os.path.join(logs, "server.log"))
        os.sched_setaffinity(server.process.pid, {1})
        env.update({"VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": server.url, "VLLM_MEMBRAIN_NAMESPACE": "cold",
                    "VLLM_MEMBRAIN_ROLE": role})
    api = OpenAIServer(model, free_port(), env, os.path.join(logs, f"{role or 'plain'}.log"),
                       ["--served-model-name", "m", "--dtype", a.dtype, "--enforce-eager", "--block-size", "64",
                        "--max-model-len", "4096", "--seed", "0"])
    try:
        api.wait_ready()
        first_token_s(api.url, tinymodel.prompt_words(300, seed=10_000 + seed))  # one-time costs, not timed
        worker = _model_worker(api.proc.pid)
        srv = psutil.Process(server.process.pid) if server else None
        run0, wait0 = schedstat(worker.pid, worker.pid)
        srv0 = sum(srv.cpu_times()[:2]) if srv else 0.0
        ttfts = [first_token_s(api.url, tinymodel.prompt_words(a.words, seed=seed + i)) for i in range(a.requests)]
        run1, wait1 = schedstat(worker.pid, worker.pid)
        srv1 = sum(srv.cpu_times()[:2]) if srv else 0.0
        metrics = histogram_means(httpx.get(f"{api.url}/metrics", timeout=10).text)
        n = a.requests
        return {"ttft_ms": [round(t * 1000, 1) for t in ttfts], "median_ttft_ms": round(statistics.median(ttfts) * 1000, 1),
                **metrics, "worker_thread_cpu_ms_per_request": round((run1 - run0) / n * 1000, 1),
                "worker_thread_waiting_ms_per_request": round((wait1 - wait0) / n * 1000, 1),
                "server_cpu_ms_per_request": round((srv1 - srv0) / n * 1000, 1) if srv else None}
    finally:
        api.stop()
        if server is not None:
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=json_output, default=None)
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--requests", type=positive_int, default=8, help="prompts per arm and round")
    p.add_argument("--words", type=positive_int, default=1400, help="words per prompt (about 2000 tokens)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=tinymodel.compute_dtype())
    a = p.parse_args()
    if a.json and not os.access(os.path.dirname(os.path.abspath(a.json)), os.W_OK):
        p.error(f"--json {a.json}: its directory is not writable")  # found now, not after the runs
    if (os.cpu_count() or 1) < 2:
        p.error("needs two cores: the worker is bound to core 0 and the server to core 1")
    started = provenance.utc_now()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="membrain-cold-") as tmp:
        model = str(tinymodel.generate(os.path.join(tmp, "model"), max_positions=8192, **MODEL))
        seed = 0
        for r in range(a.rounds):
            arms = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
            result = {}
            for arm in arms:
                seed += 1000  # fresh prompts for every arm: nothing is ever stored or cached before it is asked
                result[arm] = run_arm(arm, model, a, tmp, seed)
                print(f"round {r} {arm}: median TTFT {result[arm]['median_ttft_ms']} ms, vLLM's "
                      f"{result[arm]['engine_ttft_ms']} ms, lookup wait {result[arm]['lookup_wait_ms']} ms", flush=True)
            rounds.append({"order": arms, "arms": result})
    out = {"bench": "cold_cost", "date": started, "commit": provenance.commit(), "cpu": provenance.cpu_model(),
           "model": MODEL, "dtype": a.dtype, "block_size": 64, "requests": a.requests, "words": a.words, "rounds": rounds}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
