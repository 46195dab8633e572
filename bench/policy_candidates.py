"""The candidate policies the replay was asked to weigh, simulated on the traces beside exact LRU.

    python bench/policy_candidates.py [--capacities 1Mi 3Mi 10Mi] [--json bench/results/policy_candidates.json]

Exploratory: how `--eviction adaptive` was chosen, and why nothing online comes near Belady on the synthetic
trace. Each candidate is a small keys-only model driven exactly as the replay drives the server
(trace_sim.py): a prefix lookup of the request's keys (a model sees them all, hit or not, as the server's
lookup does), then a put of the blocks after the hit prefix, in chain order. `second-sight` here is the
store's admission rule; the server's `adaptive` (eviction.py) is measured by bench/trace_bench.py, not here.

Candidates:

- S3FIFO: small FIFO (10%) + main FIFO with frequency bits + ghost queue (Yang et al., SOSP'23);
- WTinyLFU: 1% LRU window, segmented main LRU, a frequency sketch (halved every 10x capacity) as the
  admission filter between them (Einziger et al.);
- ARC (Megiddo & Modha);
- LFUDA: LFU with dynamic aging (counts kept for every key ever seen: an upper bound of what a bounded
  sketch would do);
- SecondSight: LRU that admits a block only if it was put before (ghost of 4x capacity keys); `-16x`: the
  server's rule (eviction.SeenFilter) remembering 16x capacity's puts instead of 2-4x;
- LRU2: LRU-K with K=2 (evict the oldest second-to-last use; blocks used once go first);
- FreqAdmit: LRU behind TinyLFU's admission test alone: a new block is stored only if it was looked up at
  least as often as the LRU victim (counts of every looked-up key, halved every 8x capacity lookups);
- FreshChain: a request's blocks after a hit prefix (a conversation's new tail) need a second sight, a
  chain seen for the first time from its root is admitted (the synthetic trace reuses the latter 4x more);
- DepthBonus: value by prefix position: recency plus a bonus growing with the block's depth in its chain
  (deeper blocks are reused more often in the synthetic trace).

Bounds, not policies (they read the future): `oracle-if-reused` is LRU admitting exactly the blocks that
will be used again; `oracle-uses-left` evicts the block with the fewest uses left (LRU among equals), and
stores nothing that will not be used again. They say how far knowing *whether* or *how often* a block
returns, without knowing *when*, could take an admission or a frequency policy.

`shape` in the JSON: what the traces look like to a cache (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import collections
import heapq
import os
import sys
from collections import OrderedDict

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import provenance  # noqa: E402
from arg_types import json_output  # bench/, beside this script
from membrain_async.server.eviction import SeenFilter  # noqa: E402
from trace_bench import TRACES, parse_tokens  # noqa: E402
from trace_sim import BLOCK_TOKENS, load_trace, simulate_belady, simulate_lru, summarize  # noqa: E402


class LRU:
    """Exact LRU (the base of SecondSight)."""
    def __init__(s,cap): s.cap=cap; s.d=OrderedDict()
    def has(s,k): return k in s.d
    def touch(s,k,pos): s.d.move_to_end(k)
    def put(s,k,pos):
        if k in s.d: s.d.move_to_end(k); return
        if len(s.d)>=s.cap: s.d.popitem(last=False)
        s.d[k]=1

class SecondSight(LRU):
    """LRU admitting only keys put before (a ghost of recently refused keys)."""
    def __init__(s,cap,ghost=4): super().__init__(cap); s.g=OrderedDict(); s.gcap=cap*ghost
    def put(s,k,pos):
        if k in s.d: s.d.move_to_end(k); return
        if k not in s.g:
            s.g[k]=1
            if len(s.g)>s.gcap: s.g.popitem(last=False)
            return
        del s.g[k]
        super().put(k,pos)

class S3FIFO:
    def __init__(s,cap):
        s.cap=cap; s.scap=max(1,cap//10); s.S=OrderedDict(); s.M=OrderedDict(); s.G=OrderedDict(); s.f={}
    def has(s,k): return k in s.S or k in s.M
    def touch(s,k,pos): s.f[k]=min(3,s.f[k]+1)
    def evict(s):
        while True:
            if len(s.S)>=s.scap or not s.M:
                k,_=s.S.popitem(last=False)
                if s.f[k]>0:
                    s.M[k]=1; s.f[k]=0
                    if len(s.M)>s.cap-s.scap: s.evictM()
                else:
                    del s.f[k]; s.G[k]=1
                    if len(s.G)>s.cap-s.scap: s.G.popitem(last=False)
                    return
            else:
                s.evictM(); return
    def evictM(s):
        while True:
            k,_=s.M.popitem(last=False)
            if s.f[k]>0: s.f[k]-=1; s.M[k]=1
            else: del s.f[k]; return
    def put(s,k,pos):
        if s.has(k): s.touch(k,pos); return
        while len(s.S)+len(s.M)>=s.cap: s.evict()
        s.f[k]=0
        if k in s.G: del s.G[k]; s.M[k]=1
        else: s.S[k]=1

class CMS:
    """count-min with 4-bit-ish counters, halved every W increments (TinyLFU)"""
    def __init__(s,w): s.w=w; s.c=collections.Counter(); s.n=0
    def inc(s,k):
        s.c[k]+=1; s.n+=1
        if s.n>=s.w:
            s.n//=2
            s.c=collections.Counter({k:v//2 for k,v in s.c.items() if v//2})
    def est(s,k): return s.c.get(k,0)

class WTinyLFU:
    def __init__(s,cap,win=0.01):
        s.cap=cap; s.wcap=max(1,int(cap*win)); s.W=OrderedDict(); s.P=OrderedDict(); s.Pr=OrderedDict()
        s.mcap=cap-s.wcap; s.prcap=int(s.mcap*0.8); s.sk=CMS(cap*10)
    def has(s,k): return k in s.W or k in s.P or k in s.Pr
    def touch(s,k,pos):
        s.sk.inc(k)
        if k in s.W: s.W.move_to_end(k)
        elif k in s.Pr: s.Pr.move_to_end(k)
        else:
            del s.P[k]; s.Pr[k]=1
            if len(s.Pr)>s.prcap:
                d,_=s.Pr.popitem(last=False); s.P[d]=1
    def put(s,k,pos):
        if s.has(k): s.touch(k,pos); return
        s.sk.inc(k)
        s.W[k]=1
        if len(s.W)>s.wcap:
            c,_=s.W.popitem(last=False)
            if len(s.P)+len(s.Pr)<s.mcap: s.P[c]=1; return
            vk = next(iter(s.P)) if s.P else next(iter(s.Pr))
            if s.sk.est(c)>s.sk.est(vk):
                if vk in s.P: del s.P[vk]
                else: del s.Pr[vk]
                s.P[c]=1

class ARC:
    def __init__(s,c): s.c=c; s.p=0; s.T1=OrderedDict(); s.T2=OrderedDict(); s.B1=OrderedDict(); s.B2=OrderedDict()
    def has(s,k): return k in s.T1 or k in s.T2
    def touch(s,k,pos):
        if k in s.T1: del s.T1[k]
        else: del s.T2[k]
        s.T2[k]=1
    def replace(s,k):
        if s.T1 and (len(s.T1)>s.p or (k in s.B2 and len(s.T1)==s.p)):
            o,_=s.T1.popitem(last=False); s.B1[o]=1
        else:
            o,_=s.T2.popitem(last=False); s.B2[o]=1
    def put(s,k,pos):
        if s.has(k): s.touch(k,pos); return
        c=s.c
        if k in s.B1:
            s.p=min(c, s.p+max(len(s.B2)/max(1,len(s.B1)),1)); s.replace(k); del s.B1[k]; s.T2[k]=1; return
        if k in s.B2:
            s.p=max(0, s.p-max(len(s.B1)/max(1,len(s.B2)),1)); s.replace(k); del s.B2[k]; s.T2[k]=1; return
        if len(s.T1)+len(s.B1)==c:
            if len(s.T1)<c: s.B1.popitem(last=False); s.replace(k)
            else: s.T1.popitem(last=False)
        elif len(s.T1)+len(s.B1)<c and len(s.T1)+len(s.T2)+len(s.B1)+len(s.B2)>=c:
            if len(s.T1)+len(s.T2)+len(s.B1)+len(s.B2)==2*c: s.B2.popitem(last=False)
            s.replace(k)
        s.T1[k]=1

class LFUDA:
    def __init__(s,cap,ss=False): s.cap=cap; s.pr={}; s.f=collections.Counter(); s.h=[]; s.L=0; s.ss=ss; s.seenset=set(); s.t=0
    def has(s,k): return k in s.pr
    def touch(s,k,pos):
        s.f[k]+=1; s.t+=1; p=s.L+s.f[k]; s.pr[k]=p; heapq.heappush(s.h,(p,s.t,k))
    def put(s,k,pos):
        if k in s.pr: s.touch(k,pos); return
        s.f[k]+=1
        if s.ss and s.f[k]<2: return
        while len(s.pr)>=s.cap:
            p,_,v=heapq.heappop(s.h)
            if s.pr.get(v)==p: del s.pr[v]; s.L=p
        s.t+=1; p=s.L+s.f[k]; s.pr[k]=p; heapq.heappush(s.h,(p,s.t,k))


class SecondSight16(LRU):
    """The server's second-sight rule (its SeenFilter: two generations of puts, kept on admission) with
    generations of 16x capacity instead of 2x: long enough for the synthetic trace's first reuses."""

    def __init__(self, cap):
        super().__init__(cap)
        self.seen = SeenFilter(16 * cap)

    def put(self, k, pos):
        if self.seen.check_and_add(k, 1) or k in self.d:
            super().put(k, pos)


class _Ranked:
    """A cache that evicts the key of least rank (a heap with stale entries skipped); `rank` None: do not store.
    A new key ranked below everything held is not stored (bypass), nor is the rest of its chain."""

    def __init__(self, cap):
        self.cap, self.rank_of, self.heap, self.clock = cap, {}, [], 0

    def has(self, k):
        return k in self.rank_of

    def _set(self, k, rank):
        if rank is None:  # not worth keeping any longer
            self.rank_of.pop(k, None)
            return
        self.rank_of[k] = rank
        heapq.heappush(self.heap, (rank, k))

    def touch(self, k, pos):
        self._set(k, self.rank(k, pos))

    def put_batch(self, keys, n):
        for pos in range(n, len(keys)):
            k = keys[pos]
            rank = self.rank(k, pos)
            if k in self.rank_of:
                self._set(k, rank)
                continue
            if rank is None:
                return
            if len(self.rank_of) >= self.cap:
                while self.rank_of.get(self.heap[0][1]) != self.heap[0][0]:
                    heapq.heappop(self.heap)
                if self.heap[0][0] >= rank:
                    return
                del self.rank_of[heapq.heappop(self.heap)[1]]
            self._set(k, rank)


class LRU2(_Ranked):
    """LRU-K, K=2: rank = time of the second-to-last lookup; a key looked up once ranks below all others."""

    def __init__(self, cap):
        super().__init__(cap)
        self.uses = {}  # key -> (second-to-last, last) lookup time

    def looked_up(self, keys):
        for k in keys:
            self.clock += 1
            self.uses[k] = (self.uses.get(k, (None, None))[1], self.clock)

    def rank(self, k, pos):
        before, last = self.uses[k]
        return before if before is not None else last - (1 << 40)


class DepthBonus(_Ranked):
    """Recency plus a bonus of up to one capacity's worth of lookups for blocks 64 or more deep in their chain."""

    def looked_up(self, keys):
        self.clock += len(keys)

    def rank(self, k, pos):
        return self.clock + self.cap * min(pos / 64, 1.0)


class FreqAdmit(LRU):
    """LRU behind TinyLFU's admission test: store a new key only if looked up at least as often as the victim."""

    def __init__(self, cap, halve_every=8):
        super().__init__(cap)
        self.counts, self.n, self.period = collections.Counter(), 0, halve_every * cap

    def looked_up(self, keys):
        for k in keys:
            self.counts[k] += 1
            self.n += 1
            if self.n >= self.period:
                self.n = 0
                self.counts = collections.Counter({k: c // 2 for k, c in self.counts.items() if c > 1})

    def put(self, k, pos):
        if k not in self.d and len(self.d) >= self.cap and self.counts[k] < self.counts[next(iter(self.d))]:
            return
        super().put(k, pos)


class FreshChain(SecondSight):
    """A chain seen for the first time from its root is admitted; blocks after a hit prefix need a second sight."""

    def put_batch(self, keys, n):
        for pos in range(n, len(keys)):
            k = keys[pos]
            if n == 0 and k not in self.g:
                LRU.put(self, k, pos)
            else:
                self.put(k, pos)


class OracleIfReused(LRU):
    """Bound: LRU storing exactly the blocks that will be looked up again (knows whether, not when)."""

    def __init__(self, cap, reqs):
        super().__init__(cap)
        self.left = collections.Counter(b for r in reqs for b in r.blocks)

    def looked_up(self, keys):
        for k in keys:
            self.left[k] -= 1

    def put(self, k, pos):
        if k in self.d or self.left[k] > 0:
            super().put(k, pos)


class OracleUsesLeft(_Ranked):
    """Bound: evict the block with the fewest uses left, least recent among equals (knows how often, not when)."""

    def __init__(self, cap, reqs):
        super().__init__(cap)
        self.left = collections.Counter(b for r in reqs for b in r.blocks)

    def looked_up(self, keys):
        for k in keys:
            self.clock += 1
            self.left[k] -= 1

    def rank(self, k, pos):
        return (self.left[k], self.clock) if self.left[k] > 0 else None


def run(reqs, policy) -> list[int]:
    """Drive a model as the replay drives the server; a model sees every looked-up key if it asks (looked_up)."""
    looked_up = getattr(policy, "looked_up", None)
    put_batch = getattr(policy, "put_batch", None)
    hits = []
    for r in reqs:
        if looked_up is not None:
            looked_up(r.blocks)
        n = 0
        for b in r.blocks:
            if not policy.has(b):
                break
            policy.touch(b, n)
            n += 1
        if put_batch is not None:
            put_batch(r.blocks, n)
        else:
            for p in range(n, len(r.blocks)):
                policy.put(r.blocks[p], p)
        hits.append(n)
    return hits


CANDIDATES = {"second-sight": SecondSight, "second-sight-16x": SecondSight16, "s3-fifo": S3FIFO,
              "w-tinylfu": WTinyLFU, "arc": ARC, "lfu-da": LFUDA, "lru-2": LRU2, "freq-admit": FreqAdmit,
              "fresh-chain": FreshChain, "depth-bonus": DepthBonus}
BOUNDS = {"oracle-if-reused": OracleIfReused, "oracle-uses-left": OracleUsesLeft}


def shape(reqs) -> dict:
    """What a trace looks like to a cache: how many blocks come back, after how long, and which ones."""
    seq = [b for r in reqs for b in r.blocks]
    uses = collections.Counter(seq)
    first: dict[int, int] = {}  # block -> where it was first used; -1 once its first reuse is counted
    first_gaps = []  # blocks looked up between a block's first use and its second
    for i, b in enumerate(seq):
        at = first.setdefault(b, i)
        if at not in (i, -1):
            first_gaps.append(i - at)
            first[b] = -1
    first_gaps.sort()
    # Of the blocks a request puts (absent from an infinite cache), how many are used again: by whether the
    # request's chain was new from its root or extended a known prefix.
    known: set[int] = set()
    put_again = {"fresh": [0, 0], "after_prefix": [0, 0]}
    for r in reqs:
        n = 0
        while n < len(r.blocks) and r.blocks[n] in known:
            n += 1
        kind = put_again["fresh" if n == 0 else "after_prefix"]
        for b in r.blocks[n:]:
            if b not in known:
                kind[0] += 1
                kind[1] += uses[b] > 1
        known.update(r.blocks)
    q = lambda p: first_gaps[int(len(first_gaps) * p)] if first_gaps else None  # noqa: E731
    roots = collections.Counter(r.blocks[0] for r in reqs if r.blocks)
    successors = collections.defaultdict(set)  # the prefix tree: which blocks follow each block
    for r in reqs:
        for a, b in zip(r.blocks, r.blocks[1:]):
            successors[a].add(b)
    return {"requests": len(reqs), "blocks": len(seq), "distinct": len(uses),
            "roots": len(roots), "roots_requested_once": sum(1 for c in roots.values() if c == 1),
            "branching_blocks": sum(1 for s in successors.values() if len(s) > 1),
            "distinct_used_once": sum(1 for c in uses.values() if c == 1),
            "infinite_cache_hit_ratio": summarize(reqs, simulate_lru(reqs, len(uses)))["hit_ratio"],
            "first_reuse_gap_blocks": {"p25": q(0.25), "p50": q(0.5), "p75": q(0.75)},
            "put_used_again": {k: round(v[1] / v[0], 3) if v[0] else None for k, v in put_again.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", nargs="+", default=list(TRACES))
    ap.add_argument("--capacities", nargs="+", default=["1Mi", "3Mi", "10Mi"])
    ap.add_argument("--json", type=json_output, default=None)
    args = ap.parse_args()
    cols = ["lru", *CANDIDATES, *BOUNDS, "belady"]
    print("| trace | capacity | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    shapes, results = {}, []
    for name in args.traces:
        reqs = load_trace(TRACES.get(name, name))
        shapes[name] = shape(reqs)
        for cap in args.capacities:
            blocks = parse_tokens(cap) // BLOCK_TOKENS
            ratios = {"lru": summarize(reqs, simulate_lru(reqs, blocks))["hit_ratio"]}
            ratios.update({c: summarize(reqs, run(reqs, cls(blocks)))["hit_ratio"] for c, cls in CANDIDATES.items()})
            ratios.update({c: summarize(reqs, run(reqs, cls(blocks, reqs)))["hit_ratio"] for c, cls in BOUNDS.items()})
            ratios["belady"] = summarize(reqs, simulate_belady(reqs, blocks))["hit_ratio"]
            results.append({"trace": name, "capacity": cap, "capacity_tokens": parse_tokens(cap),
                            "capacity_blocks": blocks, "hit_ratio": ratios})
            print(f"| {name} | {cap} | " + " | ".join(f"{ratios[c]:.3f}" for c in cols) + " |", flush=True)
    if args.json:
        doc = {"bench": "policy_candidates", "date": provenance.utc_now(), "commit": provenance.commit(),
               "args": vars(args), "shape": shapes, "results": results}
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    main()
