"""What the admission policy adds to a put and to a lookup hit, in process (CPU only, no network).

    python bench/admission_cost.py [--json bench/results/admission_cost.json]

Times Store.admit (the put path's policy check) and Store.touch (a prefix-lookup hit) per policy over
64-character keys, best of 5 runs of 200,000 calls: the floor of what the policy costs, free of the
network's noise. Compare with a put's cost over loopback (bench/store_bench.py: ~30 us for 64 KiB).
"""

from __future__ import annotations

import argparse
import timeit

import orjson
import provenance  # bench/, beside this script
from arg_types import json_output  # bench/, beside this script

from membrain_async.server.store import Store

N = 200_000


def cost(policy: str) -> dict:
    keys = [f"{i:064x}" for i in range(N)]
    value = bytes(4096)
    out = {}
    for what in ("admit", "touch"):
        best = float("inf")
        for _ in range(5):
            store = Store(1 << 27, policy=policy)
            if what == "touch":
                for k in keys[:20000]:
                    store.put("ns", k, value)
                    store.put("ns", k, value)
                it = iter(keys[:20000] * (N // 20000))
                fn = lambda: store.touch("ns", next(it))  # noqa: E731
            else:
                it = iter(keys)
                fn = lambda: store.admit("ns", next(it), 4096)  # noqa: E731
            best = min(best, timeit.timeit(fn, number=N) / N)
        out[f"{what}_us"] = round(best * 1e6, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=json_output, default=None)
    args = ap.parse_args()
    results = {p: cost(p) for p in ("lru", "second-sight", "adaptive")}
    for p, r in results.items():
        print(f"{p:13s} admit {r['admit_us']:.2f} us, lookup hit {r['touch_us']:.2f} us")
    if args.json:
        with open(args.json, "wb") as f:
            doc = {"bench": "admission_cost", "date": provenance.utc_now(), "commit": provenance.commit(),
                   "results": results}
            f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    main()
