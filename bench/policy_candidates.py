"""The candidate policies the replay was asked to weigh, simulated on the traces beside exact LRU.

    python bench/policy_candidates.py [--capacities 1Mi 3Mi 10Mi]

Exploratory: how `--eviction adaptive` was chosen. Each candidate is a small keys-only model with the
same interface (has / touch on a prefix hit / put of a missing block) driven exactly as the replay drives
the server (trace_sim.py). `second-sight` here is the store's admission rule; the server's `adaptive`
(eviction.py) is measured by bench/trace_bench.py, not here. Candidates:

- S3FIFO: small FIFO (10%) + main FIFO with frequency bits + ghost queue (Yang et al., SOSP'23);
- WTinyLFU: 1% LRU window, segmented main LRU, a frequency sketch (halved every 10x capacity) as the
  admission filter between them (Einziger et al.);
- ARC (Megiddo & Modha);
- LFUDA: LFU with dynamic aging (counts kept for every key ever seen: an upper bound of what a bounded
  sketch would do);
- SecondSight: LRU that admits a block only if it was put before (ghost of 4x capacity keys).
"""

from __future__ import annotations

import argparse
import collections
import heapq
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trace_bench import TRACES, parse_tokens  # noqa: E402
from trace_sim import BLOCK_TOKENS, load_trace, simulate_lru, summarize  # noqa: E402


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


def run(reqs, policy) -> list[int]:
    hits = []
    for r in reqs:
        n = 0
        for b in r.blocks:
            if not policy.has(b):
                break
            policy.touch(b, n)
            n += 1
        for p in range(n, len(r.blocks)):
            policy.put(r.blocks[p], p)
        hits.append(n)
    return hits


CANDIDATES = {"second-sight": SecondSight, "s3-fifo": S3FIFO, "w-tinylfu": WTinyLFU, "arc": ARC, "lfu-da": LFUDA}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", nargs="+", default=list(TRACES))
    ap.add_argument("--capacities", nargs="+", default=["1Mi", "3Mi", "10Mi"])
    args = ap.parse_args()
    print("| trace | capacity | lru | " + " | ".join(CANDIDATES) + " |")
    print("|---|---|---|" + "---|" * len(CANDIDATES))
    for name in args.traces:
        reqs = load_trace(TRACES.get(name, name))
        for cap in args.capacities:
            blocks = parse_tokens(cap) // BLOCK_TOKENS
            cells = [summarize(reqs, simulate_lru(reqs, blocks))["hit_ratio"]]
            cells += [summarize(reqs, run(reqs, cls(blocks)))["hit_ratio"] for cls in CANDIDATES.values()]
            print(f"| {name} | {cap} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
