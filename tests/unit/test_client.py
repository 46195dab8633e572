"""The async client against a real server, under asyncio and trio."""

import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest

from membrain_async import codec, scatter
from membrain_async.scatter import Scatter
from membrain_async.client import CircuitBreaker, MembrainClient, MembrainRequestError, MembrainUnavailable
from membrain_async.protocol import bulk
from membrain_async.server import embedded_server

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("use_bulk", [True, False], ids=["bulk", "http-batch"])
async def test_roundtrip_every_call(server, use_bulk):
    async with MembrainClient(server.url, namespace="t", use_bulk=use_bulk) as c:
        values = [os.urandom(n) for n in (0, 1, 70_000, 1 << 20)]
        keys = [f"k{i}" for i in range(len(values))]
        assert await c.put_many(keys, values) == 4
        got = await c.get_many(keys + ["missing"])
        assert [None if g is None else bytes(g) for g in got] == values + [None]
        assert await c.lookup(["k0", "k1", "nope", "k2"]) == 2
        assert await c.exists(["k3", "nope"]) == [True, False]
        assert await c.delete("k3") and not await c.delete("k3")
        assert await c.get("k3") is None
        assert await c.health()
    assert c._mode == ("bulk" if use_bulk else "batch")


async def test_put_of_split_buffers_is_not_joined_by_the_caller(server):
    async with MembrainClient(server.url) as c:
        header, payload = b"HDR", memoryview(bytearray(b"p" * 5000))
        assert await c.put("k", (header, payload))
        assert bytes(await c.get("k")) == b"HDR" + b"p" * 5000


async def test_request_errors_raise(server):
    async with MembrainClient(server.url) as c:
        with pytest.raises(MembrainRequestError) as exc:
            await c.put("bad key", b"x")
        assert exc.value.status == 400
        with pytest.raises(MembrainRequestError) as exc:
            await c.put("big", bytes(9 << 20))  # the fixture server takes values up to 8 MiB
        assert exc.value.status == 413
        # A refusal is not an outage: the breaker stays closed.
        assert c.available


async def test_concurrent_calls_share_the_pool(server):
    async with MembrainClient(server.url, bulk_connections=4) as c:
        async def worker(i):
            v = os.urandom(50_000)
            assert await c.put(f"c{i}", v)
            assert bytes(await c.get(f"c{i}")) == v

        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(worker, i)
        assert c._transport.payloads.opened <= 4


async def test_a_lookup_given_up_on_does_not_hold_up_the_next_one(server):
    """A reply still owed (late) on a pipelined connection: later requests go elsewhere, not behind it."""
    from membrain_async.testing.proxy import FaultProxy

    with FaultProxy(server.port) as proxy:
        async with MembrainClient(proxy.url, timeout=10) as c:
            assert await c.put("k", b"v") and await c.lookup(["k"]) == 1
            proxy.delay = 3.0
            with anyio.move_on_after(0.3) as scope:  # the caller's deadline: it gives up
                await c.lookup(["k"])
            assert scope.cancelled_caught
            proxy.delay = 0.0
            with anyio.fail_after(2.0):  # the late reply arrives at 3 s
                assert await c.lookup(["k"]) == 1


async def test_breaker_fails_fast_then_recovers():
    with embedded_server() as srv:
        port = srv.port
        async with MembrainClient(srv.url, timeout=0.5, retries=0, breaker=CircuitBreaker(threshold=2, cooldown=0.3)) as c:
            assert await c.put("k", b"v")
            srv.stop()
            for _ in range(2):
                with pytest.raises(MembrainUnavailable):  # not a miss: the client does not guess
                    await c.get("k")
            assert not c.available
            t = time.perf_counter()
            for _ in range(100):
                with pytest.raises(MembrainUnavailable, match="circuit open"):
                    await c.get("k")
                with pytest.raises(MembrainUnavailable, match="circuit open"):
                    await c.lookup(["k"])
            assert c.stats.fast_fails >= 200
            fast = time.perf_counter() - t
            with embedded_server(port=port):
                await anyio.sleep(0.35)
                assert await c.put("k", b"back")  # the probe call
                assert c.available
                assert bytes(await c.get("k")) == b"back"
    assert fast < 5  # 200 calls with the server down did not each wait for a timeout


@pytest.mark.parametrize("use_bulk", [True, False], ids=["bulk", "http-batch"])
async def test_a_stopped_server_is_unavailable_and_a_missing_key_is_a_miss(use_bulk):
    with embedded_server() as srv:
        async with MembrainClient(srv.url, timeout=0.5, retries=0, use_bulk=use_bulk,
                                  breaker=CircuitBreaker(threshold=100)) as c:
            assert await c.put("k", b"v")
            # A live server: a missing key is a miss, in every call.
            assert await c.get("nope") is None
            assert await c.get_many(["k", "nope"]) == [b"v", None]
            assert await c.get_many_into(["nope"], [memoryview(bytearray(8))]) == [-1]
            assert await c.lookup(["nope", "k"]) == 0
            assert await c.exists(["nope"]) == [False]
            assert await c.delete("nope") is False
            srv.stop()
            # A stopped server: every call says so.
            calls = [
                lambda: c.get("k"),
                lambda: c.get_many(["k"]),
                lambda: c.get_many_into(["k"], [memoryview(bytearray(8))]),
                lambda: c.lookup(["k"]),
                lambda: c.exists(["k"]),
                lambda: c.put("k", b"w"),
                lambda: c.put_many(["k"], [b"w"]),
                lambda: c.delete("k"),
            ]
            for call in calls:
                with pytest.raises(MembrainUnavailable):
                    await call()
            assert c.stats.fast_fails == 0  # each call reached for the dead server, the breaker stayed closed
            assert await c.health() is False


def test_breaker_state_machine():
    now = [0.0]
    b = CircuitBreaker(threshold=2, cooldown=1.0, clock=lambda: now[0])
    assert b.allow()
    b.record_failure()
    assert b.state == "closed"
    b.record_failure()
    assert b.state == "open" and not b.allow()
    now[0] = 1.5
    assert b.allow() and not b.allow()  # exactly one probe
    b.record_failure()
    assert b.state == "open"
    now[0] = 3.0
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow()


class _LegacyHandler(BaseHTTPRequestHandler):
    """A server that only knows /memory/{ns}/{key}, like older Membrain servers."""

    store: dict = {}

    def log_message(self, *a):
        pass

    def _key(self):
        parts = self.path.split("/")
        return (parts[2], parts[3]) if len(parts) == 4 and parts[1] == "memory" else None

    def do_PUT(self):
        k = self._key()
        self.store[k] = self.rfile.read(int(self.headers["content-length"]))
        self.send_response(201)
        self.send_header("content-length", "0")
        self.end_headers()

    def _reply(self, body: bool):
        k = self._key()
        if k is None or k not in self.store:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-length", str(len(self.store[k])))
        self.end_headers()
        if body:
            self.wfile.write(self.store[k])

    def do_GET(self):
        self._reply(True)

    def do_HEAD(self):
        self._reply(False)


async def test_fallback_to_per_key_calls_on_a_plain_memory_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _LegacyHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        async with MembrainClient(f"http://127.0.0.1:{httpd.server_address[1]}") as c:
            assert await c.put_many(["a", "b"], [b"1", (b"2", b"2")]) == 2
            assert [bytes(v) if v else None for v in await c.get_many(["a", "x", "b"])] == [b"1", None, b"22"]
            assert await c.lookup(["a", "b", "x"]) == 2
            assert c._mode == "legacy"
    finally:
        httpd.shutdown()


def test_garbage_on_the_bulk_port_gets_an_error_frame(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(bulk.HEADER.pack(b"MBRN", 1, 2, 0, 5, 10, 0) + b"not json!!")
        frame, _ = bulk.FrameReader().feed(s.recv(1000))
        assert frame.status == 400 and "JSON" in frame.head["error"]
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        # Sizes that do not add up to the body: refused, body discarded, connection still usable.
        s.sendall(bulk.encode_frame(bulk.Op.PUT, 1, {"ns": "a", "keys": ["k"], "sizes": [5]}, 3) + b"abc")
        s.sendall(bulk.encode_frame(bulk.Op.PING, 2))
        reader = bulk.FrameReader()
        first, rest = reader.feed(s.recv(1000))
        assert first.status == 400
        second, _ = bulk.FrameReader().feed(rest or s.recv(1000))
        assert second.request_id == 2 and second.head == {"pong": True}
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        # An absurd body length: refused and closed, nothing allocated.
        s.sendall(bulk.encode_frame(bulk.Op.PUT, 1, {"ns": "a", "keys": ["k"], "sizes": [1 << 60]}, 1 << 60))
        frame, _ = bulk.FrameReader().feed(s.recv(1000))
        assert frame.status == 413


async def test_batches_larger_than_the_server_limit_are_split(server):
    # The fixture server allows 256 keys per request; the client learns it from /v1/info.
    async with MembrainClient(server.url) as c:
        keys = [f"many{i}" for i in range(700)]
        assert await c.put_many(keys, [b"v"] * 700) == 700
        assert all(v is not None for v in await c.get_many(keys))
        assert await c.exists(keys) == [True] * 700
        assert await c.lookup(keys + ["absent"]) == 700


@pytest.mark.parametrize("use_bulk", [True, False], ids=["bulk", "http-batch"])
async def test_get_many_into_caller_buffers(server, use_bulk):
    async with MembrainClient(server.url, use_bulk=use_bulk) as c:
        await c.put_many(["a", "b", "big"], [b"x" * 100, b"y" * 10, b"z" * 500])
        bufs = [memoryview(bytearray(200)) for _ in range(4)]
        sizes = await c.get_many_into(["a", "missing", "b", "big"], bufs)
        # "big" is stored but does not fit its 200-byte buffer: not a miss (a load fails its check and repairs it)
        assert sizes == [100, -1, 10, scatter.MISFIT] and bytes(bufs[3]) == bytes(200)
        assert bytes(bufs[0][:100]) == b"x" * 100 and bytes(bufs[2][:10]) == b"y" * 10
        assert await c.get("a") is not None  # the connection is still in step after the skipped value


async def test_a_scatter_received_over_bulk_is_summed_as_it_lands_and_checks_like_a_full_pass(server):
    """A load into the KV pages: the bulk transport feeds each page to the block's running checksum as it
    completes, so the check reads one number; that number is the checksum of what landed, a bad byte too."""
    data = os.urandom(3 * 4096)
    good = codec.encode(data, dtype="uint8", shape=(len(data),), key="g")
    bad = bytearray(good)
    bad[-1] ^= 1  # stored with one flipped bit
    async with MembrainClient(server.url) as c:
        await c.put_many(["g", "b"], [good, bytes(bad)])
        dest = [Scatter([bytearray(codec.HEADER_SIZE), *(bytearray(4096) for _ in range(3))], codec.running_checksum)
                for _ in range(2)]
        assert await c.get_many_into(["g", "b"], dest) == [len(good)] * 2
    assert dest[0].tobytes() == good and dest[0].landed_sum() == codec.checksum(data)
    codec.decode_pieces(dest[0].parts, key="g", landed_sum=dest[0].landed_sum())
    assert dest[1].landed_sum() == codec.checksum(bytes(bad[codec.HEADER_SIZE:]))
    with pytest.raises(codec.PayloadError, match="checksum"):
        codec.decode_pieces(dest[1].parts, key="g", landed_sum=dest[1].landed_sum())


@pytest.mark.anyio
async def test_connections_the_server_closed_while_idle_are_redialled_not_failed():
    from membrain_async.server import embedded_server

    with embedded_server(idle_timeout=0.3) as srv:
        async with MembrainClient(srv.url, retries=0) as c:
            assert await c.put_many(["a", "b"], [b"x" * 5000, b"y" * 5000]) == 2
            await anyio.sleep(0.8)  # the server closes the pooled connections
            assert await c.put_many(["c"], [b"z" * 5000]) == 1
            assert [bytes(v) for v in await c.get_many(["a", "c"])] == [b"x" * 5000, b"z" * 5000]
            assert c.stats.failures == 0


def test_a_plain_http_client_loads_no_ca_store_and_would_verify_any_tls_it_met():
    """http:// never negotiates TLS, so its HTTP client skips the CA bundle (a first call's ~20 ms); the
    context it holds instead trusts nothing, so it cannot be mistaken for verify=False."""
    import ssl

    async def contexts():
        async with MembrainClient("http://127.0.0.1:1") as plain, MembrainClient("https://127.0.0.1:1") as tls:
            return (plain._http_client()._transport._pool._ssl_context,
                    tls._http_client()._transport._pool._ssl_context)

    plain, tls = anyio.run(contexts)
    assert plain.cert_store_stats()["x509_ca"] == 0
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname
    assert tls.verify_mode == ssl.CERT_REQUIRED and tls.check_hostname
