"""The Membrain demo: two vLLM instances share a long prompt prefix through an embedded Membrain server.

    python examples/demo.py            (or: nox -s demo)

1. generates a small random-weight Llama model locally (no downloads),
2. starts a Membrain server in a subprocess,
3. runs vLLM instance A (its own process) on prompts that share a long prefix: it computes them and saves
   their KV blocks to Membrain,
4. runs vLLM instance B (another process, empty local cache) on the same prompts: it loads the blocks,
5. prints cold and warm time to first token, hit tokens, bytes moved, and whether B's greedy outputs equal
   A's token for token.

Each instance first runs a short unrelated prompt, untimed, so that no timed request carries the engine's
one-time warm-up. The model (8 layers, hidden 1024) and the ~5000-token prefix make a cold prefill cost seconds
on a 2-core CPU; the whole demo takes a few minutes there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing import tinymodel

ENGINE = {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 8192, "seed": 0}
# Big enough that a long prefill costs seconds on a 2-core CPU (where Membrain's load is a fraction of a
# second), small enough that generating it and starting two engines keeps the demo within a few minutes.
MODEL = {"layers": 8, "hidden": 1024, "heads": 8, "kv_heads": 2, "vocab_size": 2048}
PREFIX_WORDS, SUFFIX_WORDS = 5000, 30


def step(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


class Ticker:
    """Shows that a long step is alive: elapsed seconds on one line."""

    def __init__(self, label: str):
        self.label, self.t0, self._stop = label, time.monotonic(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            print(f"\r      {self.label} ... {time.monotonic() - self.t0:4.0f} s", end="", flush=True)

    def __enter__(self):
        if sys.stdout.isatty():
            self._thread.start()
        else:
            print(f"      {self.label} ...", flush=True)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        print(f"\r      {self.label}: done in {time.monotonic() - self.t0:.0f} s   ", flush=True)


def run_instance(name: str, model: str, prompts: list[str], warmup: str, url: str, workdir: str, max_tokens: int,
                 load_mode: str | None, repeat: bool = False) -> list[dict]:
    """Run the prompts in a fresh vLLM process; with `repeat`, a second time (hitting vLLM's own prefix cache).

    A short unrelated `warmup` prompt goes first and is not timed: an engine's first request pays one-time
    costs (kernel selection, first allocations, the first connection to Membrain) that a serving instance has
    long paid. Returns the reports of the timed phases, with the counters counted from the end of the warm-up."""
    phase = {"prompts": [{"text": p} for p in prompts], "max_tokens": max_tokens, "settle_s": 1.0}
    spec = {
        "model": model,
        "engine": ENGINE,
        "phases": [{"name": name + "-warmup", "prompts": [{"text": warmup}], "max_tokens": max_tokens, "settle_s": 0.5},
                   {"name": name, **phase}] + ([{"name": name + "-repeat", **phase}] if repeat else []),
    }
    spec_path = os.path.join(workdir, f"{name}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    env.update(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=url, VLLM_MEMBRAIN_NAMESPACE="demo", PYTHONUNBUFFERED="1")
    if load_mode:
        env["VLLM_MEMBRAIN_LOAD_MODE"] = load_mode
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    log_path = os.path.join(workdir, f"{name}.log")
    with open(log_path, "w") as log, Ticker(f"vLLM instance {name} (start-up about 30 s on 2 cores, then the prompts)"):
        proc = subprocess.run([sys.executable, "-m", "membrain_async.testing.engine", spec_path],
                              stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    reports = []
    with open(log_path, "a") as log:
        for line in proc.stdout.splitlines():
            log.write(line + "\n")
            if line.startswith('{"phase"'):
                reports.append(json.loads(line))
    if proc.returncode != 0 or len(reports) != len(spec["phases"]):
        raise SystemExit(f"instance {name} failed (exit {proc.returncode}); see {log_path}")
    for line in proc.stdout.splitlines():
        if "Membrain: " in line:
            print("      " + line.split("] ", 1)[-1])
    warm, timed = reports[0], reports[1:]
    for r in timed:
        r["metrics"] = {k: v - warm["metrics"].get(k, 0) for k, v in r["metrics"].items() if isinstance(v, (int, float))}
    return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix-words", type=int, default=PREFIX_WORDS,
                    help="length of the shared prefix (about one token per word)")
    ap.add_argument("--layers", type=int, default=MODEL["layers"])
    ap.add_argument("--hidden", type=int, default=MODEL["hidden"])
    ap.add_argument("--load-mode", choices=["async", "sync"], default=None,
                    help="VLLM_MEMBRAIN_LOAD_MODE for both instances (default: the setting's default)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "membrain-demo"))
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    total = 5
    shape = {**MODEL, "layers": args.layers, "hidden": args.hidden, "intermediate": args.hidden * 4}
    step(1, total, f"generating a random-weight Llama model ({shape['layers']} layers, hidden {shape['hidden']}) ...")
    model = str(tinymodel.generate(os.path.join(args.workdir, "model"), **shape))
    prefix = tinymodel.prompt_words(args.prefix_words, seed=7)
    prompts = [prefix + " " + tinymodel.prompt_words(SUFFIX_WORDS, seed=100 + i) for i in range(2)]
    # One warm-up prompt per instance, each its own text: B must not find A's warm-up in Membrain.
    warmups = {n: tinymodel.prompt_words(200, seed=seed) for n, seed in (("A", 900), ("B", 901))}

    step(2, total, "starting an embedded Membrain server ...")
    srv = start_subprocess_server({"port": 0, "capacity": "1GiB"}, log_path=os.path.join(args.workdir, "server.log"))
    print(f"      {srv.url}")
    try:
        step(3, total, "instance A: cold, computes the prompts and saves their KV blocks to Membrain;\n"
                       "      then the same prompts again, from vLLM's own prefix cache (the reference for B)")
        a, a_local = run_instance("A", model, prompts, warmups["A"], srv.url, args.workdir, args.max_tokens,
                                  args.load_mode, repeat=True)
        step(4, total, "instance B: a new process with an empty cache, same prompts")
        (b,) = run_instance("B", model, prompts, warmups["B"], srv.url, args.workdir, args.max_tokens, args.load_mode)
    finally:
        srv.stop()

    step(5, total, "results")
    ra, rb = a["results"][0], b["results"][0]
    ma, mb = a["metrics"], b["metrics"]
    # vLLM with a prefix cache hit computes only the tail: the reference is vLLM's own prefix cache over the
    # same blocks. (A cold prefill of every token may round differently in bf16 and drift after a few
    # tokens on a random model; plain vLLM's local prefix cache drifts the same way.)
    same = [x["tokens"] == y["tokens"] for x, y in zip(a_local["results"], b["results"])]
    same_cold = [x["tokens"] == y["tokens"] for x, y in zip(a["results"], b["results"])]
    cold, warm = ra["ttft_s"], rb["ttft_s"]
    rows = [
        ("", "instance A (cold)", "instance B (warm)"),
        ("time to first token", f"{cold:.3f} s", f"{warm:.3f} s  ({cold / warm:.1f}x faster)"),
        ("  from vLLM's own prefix cache", f"{a_local['results'][0]['ttft_s']:.3f} s  (A's second pass)", ""),
        ("prompt tokens", str(ra["prompt_tokens"]), str(rb["prompt_tokens"])),
        ("tokens loaded from Membrain", str(ra["num_cached_tokens"]), str(rb["num_cached_tokens"])),
        ("bytes moved", f"saved {ma.get('vllm:membrain_saved_bytes', 0) / 1e6:.1f} MB",
         f"loaded {mb.get('vllm:membrain_loaded_bytes', 0) / 1e6:.1f} MB"),
        ("same tokens as vLLM's own prefix cache", "",
         f"{'yes' if all(same) else 'NO'} ({sum(same)}/{len(same)} prompts, token for token)"),
        ("same tokens as the cold run", "", f"{sum(same_cold)}/{len(same_cold)} prompts (bf16 rounding, see docs/index.md)"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for r in rows:
        print(("  " + "  ".join(c.ljust(w) for c, w in zip(r, width))).rstrip())
    print()
    if not all(same):
        raise SystemExit("outputs differ: this is a bug, please report it with the logs in " + args.workdir)


if __name__ == "__main__":
    main()
