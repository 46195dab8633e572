"""Which part of Membrain costs a no-reuse batch? One engine per arm, all alive at once, on prompts nobody saw.

    python bench/no_reuse_parts.py [--arms off noop on nosave] [--rounds 8] [--server-capacity 6GiB]
                                   [--json bench/results/no_reuse_parts.json]

Arms (each an engine of e2e_bench.py's model; 8 fresh 256-word prompts a batch, 32 tokens each):
- off: plain vLLM;
- noop: plain vLLM with a KV connector that does nothing (membrain_async.testing.noop_connector): vLLM's
  own plumbing for any connector, none of Membrain's work;
- on: Membrain against a live `membrain serve` (lookups, saves, uploads);
- nosave: Membrain against the live server with a 1-byte write-behind queue (lookups answered, every save
  dropped before its upload);
- dead: Membrain against an endpoint nothing listens on (every call fails fast, nothing is uploaded).

Every round runs one batch on each engine (prompts of its own: no arm may hit what another saved), the
order turning by one each round, so each round's arms share
one moment of a noisy machine; an arm's cost is the median over rounds of its wall time over off's in the
same round. `--server-capacity` sizes the server: a fresh server maps and faults in new memory for every
value it stores until it is full, which a small one stops doing after a few rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e_bench as eb  # noqa: E402
import provenance  # noqa: E402
from arg_types import json_output, positive_int, size_text  # noqa: E402

ARMS = ("off", "noop", "on", "nosave", "dead")
NOOP = {"kv_connector": "NoopConnector", "kv_role": "kv_both",
        "kv_connector_module_path": "membrain_async.testing.noop_connector"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=["off", "noop", "on", "nosave"], choices=ARMS)
    ap.add_argument("--rounds", type=positive_int, default=8)
    ap.add_argument("--server-capacity", type=size_text, default="6GiB", help="the server's --capacity (default: as e2e_bench's)")
    ap.add_argument("--json", type=json_output, default=None)
    args = ap.parse_args()
    if "off" not in args.arms or len(set(args.arms)) != len(args.arms):
        ap.error("--arms names each arm once, off among them (every cost is against off)")
    from membrain_async.server.embed import start_subprocess_server
    from membrain_async.testing import tinymodel

    m = eb.MODEL
    model = str(tinymodel.generate(os.path.join(tempfile.gettempdir(), "membrain-bench-model"), layers=m["layers"],
                                   hidden=m["hidden"], heads=m["heads"], kv_heads=m["kv_heads"],
                                   intermediate=m["intermediate"], vocab_size=m["vocab_size"]))
    logs = tempfile.mkdtemp(prefix="membrain-no-reuse-parts-")
    server = start_subprocess_server({"port": 0, "capacity": args.server_capacity})
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    base.update({"VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONUNBUFFERED": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    on = {**base, "VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": server.url}
    envs = {"off": base, "noop": base, "on": on, "nosave": {**on, "VLLM_MEMBRAIN_WRITE_BEHIND_BYTES": "1"},
            "dead": {**on, "VLLM_MEMBRAIN_ENDPOINT": "http://127.0.0.1:9"}}
    out = {"bench": "no_reuse_parts", "date": provenance.utc_now(), "commit": provenance.commit(),
           "cpu": provenance.cpu_model(), "command": "python " + " ".join(sys.argv), "model": m,
           "server_capacity": args.server_capacity, "prompts": 8, "prompt_words": 256, "max_tokens": 32, "logs": logs}
    arms: list[eb.Instance] = []
    walls: dict[str, list[float]] = {name: [] for name in args.arms}
    try:
        arms = [eb.Instance(name, model, envs[name], logs, 2048, {"kv_transfer_config": NOOP} if name == "noop" else None)
                for name in args.arms]
        for arm in arms:
            arm.ready()
        for r in range(args.rounds):
            turn = r % len(arms)
            for arm in arms[turn:] + arms[:turn]:
                # New to every engine and to the server: an arm that looks up must not find what "on" saved.
                a = args.arms.index(arm.name)
                prompts = [eb.words(256, seed=900_000 + r * 1000 + a * 100 + j) for j in range(8)]
                rep = arm.run(f"batch-{r}", prompts, max_tokens=32, batch=True, settle=1.0)
                walls[arm.name].append(rep["wall_s"])
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in walls.items()), flush=True)
    finally:
        for arm in arms:
            arm.stop()
        server.stop()
    out["walls_s"] = {k: [round(x, 4) for x in v] for k, v in walls.items()}
    out["summary"] = {}
    for name, w in walls.items():
        ratios = [x / o for x, o in zip(w, walls["off"])]
        out["summary"][name] = {"wall_median_s": round(statistics.median(w), 4),
                                "cost_pct_vs_off": round(100 * (statistics.median(ratios) - 1), 1)}
    provenance.emit(out, args.json)


if __name__ == "__main__":
    main()
