"""Mooncake-format traces and the two reference simulations the replay is judged against.

A trace is one JSON object a line: `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (one id
per 512-token block; equal ids are equal prefix blocks). Every request, replayed or simulated, does what a
vLLM instance with Membrain does: a prefix lookup of its blocks, then puts of the blocks after the hit
prefix. Hit ratio = prefix-hit blocks / all blocks; capacity is counted in blocks.

- `simulate_lru`: exact LRU; a lookup refreshes the hit prefix, a put makes a block most recent.
- `simulate_belady`: the offline optimum for this access sequence (Belady's MIN with bypass: evict, or
  never admit, the block whose next use is farthest). An upper bound for any online policy, not a target.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

import orjson

BLOCK_TOKENS = 512


@dataclass
class Request:
    timestamp_ms: int
    input_length: int
    blocks: list[int]


def load_trace(path: str, limit: int | None = None) -> list[Request]:
    out: list[Request] = []
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            d = orjson.loads(line)
            out.append(Request(int(d["timestamp"]), int(d["input_length"]), list(d["hash_ids"])))
            if limit is not None and len(out) >= limit:
                break
    return out


def tokens_saved(req: Request, hit_blocks: int) -> int:
    """Prefill tokens a hit prefix saves (the last block of a prompt may be partial)."""
    return min(hit_blocks * BLOCK_TOKENS, req.input_length)


def summarize(reqs: list[Request], hits: list[int]) -> dict:
    blocks = sum(len(r.blocks) for r in reqs)
    return {
        "requests": len(reqs),
        "blocks": blocks,
        "hit_blocks": sum(hits),
        "hit_ratio": round(sum(hits) / blocks, 4) if blocks else 0.0,
        "prefill_tokens": sum(r.input_length for r in reqs),
        "prefill_tokens_saved": sum(tokens_saved(r, n) for r, n in zip(reqs, hits)),
    }


def simulate_lru(reqs: list[Request], capacity_blocks: int) -> list[int]:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = []
    for r in reqs:
        n = 0
        for b in r.blocks:
            if b not in cache:
                break
            cache.move_to_end(b)
            n += 1
        for b in r.blocks[n:]:
            if b in cache:
                cache.move_to_end(b)
                continue
            if len(cache) >= capacity_blocks:
                cache.popitem(last=False)
            cache[b] = None
        hits.append(n)
    return hits


def simulate_belady(reqs: list[Request], capacity_blocks: int) -> list[int]:
    never = 1 << 62
    seq = [b for r in reqs for b in r.blocks]
    next_use = [never] * len(seq)
    last: dict[int, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        next_use[i] = last.get(seq[i], never)
        last[seq[i]] = i
    cache: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, block); stale entries skipped on pop
    hits = []
    i = 0
    for r in reqs:
        n, prefix = 0, True
        for b in r.blocks:
            nu = next_use[i]
            i += 1
            if prefix and b in cache:
                n += 1
            else:
                prefix = False
            if b not in cache:
                if nu == never:
                    continue
                if len(cache) >= capacity_blocks:
                    while -heap[0][0] != cache.get(heap[0][1]):
                        heapq.heappop(heap)
                    if -heap[0][0] <= nu:
                        continue  # everything held is needed sooner: bypass
                    del cache[heapq.heappop(heap)[1]]
            cache[b] = nu
            heapq.heappush(heap, (-nu, b))
        hits.append(n)
    return hits
