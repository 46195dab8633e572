"""Prefill/decode disaggregation through Membrain: two real vLLM OpenAI servers and examples/pd_proxy.py.

The prefill instance is a kv_producer set up by an explicit --kv-transfer-config alone (no
VLLM_MEMBRAIN_ENABLED), reaching the store through a fault proxy; the decode instance is a kv_consumer
activated by VLLM_MEMBRAIN_ENABLED and VLLM_MEMBRAIN_ROLE. Both serve, with the router in front, and
one set of engines serves every test of the module (the kill test runs last).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing.openai_server import OpenAIServer
from membrain_async.testing.proxy import FaultProxy
from membrain_async.vllm.scheduler.handoff import FIRST_POLL_S, MAX_POLL_S

from ..harness import BLOCK, ENGINE_KWARGS, PROMPTS, engine_env, free_port
from .test_e2e_faults import stored_keys
from .test_e2e_never_poison import assert_matches_clean, delete, payloads

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.pd]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER_ARGS = ["--dtype", ENGINE_KWARGS["dtype"], "--enforce-eager", "--block-size", str(BLOCK),
               "--max-model-len", str(ENGINE_KWARGS["max_model_len"]), "--seed", str(ENGINE_KWARGS["seed"]),
               "--enable-prompt-tokens-details"]
HANDOFF_DEADLINE = 5.0  # the decode instance's VLLM_MEMBRAIN_HANDOFF_DEADLINE
PRODUCER_CONFIG = ('{"kv_connector":"MembrainConnector","kv_role":"kv_producer","kv_load_failure_policy":"recompute",'
                   '"kv_connector_extra_config":{"endpoint":"%s"}}')


class PD:
    def __init__(self, srv, fault: FaultProxy, prefill: OpenAIServer, decode: OpenAIServer, router_url: str):
        self.srv, self.fault, self.prefill, self.decode, self.router = srv, fault, prefill, decode, router_url

    def complete(self, url: str, name: str) -> dict:
        r = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "model": self.decode.model, "prompt": PROMPTS[name], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()

    def via_router(self, name: str) -> dict:
        return self.complete(self.router, name)


def decode_counters(pd: PD) -> dict:
    names = ("lookups", "lookup_timeouts", "lookup_unavailable", "handoff_polls", "handoff_timeouts", "hit_tokens",
             "load_error_blocks")
    return {n: pd.decode.counter(f"vllm:membrain_{n}_total") for n in names}


def tokens_of(body: dict) -> list[int]:
    return body["choices"][0]["token_ids"]


def loadable_tokens(body: dict) -> int:
    """Every full block of the prompt but the one holding its last token (vLLM computes at least that one)."""
    return (body["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK


def cached_tokens(body: dict) -> int:
    return (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


@pytest.fixture(scope="module")
def pd(model, logs):
    srv = start_subprocess_server({"port": 0, "capacity": "256MiB"})
    fault = FaultProxy(srv.port).__enter__()
    # One core each, as prefill and decode instances have machines of their own: left to vLLM's auto
    # binding, both workers pin themselves to the same core.
    prefill_env = engine_env(VLLM_SERVER_DEV_MODE="1", VLLM_CPU_OMP_THREADS_BIND="0")  # /reset_prefix_cache
    decode_env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=srv.url, VLLM_MEMBRAIN_ROLE="kv_consumer",
                            VLLM_MEMBRAIN_HANDOFF_DEADLINE=str(HANDOFF_DEADLINE), VLLM_SERVER_DEV_MODE="1",
                            VLLM_CPU_OMP_THREADS_BIND="1")
    prefill = OpenAIServer(model, free_port(), prefill_env, os.path.join(logs, "pd-prefill.log"),
                           [*SERVER_ARGS, "--kv-transfer-config", PRODUCER_CONFIG % fault.url])
    decode = OpenAIServer(model, free_port(), decode_env, os.path.join(logs, "pd-decode.log"), SERVER_ARGS)
    router_port = free_port()
    router_log = open(os.path.join(logs, "pd-router.log"), "w")
    router = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "pd_proxy.py"), "--port", str(router_port),
                               "--prefill", prefill.url, "--decode", decode.url],
                              stdout=router_log, stderr=subprocess.STDOUT)
    try:
        prefill.wait_ready()
        decode.wait_ready()
        yield PD(srv, fault, prefill, decode, f"http://127.0.0.1:{router_port}")
    finally:
        router.terminate()
        router.wait(30)
        router_log.close()
        prefill.stop()
        decode.stop()
        fault.__exit__(None, None, None)
        srv.stop()


def test_both_roles_start_with_membrains_set_up(pd):
    """The explicit --kv-transfer-config gets the start-up line, the server check and the CPU cores that
    env activation gets (on 2 cores vLLM's extra core for a connector changed greedy tokens)."""
    prefill_log, decode_log = pd.prefill.log(), pd.decode.log()
    assert "Membrain: active (explicit --kv-transfer-config, role kv_producer)" in prefill_log
    assert "reachable" in prefill_log.split("Membrain: active")[1].splitlines()[0]
    assert "Membrain: active, role kv_consumer" in decode_log
    assert "Membrain role kv_producer: saves, never loads" in prefill_log
    assert "Membrain role kv_consumer: loads, never saves" in decode_log


def test_decode_tokens_equal_plain_vllm_and_it_loads_every_full_prompt_block(pd, baseline):
    for name in ("x", "a1", "b1"):
        body = pd.via_router(name)
        assert tokens_of(body) == baseline[name], name
        assert cached_tokens(body) == loadable_tokens(body) > 0, (name, decode_counters(pd), body.get("kv_transfer_params"))
    assert pd.decode.counter("vllm:membrain_hit_tokens_total") > 0
    assert pd.decode.counter("vllm:membrain_handoff_timeouts_total") == 0


def store_count(url: str, what: str) -> int:
    """A namespace counter of the store: "hits" counts keys found by lookups and by gets alike."""
    return (httpx.get(f"{url}/v1/stats", timeout=10).json().get("namespaces", {}).get("default") or {}).get(what, 0)


def test_the_producer_never_loads_and_the_consumer_never_saves(pd, baseline):
    body = pd.via_router("y")
    assert tokens_of(body) == baseline["y"]
    # The producer forgets its own copy of y: a kv_both instance would now load it from the store.
    assert httpx.post(f"{pd.prefill.url}/reset_prefix_cache", timeout=30).status_code == 200
    hits = store_count(pd.srv.url, "hits")
    alone = pd.complete(pd.prefill.url, "y")
    assert tokens_of(alone) == baseline["y"]
    # Its lookup found every block (it saves none again); a load would have found each once more.
    assert store_count(pd.srv.url, "hits") - hits == loadable_tokens(alone) // BLOCK
    assert cached_tokens(alone) == 0
    # A prompt sent to the decode instance alone: it computes it, and a kv_both instance would save it.
    before = stored_keys(pd.srv.url)
    assert tokens_of(pd.complete(pd.decode.url, "z")) == baseline["z"]
    # Planned in the step that filled the blocks, before the response: a kv_both instance counts z's here.
    assert pd.decode.counter("vllm:membrain_save_blocks_planned_total") == 0
    assert stored_keys(pd.srv.url) == before
    assert pd.prefill.counter("vllm:membrain_uploaded_blocks_total") > 0
    assert pd.decode.counter("vllm:membrain_uploaded_blocks_total") == 0


def wait_for(condition, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def test_the_decode_waits_for_uploads_still_under_way_and_loads_them_all(pd, baseline):
    """The prefill's response is out before its upload lands (vLLM sends it in the step the request stops):
    here the upload is held in the fault proxy until the decode instance has looked up, found the blocks
    missing, and looked up again. Released then, every block is loaded: none is computed twice."""
    pd.fault.held.clear()
    pd.fault.hold_requests_over = 4096  # lookups pass; the prefill's upload stops in the fault proxy
    result: dict = {}
    request = threading.Thread(target=lambda: result.update(pd.via_router("f2")))
    try:
        misses = store_count(pd.srv.url, "misses")
        polls = pd.decode.counter("vllm:membrain_handoff_polls_total")
        request.start()
        assert pd.fault.held.wait(120), "the prefill never started its upload"
        # Three lookups of f2 that missed: the prefill's own (before it computed), then the decode
        # instance's first and one it sent again.
        wait_for(lambda: store_count(pd.srv.url, "misses") >= misses + 3, "the decode instance did not look up twice")
    finally:
        pd.fault.hold_requests_over = None
    request.join(300)
    assert tokens_of(result) == baseline["f2"]
    assert cached_tokens(result) == loadable_tokens(result)
    assert pd.decode.counter("vllm:membrain_handoff_polls_total") > polls
    assert pd.decode.counter("vllm:membrain_handoff_timeouts_total") == 0


def test_a_prefill_killed_mid_save_costs_the_decode_a_recompute_never_tokens_or_payloads(pd, baseline):
    """Runs last: it kills the prefill instance."""
    before = stored_keys(pd.srv.url)
    clean_body = pd.via_router("f1")  # the clean run: its payloads are what the store may ever hold for f1
    assert tokens_of(clean_body) == baseline["f1"]
    f1_keys = sorted(stored_keys(pd.srv.url) - before)
    assert len(f1_keys) == clean_body["usage"]["prompt_tokens"] // BLOCK  # every full prompt block, nothing else
    clean = {k: v for k, v in payloads(pd.srv.url).items() if k in f1_keys}
    delete(pd.srv.url, f1_keys)
    hits_before = pd.decode.counter("vllm:membrain_hit_tokens_total")

    # The router's two calls by hand, so that the prefill dies after its response and before its upload
    # lands (through the router the kill may also beat the response: the router then decodes without a
    # hand-off, which proves less).
    pd.fault.held.clear()
    pd.fault.hold_requests_over = 4096  # lookups pass; the prefill's upload stops in the fault proxy
    prefill = httpx.post(f"{pd.prefill.url}/v1/completions", timeout=300, json={
        "model": pd.decode.model, "prompt": PROMPTS["f1"], "max_tokens": 1, "temperature": 0,
        "kv_transfer_params": {"do_remote_decode": True}})
    handoff = prefill.json()["kv_transfer_params"]
    assert pd.fault.held.wait(120), "the prefill never started its upload"
    pd.prefill.kill()
    pd.fault.mode = "reset"  # what the proxy holds or buffers of the dead prefill's upload never arrives
    pd.fault.hold_requests_over = None
    # The decode instance computed f1 in the clean run: it must now depend on the store alone.
    assert httpx.post(f"{pd.decode.url}/reset_prefix_cache", timeout=30).status_code == 200
    timeouts = pd.decode.counter("vllm:membrain_handoff_timeouts_total")
    polls = pd.decode.counter("vllm:membrain_handoff_polls_total")
    r = httpx.post(f"{pd.decode.url}/v1/completions", timeout=300, json={
        "model": pd.decode.model, "prompt": PROMPTS["f1"], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, "kv_transfer_params": handoff})
    assert r.status_code == 200, r.text
    result = r.json()

    assert tokens_of(result) == baseline["f1"]
    loaded = pd.decode.counter("vllm:membrain_hit_tokens_total") - hits_before
    assert loaded < loadable_tokens(result)  # some of f1 was never stored: the decode computed it
    # It waited for the announced blocks until the store's count stood still for the hand-off deadline.
    assert pd.decode.counter("vllm:membrain_handoff_timeouts_total") == timeouts + 1
    # Spaced re-polls (handoff.py), not one lookup per engine pass: with the store's count standing still
    # from the first answer, the interval doubles to its cap and the last look is at the deadline. A
    # slower machine only sends fewer.
    ramp = math.ceil(math.log2(MAX_POLL_S / FIRST_POLL_S)) + 1
    assert pd.decode.counter("vllm:membrain_handoff_polls_total") - polls <= ramp + math.ceil(HANDOFF_DEADLINE / MAX_POLL_S) + 1
    # Whatever reached the store before the kill is the clean run's, byte for byte; no other key appeared.
    assert stored_keys(pd.srv.url) <= before | set(f1_keys)
    assert_matches_clean(clean, pd.srv.url, must_have=[])
