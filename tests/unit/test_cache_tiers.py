"""Each tier's policy on its own, and the BlockStore over an in-memory remote: no engine, no server.

The remote is a fake client (the BlockStore takes any client through `client_factory`), so what is
tested is the policy: which tier answers, what is bounded, dropped, drained, and what is counted.
"""

import threading
import time

import anyio
import pytest

from membrain_async.cache import BlockStore, open_store
from membrain_async.cache.hot import HotTier
from membrain_async.cache.staging import PrefetchStaging
from membrain_async.cache.write_behind import PendingSave, WriteBehind
from membrain_async.client import MembrainRequestError, MembrainUnavailable
from membrain_async.config import ConnectorConfig
from membrain_async.runtime import CompletionRing


class FakeRemote:
    """An in-memory client. `down`: every call raises MembrainUnavailable; `refuse`: MembrainRequestError;
    `gate`: calls wait for it (a slow or stuck server); `fail_calls`: that many calls (after the gate) raise
    MembrainUnavailable."""

    def __init__(self):
        self.values: dict[str, bytes] = {}
        self.calls: list[tuple[str, list]] = []
        self.down = False
        self.refuse = False
        self.gate: threading.Event | None = None
        self.fail_calls = 0

    async def _enter(self, op, keys):
        self.calls.append((op, list(keys)))
        if self.gate is not None:
            while not self.gate.is_set():
                await anyio.sleep(0.005)
        if self.down or self.fail_calls:
            self.fail_calls = max(0, self.fail_calls - 1)
            raise MembrainUnavailable("fake: down")
        if self.refuse:
            raise MembrainRequestError(403, "fake: refused")

    async def lookup(self, keys):
        await self._enter("lookup", keys)
        n = 0
        while n < len(keys) and keys[n] in self.values:
            n += 1
        return n

    async def get_many(self, keys):
        await self._enter("get", keys)
        return [memoryview(self.values[k]) if k in self.values else None for k in keys]

    async def get_many_into(self, keys, buffers):
        await self._enter("get", keys)
        sizes = []
        for k, buf in zip(keys, buffers):
            value = self.values.get(k)
            if value is None or len(value) > len(buf):
                sizes.append(-1)
            else:
                buf[: len(value)] = value
                sizes.append(len(value))
        return sizes

    async def exists(self, keys):
        await self._enter("exists", keys)
        return [k in self.values for k in keys]

    async def put_many(self, keys, values):
        await self._enter("put", keys)
        for k, v in zip(keys, values):
            self.values[k] = b"".join(bytes(p) for p in v)
        return len(keys)

    async def delete(self, key):
        await self._enter("delete", [key])
        return self.values.pop(key, None) is not None

    async def aclose(self):
        pass

    def ops(self, op):
        return [keys for name, keys in self.calls if name == op]


def config(**overrides):
    return ConnectorConfig.from_sources(env={}, overrides={"endpoint": "http://127.0.0.1:9", **overrides})


@pytest.fixture
def remote():
    return FakeRemote()


@pytest.fixture
def make_store(remote):
    stores = []

    def make(**overrides):
        store = BlockStore(config(**overrides), client_factory=lambda: remote)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.stop_now(drain=1)


def done(future, timeout=10):
    assert future.wait(timeout), "the job did not end"
    return future


# ------------------------------------------------------------------ hot tier


def test_hot_tier_fill_takes_what_it_holds_and_leaves_the_rest():
    hot = HotTier(1000)
    hot.put("a", b"A")
    hot.put("c", b"C")
    out = [None] * 3
    assert hot.fill(["a", "b", "c"], out, [0, 1, 2]) == [1]
    assert [bytes(v) if v is not None else None for v in out] == [b"A", None, b"C"]
    assert hot.leading(["a", "b", "c"]) == 1 and hot.hits == 2 and hot.misses == 1


def test_hot_tier_answers_lookups_and_fetches_without_the_remote(make_store, remote):
    store = make_store(local_cache_bytes="1MiB")
    remote.values.update({"k0": b"zero", "k1": b"one"})
    assert done(store.fetch(["k0", "k1"])).result()[1] == b"one"  # from the remote; the hot tier keeps them
    remote.down = True  # from now on only this process can answer
    remote.calls.clear()
    assert done(store.lookup(["k0", "k1"])).result() == 2
    assert [bytes(v) for v in done(store.fetch(["k0", "k1"])).result()] == [b"zero", b"one"]
    assert remote.calls == [] and store.stats.hot_hits == 2


# ------------------------------------------------------------------ prefetch staging


async def _get_from(values):
    async def get_many(keys):
        return [values.get(k) for k in keys]

    return get_many


@pytest.mark.anyio
async def test_staging_stages_a_prefix_and_stops_at_the_first_miss():
    staging = PrefetchStaging(capacity=1000)
    get_many = await _get_from({"a": memoryview(b"A"), "c": memoryview(b"C")})
    result = await staging.prefetch(["a", "b", "c"], "req", get_many)
    assert result.staged == 1 and "a" in staging and "c" not in staging  # nothing after a miss is ever loaded


@pytest.mark.anyio
async def test_staging_is_bounded_and_skips_what_it_holds():
    staging = PrefetchStaging(capacity=250)
    values = {f"k{i}": memoryview(bytes(100)) for i in range(5)}
    get_many = await _get_from(values)
    result = await staging.prefetch(list(values), "req", get_many)
    assert result.staged == 2 and result.skipped and staging.used == 200
    again = await staging.prefetch(["k0", "k1"], "req", get_many)  # staged already: nothing to fetch
    assert again.staged == 0 and again.skipped


@pytest.mark.anyio
async def test_staging_fill_waits_for_a_prefetch_on_the_wire_and_takes_each_page_once():
    staging = PrefetchStaging(capacity=1000)
    release = anyio.Event()
    fetched = []

    async def slow_get_many(keys):
        fetched.append(list(keys))
        await release.wait()
        return [memoryview(k.encode()) for k in keys]

    out = [None, None]
    async with anyio.create_task_group() as tg:
        tg.start_soon(staging.prefetch, ["x", "y"], "req", slow_get_many)
        await anyio.wait_all_tasks_blocked()

        async def fill():
            assert await staging.fill(["x", "z"], out, [0, 1]) == [1]

        tg.start_soon(fill)
        await anyio.wait_all_tasks_blocked()
        assert out == [None, None]  # still waiting for the prefetch, not asking twice
        release.set()
    assert bytes(out[0]) == b"x" and fetched == [["x", "y"]]
    assert "x" not in staging and "y" in staging  # taken once; the fetch owns it now
    assert staging.drop("req") == 1 and staging.used == 0


def test_store_fetch_uses_staged_pages_and_skips_the_network_for_them(make_store, remote):
    store = make_store(prefetch_bytes="1MiB")  # prefetch is off by default
    remote.values.update({f"p{i}": bytes(10) for i in range(3)})
    assert done(store.prefetch(["p0", "p1", "p2"], tag="r")).result() == 3
    remote.calls.clear()
    assert all(v is not None for v in done(store.fetch(["p0", "p1", "p2"], tag="r")).result())
    assert remote.ops("get") == [] and store.stats.prefetch_used == 3
    assert done(store.prefetch(["p0"], tag="r")).result() == 1
    assert done(store.prefetch(["p0"], tag="r")).result() == 0 and store.stats.prefetch_skipped == 1


def test_store_cancel_drops_what_the_request_staged(make_store, remote):
    store = make_store(prefetch_bytes="1MiB")  # prefetch is off by default
    remote.values["s"] = bytes(100)
    assert done(store.prefetch(["s"], tag="gone")).result() == 1
    store.cancel("gone")
    done(store.lookup(["x"]))  # a round trip through the inbox: the cancel has been handled
    assert store.snapshot()["staging_bytes"] == 0


# ------------------------------------------------------------------ write-behind


def save(key, nbytes=10, released=None):
    return PendingSave(key, [bytes(nbytes)], nbytes, None, None, (lambda: released.append(key)) if released is not None else None, None)


def test_write_behind_is_bounded_in_bytes_and_refuses_once_closed():
    wb = WriteBehind(capacity=25, batch_bytes=1000)
    assert [wb.offer(save(f"k{i}")) for i in range(3)] == [True, True, False]
    assert wb.bytes == 20 and len(wb) == 2
    wb.close()
    assert wb.offer(save("late", 1)) is False


def test_write_behind_batches_by_keys_and_bytes_at_least_one():
    wb = WriteBehind(capacity=10_000, batch_bytes=25, batch_keys=2)
    for i in range(5):
        wb.offer(save(f"k{i}"))
    assert [s.key for s in wb.next_batch()[0]] == ["k0", "k1"]  # the key bound
    wb = WriteBehind(capacity=10_000, batch_bytes=5, batch_keys=256)
    wb.offer(save("big", 100))
    assert [s.key for s in wb.next_batch()[0]] == ["big"]  # past the byte bound alone: still sent


@pytest.mark.anyio
async def test_write_behind_drains_last_write_wins_and_releases_every_buffer():
    wb = WriteBehind(capacity=10_000, batch_bytes=1000)
    released, uploaded = [], []

    async def upload(saves, nbytes):
        uploaded.append([(s.key, s.nbytes) for s in saves])

    for key, n in (("a", 1), ("b", 2), ("a", 3)):
        assert wb.offer(save(key, n, released))
    async with anyio.create_task_group() as tg:
        tg.start_soon(wb.run, upload, lambda saves: None)
        await anyio.wait_all_tasks_blocked()
        wb.kick()
        await wb.drain()
        tg.cancel_scope.cancel()
    assert uploaded == [[("a", 3), ("b", 2)]]
    assert sorted(released) == ["a", "a", "b"] and wb.bytes == 0 and wb.idle


def test_write_behind_abandon_releases_what_is_left():
    wb = WriteBehind(capacity=10_000, batch_bytes=1000)
    released = []
    for i in range(3):
        wb.offer(save(f"k{i}", released=released))
    assert wb.abandon() == 3 and len(released) == 3 and wb.bytes == 0


def test_store_drops_saves_past_the_bound_and_drains_at_shutdown(make_store, remote):
    remote.gate = threading.Event()  # a stuck server: nothing drains until the gate opens
    store = make_store(write_behind_bytes=1000)
    accepted = [store.save(f"k{i}", [bytes(100)]) for i in range(20)]
    assert accepted.count(True) <= 10 and accepted[-1] is False
    assert store.stats.saves_dropped == accepted.count(False)
    remote.gate.set()
    store.close(drain=10)  # the last holder: drains what was accepted, then stops
    assert not store.running
    assert store.stats.saves_uploaded == accepted.count(True) == len(remote.values)
    assert store.save("late", [b"x"]) is False


# ------------------------------------------------------------------ counted outcomes


def test_a_miss_an_unreachable_server_and_a_refusal_are_counted_apart(make_store, remote):
    store = make_store(prefetch_bytes="1MiB")  # prefetch is off by default
    remote.values["here"] = b"v"
    assert [v is None for v in done(store.fetch(["here", "gone"])).result()] == [False, True]
    assert store.stats.fetch_misses == 1
    remote.refuse = True
    assert isinstance(done(store.fetch(["here"])).exception(), MembrainRequestError)
    assert isinstance(done(store.lookup(["here"])).exception(), MembrainRequestError)
    assert store.stats.fetch_errors == 1 and store.stats.lookup_errors == 1
    remote.refuse, remote.down = False, True
    assert isinstance(done(store.fetch(["here", "gone"])).exception(), MembrainUnavailable)
    assert isinstance(done(store.lookup(["here"])).exception(), MembrainUnavailable)
    assert done(store.prefetch(["here"], tag="r")).result() == 0
    s = store.stats
    assert (s.fetch_unavailable, s.lookups_unavailable, s.prefetch_unavailable) == (2, 1, 1)
    assert (s.fetch_misses, s.fetch_errors, s.lookup_errors) == (1, 1, 1)  # unchanged by the dead server


def test_a_load_past_its_deadline_is_a_timeout(make_store, remote):
    remote.gate = threading.Event()
    store = make_store(lookup_deadline=0.2, load_deadline=0.2)
    try:
        assert isinstance(done(store.fetch(["k"])).exception(), TimeoutError)
        assert isinstance(done(store.lookup(["k"])).exception(), TimeoutError)
        assert store.stats.fetch_timeouts == 1 and store.stats.lookup_timeouts == 1
        assert store.stats.fetch_unavailable == 0 and store.stats.fetch_misses == 0
    finally:
        remote.gate.set()


def test_a_corrupt_page_is_forgotten_and_its_next_save_overwrites(make_store, remote):
    store = make_store(local_cache_bytes="1MiB")
    remote.values["bad"] = b"corrupt"
    done(store.fetch(["bad"]))
    remote.down = True  # the delete cannot reach the server: the overwrite must still happen later
    done(store.forget(["bad"]))
    assert store.stats.forgotten == 1 and "bad" not in store.hot
    remote.down = False
    assert store.save("bad", [b"good"]) and store.flush(10)
    assert remote.values["bad"] == b"good" and store.stats.saves_skipped_present == 0


def test_an_upload_to_an_unreachable_server_fails_and_is_counted(make_store, remote):
    store = make_store()
    remote.down = True
    assert store.save("k", [b"v"]) and store.flush(10)
    assert store.stats.saves_failed == 1 and store.stats.saves_unavailable == 1 and store.stats.saves_uploaded == 0


def test_each_save_reports_its_own_outcome_through_the_ring(make_store, remote):
    store = make_store()
    ring = CompletionRing()
    assert store.save("a", [b"1"], tag="r1", ring=ring) and store.flush(10)
    assert store.save("a", [b"1"], tag="r2", ring=ring) and store.flush(10)  # the server holds it now
    remote.down = True
    assert store.save("b", [b"2"], tag="r3", ring=ring) and store.flush(10)
    remote.down, remote.refuse = False, True
    assert store.save("c", [b"3"], tag="r4", ring=ring) and store.flush(10)
    got = [(c.kind, c.tag, c.value, c.outcome) for c in ring.poll()]
    assert got == [("save", "r1", "a", "ok"), ("save", "r2", "a", "present"), ("save", "r3", "b", "unavailable"),
                   ("save", "r4", "c", "failed")]


# ------------------------------------------------------------------ load: fetch, then copy off the loop


def test_load_copies_on_a_worker_thread_and_is_never_abandoned_mid_copy(make_store, remote):
    store = make_store()
    remote.values["k"] = b"page"
    copying, finish = threading.Event(), threading.Event()
    copied = []

    def apply(values):
        copied.append(threading.current_thread().name)
        copying.set()
        finish.wait(10)
        copied.append(bytes(values[0]))
        return len(values)

    ring = CompletionRing()
    future = store.load(["k"], apply, tag="req", ring=ring)
    assert copying.wait(10)
    store.cancel("req")  # the request is aborted while its pages are being copied
    done(store.lookup(["x"]))  # the cancel has been handled
    assert len(ring) == 0  # the job has not ended: the copy is still running
    finish.set()
    ended = []
    for _ in range(2000):  # bounded wait for the completion; nothing here measures time
        ended += ring.poll()
        if ended:
            break
        threading.Event().wait(0.005)
    (completion,) = ended
    assert completion.outcome == "cancelled" and future.cancelled()
    assert copied[1] == b"page"  # the copy ran to its end before the job ended
    assert copied[0] not in ("membrain-runtime", threading.current_thread().name)


# ------------------------------------------------------------------ one store per process, explicit holders


def test_the_shared_store_stops_when_its_last_holder_closes(server):
    cfg = ConnectorConfig.from_sources(env={}, overrides={"endpoint": server.url, "namespace": "holders"})
    scheduler_side, worker_side = open_store(cfg), open_store(cfg)
    assert scheduler_side is worker_side
    assert done(scheduler_side.lookup(["a"])).result() == 0
    scheduler_side.close()
    assert worker_side.running and done(worker_side.lookup(["a"])).result() == 0  # the other half still uses it
    worker_side.close()
    assert not worker_side.running
    fresh = open_store(cfg)
    assert fresh is not worker_side and done(fresh.lookup(["a"])).result() == 0
    fresh.close()


def test_counters_tell_a_stopped_server_from_a_miss():
    from membrain_async.server import embedded_server

    with embedded_server() as srv:
        # Deadlines well past the client's retries: what is tested is the answer, not the clock.
        cfg = ConnectorConfig.from_sources(env={}, overrides={
            "endpoint": srv.url, "timeout": 0.5, "lookup_deadline": 10.0, "load_deadline": 10.0})
        store = BlockStore(cfg)
        try:
            assert store.save("kept", [b"v"]) and store.flush(10)
            assert [v is None for v in done(store.fetch(["kept", "never-saved"]), 20).result()] == [False, True]
            assert done(store.lookup(["kept", "never-saved"]), 20).result() == 1
            srv.stop()
            assert isinstance(done(store.lookup(["kept"]), 20).exception(), MembrainUnavailable)
            assert isinstance(done(store.fetch(["kept"]), 20).exception(), MembrainUnavailable)
            assert store.save("after", [b"v"]) and store.flush(20)
            s = store.stats
            assert (s.fetch_misses, s.fetch_unavailable, s.lookups_unavailable) == (1, 1, 1)
            assert (s.saves_unavailable, s.saves_failed, s.saves_uploaded) == (1, 1, 1)
            assert s.fetch_errors == 0 and s.lookup_errors == 0
        finally:
            store.close(drain=0)


def test_the_ring_names_a_job_the_unreachable_server_failed(make_store, remote):
    store = make_store()
    ring = CompletionRing()
    remote.down = True
    done(store.lookup(["a"], tag="r1", ring=ring))
    remote.down, remote.refuse = False, True
    done(store.lookup_many([["a"], ["b"]], tag=("r2", "r3"), ring=ring))
    outcomes = {c.tag: c.outcome for c in ring.poll()}
    assert outcomes == {"r1": "unavailable", ("r2", "r3"): "error"}


# ------------------------------------------------------------------ loads into buffers, and loads that share keys


def load_into(store, keys, size=16, tag=None):
    """A load whose values are received into buffers of `size` bytes; returns (future, buffers, released)."""
    buffers = [memoryview(bytearray(size)) for _ in keys]
    released = threading.Event()
    fut = store.load(keys, lambda values: [bytes(v) if v is not None else None for v in values], into=buffers,
                     release=released.set, tag=tag)
    return fut, buffers, released


def until(condition, timeout=10):
    """Poll a condition the runtime thread makes true (no fixed sleep)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def waiters(store, key):
    wire = store.shared._on_wire.get(key)
    return len(wire.waiters) if wire is not None else 0


def test_a_load_receives_into_its_buffers_and_releases_them_after_the_copy(make_store, remote):
    store = make_store()
    remote.values.update({"a": b"AAAA", "b": b"BBBBBB"})
    fut, buffers, released = load_into(store, ["a", "b", "gone"])
    assert done(fut).result() == [b"AAAA", b"BBBBBB", None]
    assert bytes(buffers[0][:4]) == b"AAAA" and bytes(buffers[1][:6]) == b"BBBBBB"
    assert released.wait(5)
    too_small = load_into(store, ["b"], size=4)[0]
    assert done(too_small).result() == [None]  # a value bigger than its buffer is a miss, never a spill


def test_loads_of_the_same_keys_at_once_ask_the_server_once(make_store, remote):
    store = make_store()
    remote.values.update({f"k{i}": bytes([i]) * 8 for i in range(4)})
    remote.gate = threading.Event()  # the first load's get is on the wire until we open the gate
    first = load_into(store, ["k0", "k1", "k2"], tag="r1")
    until(lambda: remote.ops("get"))
    second = load_into(store, ["k1", "k2", "k3"], tag="r2")  # shares k1, k2 with the first
    until(lambda: waiters(store, "k1") and waiters(store, "k2"))
    remote.gate.set()
    assert done(first[0]).result() == [bytes([i]) * 8 for i in range(3)]
    assert done(second[0]).result() == [bytes([i]) * 8 for i in (1, 2, 3)]
    asked = [k for keys in remote.ops("get") for k in keys]
    assert sorted(asked) == ["k0", "k1", "k2", "k3"]  # each key once
    assert store.stats.fetch_shared == 2 and len(store.shared) == 0


def test_when_the_first_load_fails_the_ones_waiting_on_it_fetch_themselves(make_store, remote):
    store = make_store()
    remote.values.update({"k": b"value"})
    remote.gate = threading.Event()
    remote.fail_calls = 1
    first = load_into(store, ["k"], tag="r1")
    until(lambda: remote.ops("get"))
    second = load_into(store, ["k"], tag="r2")
    until(lambda: waiters(store, "k"))  # the second load waits on the first's fetch
    remote.gate.set()
    assert isinstance(done(first[0]).exception(), MembrainUnavailable)
    assert done(second[0]).result() == [b"value"]
    assert [k for keys in remote.ops("get") for k in keys] == ["k", "k"]


def test_a_waiting_load_that_is_cancelled_gets_no_copy_into_its_buffer(make_store, remote):
    store = make_store()
    remote.values.update({"k": b"value"})
    remote.gate = threading.Event()
    first = load_into(store, ["k"], tag="r1")
    until(lambda: remote.ops("get"))
    fut, buffers, released = load_into(store, ["k"], tag="r2")
    until(lambda: waiters(store, "k"))
    store.cancel("r2")  # its request finished: its buffer may go to another load at once
    assert released.wait(5)  # the job ended (its buffer handed back) before the first load's data came
    assert waiters(store, "k") == 0
    remote.gate.set()
    assert done(first[0]).result() == [b"value"]
    assert bytes(buffers[0]) == bytes(16)  # nothing was copied into the cancelled load's buffer


def test_a_staged_page_serves_every_load_that_copies_it_and_goes_first_when_room_is_needed(make_store, remote):
    store = make_store(prefetch_bytes=16)
    remote.values.update({"k": b"12345678", "other": b"abcdefgh", "third": b"ABCDEFGH"})
    assert done(store.prefetch(["k"], tag="r1")).result() == 1
    for tag in ("r2", "r3"):  # two loads that share the page: both copy it, neither asks the server
        fut, _, _ = load_into(store, ["k"], tag=tag)
        assert done(fut).result() == [b"12345678"]
    assert remote.ops("get") == [["k"]] and "k" in store.staging
    assert done(store.prefetch(["other"], tag="r4")).result() == 1  # room for it: 16 bytes hold both
    assert done(store.prefetch(["third"], tag="r5")).result() == 1  # no room: the loaded page "k" goes first
    assert "k" not in store.staging and "other" in store.staging and "third" in store.staging
