"""Prefill/decode disaggregation through Membrain against two plain vLLM instances and two Membrain kv_both
instances, on the same requests from vLLM's own benchmark client (`vllm.benchmarks.serve`).

Arms (each: two vLLM OpenAI servers, a router in front, fresh processes and a fresh Membrain server):

  pd        prefill instance (kv_producer) + decode instance (kv_consumer), examples/pd_proxy.py in P/D mode
  plain     two plain vLLM instances (Membrain installed, not enabled), round robin
  kv_both   two Membrain kv_both instances sharing one store, round robin

Every arm gets the same dataset and seed, so the same prompts in the same order at the same rate; each
instance first serves a few untimed requests (first-request costs: kernel selection, first connection).
The JSON holds, per arm, the client's TTFT, ITL, TPOT and end-to-end latency (mean, median, p99), request
and output-token throughput, completed and failed requests, and the Membrain counters each instance
reported (hits, loads, saves, hand-off polls and timeouts), with the run's date, commit and settings.

    python bench/pd_bench.py --json bench/results/pd.json                      # defaults below
    python bench/pd_bench.py --num-prompts 8 --request-rate 1 --json /tmp/pd-smoke.json --arms pd plain

On a host with more cores, pin the two instances apart: --bind 0-7 8-15 (VLLM_CPU_OMP_THREADS_BIND).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import provenance  # noqa: E402  (bench/, beside this script)
from arg_types import json_output, positive_float, positive_int  # noqa: E402

from membrain_async.server.embed import start_subprocess_server  # noqa: E402
from membrain_async.testing import tinymodel  # noqa: E402
from membrain_async.testing.openai_server import OpenAIServer  # noqa: E402

ARMS = ("pd", "plain", "kv_both")
# What the JSON keeps of the client's result (it also holds every request's timings).
CLIENT_FIELDS = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
                 *(f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")))
COUNTERS = ("vllm:membrain_hit_tokens_total", "vllm:membrain_loaded_bytes_total", "vllm:membrain_saved_bytes_total",
            "vllm:membrain_uploaded_blocks_total", "vllm:membrain_handoff_polls_total",
            "vllm:membrain_handoff_timeouts_total", "vllm:membrain_dropped_saves_total",
            "vllm:prompt_tokens_total", "vllm:generation_tokens_total")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instance_env(arm: str, role: str, endpoint: str, bind: str | None, kv_cache_gib: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    env.update(PYTHONUNBUFFERED="1", VLLM_CPU_KVCACHE_SPACE=kv_cache_gib)
    if bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    if arm != "plain":
        env.update(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=endpoint, VLLM_MEMBRAIN_ROLE=role)
    return env


def warm_up(url: str, model: str, n: int) -> None:
    """Untimed requests straight to an instance: an engine's first requests pay one-time costs."""
    for i in range(n):
        r = httpx.post(f"{url}/v1/completions", timeout=600, json={
            "model": model, "prompt": tinymodel.prompt_words(64, seed=9000 + i), "max_tokens": 4, "temperature": 0})
        r.raise_for_status()


def run_arm(arm: str, args, model: str, out_dir: str) -> dict:
    srv = start_subprocess_server({"port": 0, "capacity": args.store_capacity})
    roles = {"pd": ("kv_producer", "kv_consumer"), "plain": ("", ""), "kv_both": ("kv_both", "kv_both")}[arm]
    binds = args.bind or [None, None]
    server_args = ["--dtype", "bfloat16", "--enforce-eager", "--block-size", str(args.block_size),
                   "--max-model-len", str(args.max_model_len), "--seed", "0"]
    instances = [OpenAIServer(model, free_port(), instance_env(arm, role, srv.url, bind, args.kv_cache_gib),
                              os.path.join(out_dir, f"{arm}-{i}.log"), server_args)
                 for i, (role, bind) in enumerate(zip(roles, binds))]
    router = None
    try:
        for api in instances:
            api.wait_ready()
            warm_up(api.url, model, args.warmup)
        port = free_port()
        routing = (["--prefill", instances[0].url, "--decode", instances[1].url] if arm == "pd"
                   else [arg for api in instances for arg in ("--instance", api.url)])
        router = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "pd_proxy.py"), "--port", str(port),
                                   *routing], stdout=open(os.path.join(out_dir, f"{arm}-router.log"), "w"),
                                  stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/health")
        before = [{c: api.counter(c) for c in COUNTERS} for api in instances]
        started = time.monotonic()
        client = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "vllm_client.py"), "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
             "--model", model, "--tokenizer", model, *dataset_args(args), "--num-prompts", str(args.num_prompts),
             "--request-rate", str(args.request_rate), "--seed", str(args.seed), "--ignore-eos",
             "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
             "--save-result", "--result-dir", out_dir, "--result-filename", f"{arm}-client.json"],
            capture_output=True, text=True, timeout=args.timeout)
        if client.returncode != 0:
            raise RuntimeError(f"{arm}: the benchmark client failed:\n{client.stdout[-3000:]}\n{client.stderr[-3000:]}")
        result = json.load(open(os.path.join(out_dir, f"{arm}-client.json")))
        counters = [{c: api.counter(c) - b[c] for c in COUNTERS} for api, b in zip(instances, before)]
        return {"arm": arm, "roles": list(roles), "wall_s": round(time.monotonic() - started, 2),
                "client": {k: result.get(k) for k in CLIENT_FIELDS},
                "instances": [{"role": r or "plain", "counters": c} for r, c in zip(roles, counters)]}
    finally:
        if router is not None:
            router.terminate()
            router.wait(30)
        for api in instances:
            api.stop()
        srv.stop()


def dataset_args(args) -> list[str]:
    if args.dataset == "random":
        return ["--dataset-name", "random", "--random-input-len", str(args.input_len),
                "--random-output-len", str(args.output_len)]
    return ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(args.prefix_len),
            "--prefix-repetition-suffix-len", str(args.input_len - args.prefix_len),
            "--prefix-repetition-num-prefixes", str(args.num_prefixes),
            "--prefix-repetition-output-len", str(args.output_len)]


def wait_http(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=json_output, default=os.path.join(ROOT, "bench", "results", "pd.json"))
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--model", help="a model directory (default: a generated random-weight Llama, --layers/--hidden)")
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--hidden", type=positive_int, default=512)
    p.add_argument("--dataset", choices=("random", "prefix_repetition"), default="random")
    p.add_argument("--input-len", type=positive_int, default=1024, help="prompt tokens (prefix + suffix for prefix_repetition)")
    p.add_argument("--prefix-len", type=positive_int, default=768)
    p.add_argument("--num-prefixes", type=positive_int, default=4)
    p.add_argument("--output-len", type=positive_int, default=64)
    p.add_argument("--num-prompts", type=positive_int, default=64)
    p.add_argument("--request-rate", type=positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per instance before each arm")
    p.add_argument("--block-size", type=positive_int, default=128)
    p.add_argument("--max-model-len", type=positive_int, default=4096)
    p.add_argument("--kv-cache-gib", default="2", help="VLLM_CPU_KVCACHE_SPACE per instance")
    p.add_argument("--store-capacity", default="2GiB")
    p.add_argument("--bind", nargs=2, metavar=("CPUS_A", "CPUS_B"), help="VLLM_CPU_OMP_THREADS_BIND per instance")
    p.add_argument("--timeout", type=positive_float, default=3600, help="seconds the client may take per arm")
    args = p.parse_args()
    if args.dataset == "prefix_repetition" and args.prefix_len >= args.input_len:
        p.error(f"--prefix-len ({args.prefix_len}) must be below --input-len ({args.input_len}): the rest is each prompt's own suffix")
    if args.model and not os.path.isdir(args.model):
        p.error(f"--model {args.model}: not a directory")

    work = tempfile.mkdtemp(prefix="pd-bench-")
    model = args.model or str(tinymodel.generate(os.path.join(work, "model"), layers=args.layers, hidden=args.hidden))
    arms = []
    for arm in args.arms:
        print(f"[pd_bench] {arm} ...", flush=True)
        arms.append(run_arm(arm, args, model, work))
        c = arms[-1]["client"]
        print(f"[pd_bench] {arm}: TTFT median {c['median_ttft_ms']:.1f} ms p99 {c['p99_ttft_ms']:.1f} ms, "
              f"ITL median {c['median_itl_ms']:.1f} ms p99 {c['p99_itl_ms']:.1f} ms, "
              f"{c['output_throughput']:.1f} output tok/s, {c['completed']} completed", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "arms")}
    report = {"date": provenance.utc_now(), "commit": provenance.commit(),
              "cpus": os.cpu_count(), "settings": settings, "logs": work, "arms": arms}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"[pd_bench] wrote {args.json} (engine logs in {work})")


if __name__ == "__main__":
    main()
