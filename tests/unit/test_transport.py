"""The store protocol's batch splitting, the pipelined bulk connection (against a scripted peer on a
socketpair), and the client over a fake transport: every operation split once, by keys and by bytes."""

import socket

import anyio
import pytest

from membrain_async import sockio
from membrain_async.client import MembrainClient, MembrainRequestError
from membrain_async.client.bulkconn import BulkConnection, BulkPool, ConnectionLost
from membrain_async.client.store import Limits, split
from membrain_async.protocol import bulk
from membrain_async.protocol.bulk import FrameReader, Op
from membrain_async.protocol.heads import GetReply, GetRequest, LookupRequest

pytestmark = pytest.mark.anyio


# --- split -------------------------------------------------------------------------------------------


def test_split_by_key_count():
    assert split(0, Limits(3)) == []
    assert split(7, Limits(3)) == [range(0, 3), range(3, 6), range(6, 7)]
    assert split(3, Limits(3)) == [range(0, 3)]


def test_split_by_bytes_and_keys():
    sizes = [4, 4, 4, 4, 4]
    assert split(5, Limits(10, max_bytes=8), sizes) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split(5, Limits(2, max_bytes=100), sizes) == [range(0, 2), range(2, 4), range(4, 5)]
    # A value bigger than the byte limit goes alone; its neighbours are not held back.
    assert split(4, Limits(10, max_bytes=8), [1, 20, 1, 1]) == [range(0, 1), range(1, 2), range(2, 4)]
    assert split(3, Limits(10, max_bytes=None), [50, 50, 50]) == [range(0, 3)]
    with pytest.raises(ValueError):
        split(3, Limits(10, max_bytes=8), [1, 2])


# --- pipelining on one connection ----------------------------------------------------------------------


class Peer:
    """The server end of a socketpair, scripted by the test: read request frames, answer in any order."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = FrameReader()

    async def read_request(self) -> bulk.Frame:
        while True:
            n = await sockio.recv_into(self.sock, self.reader.want())
            assert n, "client closed"
            frame = self.reader.advance(n)
            if frame is not None:
                if frame.body_len:
                    await sockio.recv_exactly_into(self.sock, memoryview(bytearray(frame.body_len)))
                return frame

    async def reply(self, request: bulk.Frame, head: dict, body: bytes = b"", status: int = 0) -> None:
        reply = bulk.encode_frame(request.op | bulk.REPLY_BIT, request.request_id, head, len(body), status)
        await sockio.send_all(self.sock, [reply, body])


def pair() -> tuple[BulkConnection, Peer]:
    a, b = socket.socketpair()
    return BulkConnection(sockio.configure(a)), Peer(sockio.configure(b))


async def test_replies_are_matched_to_requests_by_id_in_any_order():
    conn, peer = pair()
    results: dict[int, dict] = {}

    async def ask(i: int) -> None:
        results[i] = (await conn.call(LookupRequest("d", [f"k{i}"]))).head

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(ask, i)
        requests = [await peer.read_request() for _ in range(3)]
        assert conn.inflight == 3 and len({r.request_id for r in requests}) == 3
        for r in reversed(requests):  # answered last first
            await peer.reply(r, {"count": int(r.head["keys"][0][1:]) * 10})
    assert results == {0: {"count": 0}, 1: {"count": 10}, 2: {"count": 20}}
    assert conn.inflight == 0 and conn.broken is None
    conn.close()


async def test_reply_bodies_land_in_their_own_requests_buffers_out_of_order():
    conn, peer = pair()
    got: dict[str, bytes] = {}

    async def fetch(key: str) -> None:
        buf = bytearray(16)

        def sink(frame):
            (size,) = GetReply.from_frame(frame, 1).sizes
            return [memoryview(buf)[:size]]

        frame = await conn.call(GetRequest("d", [key]), sink=sink)
        got[key] = bytes(buf[: frame.body_len])

    async with anyio.create_task_group() as tg:
        for key in ("a", "b", "c"):
            tg.start_soon(fetch, key)
        requests = [await peer.read_request() for _ in range(3)]
        for r in (requests[1], requests[2], requests[0]):
            value = (r.head["keys"][0] * 5).encode()
            await peer.reply(r, {"sizes": [len(value)]}, value)
    assert got == {"a": b"aaaaa", "b": b"bbbbb", "c": b"ccccc"}
    conn.close()


async def test_a_refusal_fails_its_request_only():
    conn, peer = pair()
    outcomes: dict[int, object] = {}

    async def ask(i: int) -> None:
        try:
            outcomes[i] = (await conn.call(LookupRequest("d", [str(i)]))).head["count"]
        except MembrainRequestError as exc:
            outcomes[i] = exc.status

    async with anyio.create_task_group() as tg:
        for i in range(2):
            tg.start_soon(ask, i)
        r0, r1 = sorted([await peer.read_request() for _ in range(2)], key=lambda r: r.head["keys"])
        await peer.reply(r0, {"error": "no"}, status=403)
        await peer.reply(r1, {"count": 1})
    assert sorted(outcomes.items()) == [(0, 403), (1, 1)]
    assert conn.broken is None
    conn.close()


async def test_a_connection_dying_fails_exactly_the_requests_in_flight_on_it():
    conn, peer = pair()
    other, other_peer = pair()
    outcomes: dict[str, object] = {}

    async def ask(name: str, c: BulkConnection) -> None:
        try:
            outcomes[name] = (await c.call(LookupRequest("d", [name]))).head["count"]
        except ConnectionLost:
            outcomes[name] = "lost"

    async with anyio.create_task_group() as tg:
        for name in ("a", "b", "c"):
            tg.start_soon(ask, name, conn)
        tg.start_soon(ask, "elsewhere", other)
        ra, rb, rc = sorted([await peer.read_request() for _ in range(3)], key=lambda r: r.head["keys"])
        await peer.reply(rb, {"count": 2})
        while "b" not in outcomes:
            await anyio.sleep(0.001)
        peer.sock.close()  # with a and c still waiting
        await other_peer.reply(await other_peer.read_request(), {"count": 7})
    assert outcomes == {"a": "lost", "b": 2, "c": "lost", "elsewhere": 7}
    assert conn.broken is not None and conn.inflight == 0
    with pytest.raises(ConnectionLost):
        await conn.call(LookupRequest("d", ["later"]))  # never reused
    assert other.broken is None
    other.close()


async def test_a_request_that_gives_up_leaves_the_others_working_and_retires_the_connection():
    conn, peer = pair()
    result = {}

    async def patient() -> None:
        result["patient"] = (await conn.call(LookupRequest("d", ["p"]))).head["count"]

    async def impatient() -> None:
        with anyio.move_on_after(0.05):
            await conn.call(LookupRequest("d", ["i"]))
            result["impatient"] = "answered"

    async with anyio.create_task_group() as tg:
        tg.start_soon(impatient)
        await anyio.sleep(0.01)
        tg.start_soon(patient)
        ri, rp = sorted([await peer.read_request() for _ in range(2)], key=lambda r: r.head["keys"])
        await anyio.sleep(0.1)  # the impatient one (the reader, perhaps) has given up meanwhile
        await peer.reply(ri, {"count": 1})  # a reply nobody waits for: discarded
        await peer.reply(rp, {"count": 5})
    assert result == {"patient": 5}
    # Retired: a reply was owed when the impatient one gave up (it could have come much later, and a
    # request sent after it would have waited behind it), so the connection closed once it was idle.
    assert conn.retired and conn.broken is not None and conn.inflight == 0


async def test_a_reply_that_does_not_add_up_breaks_the_connection():
    conn, peer = pair()

    async def fetch():
        return await conn.call(GetRequest("d", ["a"]), sink=lambda f: [memoryview(bytearray(GetReply.from_frame(f, 1).sizes[0]))])

    async with anyio.create_task_group() as tg:
        async def run():
            with pytest.raises(bulk.ProtocolError):
                await fetch()

        tg.start_soon(run)
        r = await peer.read_request()
        await peer.reply(r, {"sizes": [3, 4]}, b"abc")  # two sizes for one key
    assert conn.broken is not None


# --- against a real server ----------------------------------------------------------------------------


async def test_lookups_share_a_pipelined_connection(server):
    async with MembrainClient(server.url) as c:
        assert await c.put_many(["a", "b"], [b"1", b"2"]) == 2
        counts: list[int] = []

        async def ask() -> None:
            counts.append(await c.lookup(["a", "b", "z"]))

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(ask)
        assert counts == [2] * 40
        control: BulkPool = c._transport.control
        assert control.opened <= 2  # 40 at once, up to 32 on one connection
        assert c._transport.payloads.opened >= 1


async def test_a_request_is_in_flight_until_its_reply_body_is_read():
    """A connection reading a body is not idle: the pool must neither place another payload on it nor peek
    at it (the peek would see the body's bytes, take the connection for dead and close it under the reader)."""
    conn, peer = pair()
    buf = bytearray(1 << 16)

    async def fetch() -> None:
        await conn.call(GetRequest("d", ["k"]), sink=lambda frame: [memoryview(buf)])

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch)
        request = await peer.read_request()
        body = bytes(range(256)) * 256
        await sockio.send_all(peer.sock, [bulk.encode_frame(request.op | bulk.REPLY_BIT, request.request_id, {"sizes": [len(body)]}, len(body)), body[:1000]])
        await anyio.sleep(0.05)  # the reader has taken the head and the first bytes
        assert conn.inflight == 1
        await sockio.send_all(peer.sock, [body[1000:]])
    assert bytes(buf) == body and conn.inflight == 0
    conn.close()


async def test_concurrent_payload_gets_on_one_client_all_succeed(server):
    value = bytes(range(256)) * 4096  # 1 MiB
    async with MembrainClient(server.url, timeout=30) as c:
        keys = [f"v{i}" for i in range(32)]
        assert await c.put_many(keys, [value] * len(keys)) == len(keys)
        got: list[bool] = []

        async def stream(s: int) -> None:
            for r in range(8):
                chunk = [keys[(s * 8 + r * 4 + j) % len(keys)] for j in range(8)]
                got.extend(v is not None and bytes(v) == value for v in await c.get_many(chunk))

        async with anyio.create_task_group() as tg:
            for s in range(4):
                tg.start_soon(stream, s)
        assert got == [True] * 4 * 8 * 8
        assert c.stats.failures == 0


# --- the client over a fake transport: split once -----------------------------------------------------


class FakeTransport:
    name = "fake"

    def __init__(self, limits: Limits):
        self.limits = limits
        self.calls: list[tuple[str, list[str]]] = []
        self.store: dict[str, bytes] = {}

    async def lookup(self, ns, keys):
        self.calls.append(("lookup", keys))
        n = 0
        while n < len(keys) and keys[n] in self.store:
            n += 1
        return n

    async def exists(self, ns, keys):
        self.calls.append(("exists", keys))
        return [k in self.store for k in keys]

    async def get(self, ns, keys):
        self.calls.append(("get", keys))
        return [memoryview(self.store[k]) if k in self.store else None for k in keys]

    async def get_into(self, ns, keys, buffers):
        self.calls.append(("get_into", keys))
        return [len(self.store[k]) if k in self.store else -1 for k in keys]

    async def put(self, ns, keys, values):
        self.calls.append(("put", keys))
        for k, v in zip(keys, values):
            self.store[k] = bytes(v)
        return len(keys)

    async def delete(self, ns, keys):
        self.calls.append(("delete", keys))
        return sum(self.store.pop(k, None) is not None for k in keys)

    def close(self):
        pass


async def test_every_operation_is_split_to_the_transports_limits():
    c = MembrainClient("http://127.0.0.1:1")
    t = FakeTransport(Limits(max_keys=3, max_bytes=10))
    c._transport = t
    keys = [f"k{i}" for i in range(7)]
    assert await c.put_many(keys, [b"12345"] * 7) == 7  # 2 values fit 10 bytes
    assert [len(k) for op, k in t.calls] == [2, 2, 2, 1]
    t.calls.clear()
    assert [bytes(v) for v in await c.get_many(keys)] == [b"12345"] * 7
    assert [len(k) for op, k in t.calls] == [3, 3, 1]
    assert await c.exists(keys + ["nope"]) == [True] * 7 + [False]
    assert await c.get_many_into(keys[:4], [memoryview(bytearray(8))] * 4) == [5] * 4
    t.calls.clear()
    assert await c.lookup(["k0", "k1", "k2", "k3", "nope", "k5", "k6"]) == 4
    assert [k for op, k in t.calls] == [["k0", "k1", "k2"], ["k3", "nope", "k5"]]  # stops at the first gap
    assert await c.delete("k0") is True and await c.delete("k0") is False
    assert c.stats.bytes_put == 35
    await c.aclose()


async def test_payload_bodies_pause_while_a_small_request_is_in_flight(monkeypatch):
    from membrain_async.client import transports
    from membrain_async.client.store import Limits
    from membrain_async.client.transports import BulkTransport

    monkeypatch.setattr(transports, "PACE_LIMIT", 60.0)  # the pause is bounded; here only its order is checked
    t = BulkTransport("127.0.0.1", 1, None, 2, None, Limits())
    events = []
    release = anyio.Event()

    class Control:
        async def run(self, fn):
            events.append("small sent")
            await release.wait()
            events.append("small answered")
            return bulk.Frame(Op.LOOKUP | bulk.REPLY_BIT, 0, 1, {"count": 3}, 0)

        def close(self):
            pass

    t.control = Control()
    counts = []

    async def lookup():
        counts.append(await t.lookup("d", ["a"]))

    async def body_chunk():
        await t._pace()  # what a payload body awaits between its chunks
        events.append("chunk")

    async with anyio.create_task_group() as tg:
        tg.start_soon(lookup)
        await anyio.sleep(0.001)
        tg.start_soon(body_chunk)
        await anyio.sleep(0.001)
        release.set()
    assert counts == [3]
    assert events == ["small sent", "small answered", "chunk"]  # the chunk waited for the answer
    await body_chunk()  # nothing in flight: no wait
    t.close()
