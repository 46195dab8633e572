"""Which part of Membrain costs a no-reuse batch? Fresh engines, one at a time, on prompts nobody saw.

    python bench/no_reuse_parts.py [--arms off on dead nosave off on] [--json bench/results/no_reuse_parts.json]

Arms (each a fresh engine process, alone on the machine, 4 batches of 8 fresh 256-word prompts, 32 tokens):
- off: plain vLLM;
- on: Membrain against a live `membrain serve` (lookups, saves, uploads);
- dead: Membrain against an endpoint nothing listens on (lookups and the connector's per-step work; every
  call fails fast, so nothing is uploaded);
- nosave: Membrain against the live server with a 1-byte write-behind queue (lookups answered, every save
  dropped before its upload).
An arm may be named twice: instance-to-instance spread is part of what is measured. e2e_bench.py's no-reuse
stage measures the same cost as off/on pairs on two engines alive at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e_bench as eb  # noqa: E402
from arg_types import json_output  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=["off", "on", "dead", "nosave", "off", "on"],
                    choices=["off", "on", "dead", "nosave"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", type=json_output, default=None)
    args = ap.parse_args()
    from membrain_async.server.embed import start_subprocess_server
    from membrain_async.testing import tinymodel

    m = {**eb.MODEL, "layers": args.layers}
    model = str(tinymodel.generate(os.path.join(tempfile.gettempdir(), f"membrain-bench-model-{args.layers}l"),
                                   layers=args.layers, hidden=m["hidden"], heads=m["heads"], kv_heads=m["kv_heads"],
                                   intermediate=m["intermediate"], vocab_size=m["vocab_size"]))
    logs = tempfile.mkdtemp(prefix="membrain-no-reuse-parts-")
    server = start_subprocess_server({"port": 0, "capacity": "2GiB"})
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    base.update({"VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONUNBUFFERED": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    on = {**base, "VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": server.url}
    envs = {"off": base, "on": on, "dead": {**on, "VLLM_MEMBRAIN_ENDPOINT": "http://127.0.0.1:9"},
            "nosave": {**on, "VLLM_MEMBRAIN_WRITE_BEHIND_BYTES": "1"}}
    runs: list[dict] = []
    try:
        for i, arm in enumerate(args.arms):
            inst = eb.Instance(f"{arm}-{i}", model, envs[arm], logs, 1536)
            inst.ready()
            walls = []
            for r in range(args.rounds):
                prompts = [eb.words(256, seed=900_000 + 100_000 * i + r * 1000 + j) for j in range(8)]
                rep = inst.run(f"batch-{r}", prompts, max_tokens=32, batch=True, settle=1.0)
                walls.append(rep["wall_s"])
                print(f"{arm}-{i} batch {r}: {rep['wall_s']:.3f} s, lookup waits "
                      f"{rep['delta'].get('vllm:membrain_lookup_waits', 0):.0f}, "
                      f"uploaded {rep['delta'].get('vllm:membrain_uploaded_blocks', 0):.0f} blocks", flush=True)
            inst.stop()
            runs.append({"arm": arm, "instance": i, "walls_s": walls, "wall_median_s": statistics.median(walls)})
    finally:
        server.stop()
    off = statistics.median(r["wall_median_s"] for r in runs if r["arm"] == "off") if any(r["arm"] == "off" for r in runs) else None
    summary = {}
    for arm in dict.fromkeys(args.arms):
        med = statistics.median(r["wall_median_s"] for r in runs if r["arm"] == arm)
        summary[arm] = {"wall_median_s": med, "cost_pct_vs_off": 100 * (med / off - 1) if off else None}
        print(f"{arm}: median wall {med:.3f} s" + (f", {summary[arm]['cost_pct_vs_off']:+.1f} % vs off" if off else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "runs": runs, "summary": summary, "logs": logs}, f, indent=1)


if __name__ == "__main__":
    main()
