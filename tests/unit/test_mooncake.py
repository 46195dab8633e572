"""Mooncake Store backend against a real mooncake_master and store segment (processes on loopback), no engine.

Skipped, with the reason, where the mooncake wheel cannot load (not installed, or Debian's libibverbs1
missing). The settings' derivation from mooncake://master:port is tested everywhere.
"""

from __future__ import annotations

import time

import anyio
import pytest

from membrain_async import codec
from membrain_async.cache.remote import make_client
from membrain_async.cache.store import BlockStore
from membrain_async.client import MembrainUnavailable
from membrain_async.config import ConfigError, ConnectorConfig
from membrain_async.testing import mooncake

REASON = mooncake.unavailable()
needs_mooncake = pytest.mark.skipif(REASON is not None, reason=f"Mooncake cannot run here: {REASON}")

# Hang guard only (a call that never returns fails the test instead of hanging the suite).
GUARD = 60


def config_for(mc, **overrides) -> ConnectorConfig:
    # A call's timeout covers Mooncake's setup, which the first call runs: on a loaded 2-core machine it can
    # outlast the 2 s default, and the call after it then finds the setup still running (fails fast, by
    # design). Tests of timeouts pass their own.
    return ConnectorConfig.from_sources(
        env={}, overrides={"endpoint": mc.endpoint, "mooncake_metadata_server": mc.metadata, "timeout": 30.0,
                           **overrides}
    )


def wait(fut, default=None):
    """A runtime future's value once done (raises its failure); `default`: served as the caller would."""
    assert fut.wait(GUARD), "the job did not end"
    return fut.result() if default is None else fut.result_or(default)


def payload(key: str, size: int = 4096, fill: int = 7) -> list:
    data = bytes([fill]) * size
    return [codec.encode_header(data, dtype="uint8", shape=(size,), key=key), data]


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    if REASON:
        pytest.skip(f"Mooncake cannot run here: {REASON}")
    with mooncake.MooncakeCluster(64 << 20, log_dir=str(tmp_path_factory.mktemp("mooncake-logs"))) as cluster:
        yield cluster


# ------------------------------------------------------------------ settings (no wheel needed)


def test_settings_are_derived_from_the_endpoint():
    from membrain_async.client.mooncake_store import MooncakeSettings

    cfg = ConnectorConfig.from_sources(env={"VLLM_MEMBRAIN_ENDPOINT": "mooncake://127.0.0.1:5000"})
    s = MooncakeSettings.from_config(cfg)
    assert s.master == "127.0.0.1:5000"
    assert s.metadata_server == "http://127.0.0.1:8080/metadata"  # the master's built-in HTTP metadata server
    assert s.local_hostname == "127.0.0.1"  # the address that routes to the master
    assert (s.protocol, s.global_segment_size, s.local_buffer_size) == ("tcp", 0, 256 << 20)
    default_port = MooncakeSettings.from_config(
        ConnectorConfig.from_sources(env={"VLLM_MEMBRAIN_ENDPOINT": "mooncake://10.0.0.7"}))
    assert default_port.master == "10.0.0.7:50051"
    explicit = MooncakeSettings.from_config(ConnectorConfig.from_sources(env={
        "VLLM_MEMBRAIN_ENDPOINT": "mooncake://m:1", "VLLM_MEMBRAIN_MOONCAKE_METADATA_SERVER": "P2PHANDSHAKE",
        "VLLM_MEMBRAIN_MOONCAKE_LOCAL_HOSTNAME": "10.1.1.1", "VLLM_MEMBRAIN_MOONCAKE_GLOBAL_SEGMENT_SIZE": "1GiB"}))
    assert (explicit.metadata_server, explicit.local_hostname, explicit.global_segment_size) == (
        "P2PHANDSHAKE", "10.1.1.1", 1 << 30)


def test_mooncakes_buffers_count_in_the_announced_memory():
    from membrain_async.vllm import memory_budget as mb

    cfg = ConnectorConfig.from_sources(env={"VLLM_MEMBRAIN_ENDPOINT": "mooncake://127.0.0.1:5000",
                                            "VLLM_MEMBRAIN_MOONCAKE_GLOBAL_SEGMENT_SIZE": "1GiB"})
    parts = mb.worker_buffers(cfg)
    assert parts["mooncake buffer"] == 256 << 20 and parts["mooncake segment"] == 1 << 30


def test_a_mooncake_endpoint_stands_alone():
    with pytest.raises(ConfigError, match="stands alone"):
        ConnectorConfig.from_sources(env={"VLLM_MEMBRAIN_ENDPOINT": "mooncake://a:1,http://b:2"})


# ------------------------------------------------------------------ the transport against a real master


@needs_mooncake
@pytest.mark.anyio
async def test_round_trip_through_the_client_interface(mc, anyio_backend):
    client = make_client(config_for(mc))
    try:
        with anyio.fail_after(GUARD):
            keys = [f"rt-{anyio_backend}-{i}" for i in range(5)]
            values = [payload(k, fill=i) for i, k in enumerate(keys)]
            assert await client.put_many(keys[:3], values[:3]) == 3
            assert await client.lookup(keys) == 3
            assert await client.exists(keys) == [True, True, True, False, False]
            got = await client.get_many(keys[:4])
            assert got[3] is None
            for k, v, g in zip(keys, values, got[:3]):
                assert codec.decode(g, key=k).data == v[1]
            bufs = [memoryview(bytearray(8192)) for _ in range(4)]
            sizes = await client.get_many_into(keys[:4], bufs)
            assert sizes == [4096 + 64] * 3 + [-1]
            assert bytes(bufs[1][: sizes[1]]) == b"".join(values[1])
            small = [memoryview(bytearray(10))]
            # Too big for its buffer: Mooncake's transfer refuses it without saying why, so it reads as a miss
            # (a stored value too short for its buffer is a scatter.MISFIT, as on the other transports).
            assert await client.get_many_into(keys[:1], small) == [-1]
            assert bytes(small[0]) == bytes(10)  # and nothing written into it
            assert await client.delete(keys[0]) is True
            assert await client.lookup(keys) == 0
            assert client.available
    finally:
        await client.aclose()


@needs_mooncake
@pytest.mark.anyio
async def test_namespaces_map_into_the_key(mc, anyio_backend):
    a = make_client(config_for(mc, namespace="tenant-a"))
    b = make_client(config_for(mc, namespace="tenant-b"))
    try:
        with anyio.fail_after(GUARD):
            key = f"ns-{anyio_backend}"
            assert await a.put_many([key], [payload(key)]) == 1
            assert await a.lookup([key]) == 1
            assert await b.lookup([key]) == 0 and await b.get_many([key]) == [None]
    finally:
        await a.aclose()
        await b.aclose()


@needs_mooncake
@pytest.mark.anyio
async def test_a_prefix_lookup_is_one_batch_is_exist(mc, anyio_backend):
    client = make_client(config_for(mc))
    try:
        with anyio.fail_after(GUARD):
            keys = [f"lk-{anyio_backend}-{i}" for i in range(300)]
            assert await client.put_many(keys[:200], [payload(k, 256) for k in keys[:200]]) == 200
            before = client.transport.stats.calls
            assert await client.lookup(keys) == 200
            assert client.transport.stats.calls - before == 1
    finally:
        await client.aclose()


@needs_mooncake
@pytest.mark.anyio
async def test_a_put_replaces_what_the_key_held(mc, anyio_backend):
    """Mooncake's plain put keeps an existing key's old value; ours upserts, so a block the reader found
    corrupt (BlockStore.forget) is repaired by its next save even when Mooncake refused the delete."""
    client = make_client(config_for(mc))
    try:
        with anyio.fail_after(GUARD):
            key = f"up-{anyio_backend}"
            assert await client.put_many([key], [b"old-value"]) == 1
            assert await client.put_many([key], [payload(key)]) == 1
            assert codec.decode((await client.get_many([key]))[0], key=key)
    finally:
        await client.aclose()


@needs_mooncake
@pytest.mark.anyio
async def test_checksum_and_key_tag_are_checked_above_the_client(mc, anyio_backend):
    """What Mooncake hands back is checked by the reader (codec.decode, called by the worker's
    pages.decode_block) before it reaches vLLM: a truncated value (a transfer that stopped half-way), a
    flipped byte, or a valid payload stored under another key is a PayloadError, i.e. a load error that
    vLLM recomputes. The client itself passes bytes through unchanged."""
    client = make_client(config_for(mc))
    try:
        with anyio.fail_after(GUARD):
            good, other = f"ck-{anyio_backend}-good", f"ck-{anyio_backend}-other"
            header, data = payload(good, 8192)
            whole = header + data
            half = f"ck-{anyio_backend}-half"
            flipped = f"ck-{anyio_backend}-flipped"
            bad = bytearray(whole)
            bad[-1] ^= 0xFF
            assert await client.put_many([good, half, flipped, other],
                                         [whole, whole[: len(whole) // 2], bytes(bad), whole]) == 4
            values = await client.get_many([good, half, flipped, other])
            assert codec.decode(values[0], key=good).data == data
            with pytest.raises(codec.PayloadError):
                codec.decode(values[1], key=half)
            with pytest.raises(codec.PayloadError, match="checksum"):
                codec.decode(values[2])
            with pytest.raises(codec.PayloadError):
                codec.decode(values[3], key=other)  # written for `good`: the key tag refuses it
    finally:
        await client.aclose()


@needs_mooncake
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_block_store_saves_and_loads_through_mooncake(mc, backend):
    """The connector's own path (BlockStore: write-behind, uploader, lookups, fetches) on either runtime."""
    store = BlockStore(config_for(mc, async_backend=backend))
    try:
        keys = [f"bs-{backend}-{i}" for i in range(4)]
        for k in keys:
            assert store.save(k, payload(k, 2048))
        assert store.flush(GUARD)
        deadline = time.monotonic() + GUARD
        while store.stats.saves_uploaded < len(keys) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.stats.saves_uploaded == len(keys)
        assert wait(store.lookup(keys + ["bs-missing"])) == 4
        values = wait(store.fetch(keys))
        assert all(codec.decode(v, key=k) for k, v in zip(keys, values))
    finally:
        store.close()


@needs_mooncake
def test_write_behind_stays_bounded_with_mooncake(mc):
    """Saves past VLLM_MEMBRAIN_WRITE_BEHIND_BYTES are dropped and counted, never waited for (the bound
    lives above the client, the same for every backend)."""
    store = BlockStore(config_for(mc, write_behind_bytes=1 << 20))
    try:
        results = [store.save(f"wb-{i}", payload(f"wb-{i}", 256 << 10)) for i in range(40)]
        assert not all(results)
        assert store.stats.saves_dropped == results.count(False) > 0
        assert store.write_behind.bytes <= 1 << 20
        store.flush(GUARD)
    finally:
        store.close()


# ------------------------------------------------------------------ failures: full store, dead master


@needs_mooncake
def test_a_full_store_refuses_saves_which_are_counted_and_it_keeps_serving(tmp_path):
    # 16 MiB of segment, 1 MiB saves one at a time: the store fills faster than Mooncake evicts.
    with mooncake.MooncakeCluster(16 << 20, log_dir=str(tmp_path)) as small:
        store = BlockStore(config_for(small, batch_bytes=1 << 20))
        try:
            keys = [f"full-{i}" for i in range(40)]
            for k in keys:
                assert store.save(k, payload(k, 1 << 20))
                store.flush(GUARD)
            deadline = time.monotonic() + GUARD
            while store.stats.saves_uploaded + store.stats.saves_failed < len(keys) and time.monotonic() < deadline:
                time.sleep(0.01)
            stats = store.client.transport.stats
            assert store.stats.saves_failed > 0 and store.stats.saves_uploaded > 0
            assert stats.puts_refused_full == store.stats.saves_failed  # refused for room, counted as such
            assert store.stats.saves_unavailable == 0  # a full store is not a dead one
            assert store.client.available
        finally:
            store.close()

        # It keeps serving what it holds (Mooncake evicts in the background past its high watermark, so
        # which keys remain is its choice, not necessarily the first ones).
        async def check():
            client = make_client(config_for(small))
            try:
                present = await client.exists(keys)
                held = [k for k, p in zip(keys, present) if p]
                assert held
                for k, v in zip(held, await client.get_many(held)):
                    assert codec.decode(v, key=k)
            finally:
                await client.aclose()

        anyio.run(check)


@needs_mooncake
@pytest.mark.anyio
async def test_a_killed_master_means_unavailable_then_fast_misses(tmp_path, anyio_backend):
    with mooncake.MooncakeCluster(16 << 20, log_dir=str(tmp_path)) as doomed:
        client = make_client(config_for(doomed, timeout=0.5))
        try:
            with anyio.fail_after(GUARD):
                assert await client.put_many(["k"], [payload("k")]) == 1
                doomed.kill_master()
                # Every call ends (Mooncake's own call against a dead master takes ~4 s; ours is abandoned
                # at the timeout) and says "unavailable", never "not stored".
                for op in (lambda: client.lookup(["k"]), lambda: client.get_many(["k"]),
                           lambda: client.exists(["k"]), lambda: client.put_many(["j"], [b"x"])):
                    with pytest.raises(MembrainUnavailable):
                        await op()
                assert not client.available  # the breaker opened: further calls fail fast
                assert client.stats.fast_fails > 0
                # Hung calls are bounded: never more threads than twice the limit.
                assert client.transport.threads.running <= 2 * client.settings.threads
        finally:
            await client.aclose()


@needs_mooncake
def test_an_unreachable_master_at_start_is_a_miss_not_a_hang():
    """setup() against nothing blocks in Mooncake for ~4.4 s per attempt, holding the GIL (every thread of
    the process stops): it is not called until the master's port answers, the caller gets "unavailable",
    and the scheduler's lookup serves that as a miss."""
    cfg = ConnectorConfig.from_sources(env={}, overrides={
        "endpoint": f"mooncake://127.0.0.1:{mooncake.free_port()}",
        "mooncake_metadata_server": f"http://127.0.0.1:{mooncake.free_port()}/metadata",
        "timeout": 0.5, "lookup_deadline": 0.5})
    store = BlockStore(cfg)
    try:
        fut = store.lookup(["a", "b"])
        assert wait(fut, 0) == 0
        assert store.stats.lookups_unavailable + store.stats.lookup_timeouts >= 1
        assert store.save("a", payload("a"))  # saves are queued, never waited for
        transport = store.client.transport
        assert transport.stats.setups == 0 and transport.stats.setup_failures >= 1
    finally:
        store.close(drain=0.5)


def test_without_the_wheel_every_call_is_unavailable_not_a_crash(monkeypatch):
    """A mooncake:// endpoint on a host where the wheel does not load: vLLM runs as plain vLLM."""
    import sys

    from membrain_async.client import mooncake_store

    # None in sys.modules is Python's own "this module cannot be imported" (ImportError on import).
    monkeypatch.setitem(sys.modules, "mooncake", None)
    monkeypatch.setitem(sys.modules, "mooncake.store", None)
    cfg = ConnectorConfig.from_sources(env={"VLLM_MEMBRAIN_ENDPOINT": "mooncake://127.0.0.1:1"})
    client = mooncake_store.open_mooncake_client(cfg)
    assert "does not load" in client.transport.unusable

    async def go():
        with pytest.raises(MembrainUnavailable, match="does not load"):
            await client.lookup(["a"])
        await client.aclose()

    anyio.run(go)


@needs_mooncake
@pytest.mark.anyio
async def test_a_restarted_master_takes_saves_again_with_no_new_client(tmp_path, anyio_backend):
    """Mooncake's master keeps its metadata in memory: a restarted one knows none of the old blocks, and the
    segment registers again by itself; the same client then stores and finds blocks again."""
    with mooncake.MooncakeCluster(16 << 20, log_dir=str(tmp_path)) as mc:
        client = make_client(config_for(mc, breaker_cooldown=0.2))
        try:
            with anyio.fail_after(GUARD):
                assert await client.put_many(["before"], [payload("before")]) == 1
                mc.kill_master()
                mc.start_master()
                while True:
                    try:
                        if await client.put_many(["after"], [payload("after")]) == 1:
                            break
                    except MembrainUnavailable:
                        pass
                    await anyio.sleep(0.2)
                assert await client.lookup(["after"]) == 1
                assert await client.lookup(["before"]) == 0  # gone with the old master
        finally:
            await client.aclose()


# ------------------------------------------------------------------ registered slabs (mooncake_buffers.py)


@needs_mooncake
@pytest.mark.anyio
async def test_gets_and_puts_reuse_a_few_registered_slabs_and_large_values_get_their_own(mc, anyio_backend):
    from membrain_async.client.mooncake_buffers import SLAB_BYTES

    client = make_client(config_for(mc))
    try:
        with anyio.fail_after(GUARD):
            keys = [f"slab-{anyio_backend}-{i}" for i in range(12)]
            values = [payload(k, size=1 << 20, fill=i) for i, k in enumerate(keys)]
            for _ in range(3):
                assert await client.put_many(keys, values) == len(keys)
                bufs = [memoryview(bytearray((1 << 20) + 64)) for _ in keys]
                assert await client.get_many_into(keys, bufs) == [(1 << 20) + 64] * len(keys)
                assert [bytes(b) for b in bufs] == [b"".join(v) for v in values]
            slabs = client.transport._slabs
            pooled = slabs.registered
            assert 1 <= pooled <= client.transport.settings.threads  # reused, not one per call
            big_key = f"slab-big-{anyio_backend}"
            big = payload(big_key, size=SLAB_BYTES + 4096, fill=9)
            assert await client.put_many([big_key], [big]) == 1
            buf = memoryview(bytearray(SLAB_BYTES + 4096 + 64))
            assert await client.get_many_into([big_key], [buf]) == [len(buf)]
            assert bytes(buf) == b"".join(big)
            assert slabs.registered == pooled  # the dedicated slabs were unregistered once used
            for k in keys + [big_key]:  # the module's store is small: leave it as found
                assert await client.delete(k)
    finally:
        await client.aclose()


@needs_mooncake
def test_a_slab_goes_back_only_when_both_the_thread_and_the_caller_are_done(mc):
    from mooncake.store import MooncakeDistributedStore

    from membrain_async.client.mooncake_buffers import Lease, RegisteredSlabs

    store = MooncakeDistributedStore()
    assert store.setup("127.0.0.1", mc.metadata, 0, 16 << 20, "tcp", "", mc.master_addr) == 0
    try:
        slabs = RegisteredSlabs(store, keep=2)
        # The caller gives up first (an abandoned call): the slab stays with the thread until it finishes.
        lease = Lease(slabs)
        lease.arm()
        slab = lease.take(4096)
        lease.close()
        assert slabs._free == []
        lease.finish()
        assert slabs._free == [slab]
        # The thread finishes first: the caller still reads the slab, then gives it back.
        lease = Lease(slabs)
        lease.arm()
        assert lease.take(4096) is slab  # reused
        lease.finish()
        assert slabs._free == []
        lease.close()
        assert slabs._free == [slab]
        # A job that was never queued (refused, or cancelled while waiting its turn): the caller alone.
        lease = Lease(slabs)
        lease.close()
        assert slabs._free == [slab] and slabs.registered == 1
        slabs.close()
        assert slabs.registered == 0
    finally:
        store.close()
