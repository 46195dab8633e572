"""How send_all shapes its syscalls, over a real socket pair (the socket records each sendmsg's size)."""

from __future__ import annotations

import socket

import anyio
import pytest

from membrain_async import sockio


class CountingSocket(socket.socket):
    """A real socket that notes how many bytes each sendmsg took."""

    def __init__(self, fileno: int):
        super().__init__(fileno=fileno)
        self.sends: list[int] = []

    def sendmsg(self, buffers, *args):  # type: ignore[override]
        n = super().sendmsg(buffers, *args)
        self.sends.append(n)
        return n


async def send_and_drain(buffers: list[bytes]) -> tuple[list[int], bytes]:
    a, b = socket.socketpair()
    sender = CountingSocket(a.detach())
    sockio.configure(sender)
    sockio.configure(b)
    total = sum(len(x) for x in buffers)
    got = bytearray(total)
    try:
        async with anyio.create_task_group() as tg:
            async def drain() -> None:
                await sockio.recv_exactly_into(b, memoryview(got))

            tg.start_soon(drain)
            await sockio.send_all(sender, buffers)
        return sender.sends, bytes(got)
    finally:
        sender.close()
        b.close()


@pytest.mark.anyio
async def test_a_frame_head_goes_with_its_body_in_one_syscall(anyio_backend):
    head, body = b"h" * 100, bytes(range(256)) * 4096  # a 1 MiB value
    sends, got = await send_and_drain([head, body])
    assert got == head + body
    assert sends[0] > len(head)  # never the head alone (the kernel may take less than all of the rest)


@pytest.mark.anyio
async def test_a_large_body_is_cut_near_the_fair_share_with_the_head_in_the_first_piece(anyio_backend):
    head, body = b"h" * 100, b"\x07" * (4 * sockio.FAIR_SHARE)
    sends, got = await send_and_drain([head, body])
    assert got == head + body
    assert sends[0] > len(head)  # the head did not go alone
    assert max(sends) <= sockio.FAIR_SHARE + sockio.HEAD_ROOM  # no syscall hogs the loop with more
    assert len(sends) >= 4


# ------------------------------------------------------------------ wake-ups while a large body is read


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return sockio.configure(a), sockio.configure(b)


def lowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


def test_a_large_body_asks_for_batches_never_more_than_it_owes_and_gives_the_next_head_one_byte():
    a, b = tcp_pair()
    try:
        wakeups = sockio.BodyWakeups(b)
        wakeups.expect(16 << 20)
        assert lowat(b) == sockio.RECV_BATCH
        wakeups.expect(sockio.RECV_BATCH // 2)  # the body's tail: no more than it still owes
        assert lowat(b) == sockio.RECV_BATCH // 2
        wakeups.expect(1000)  # a small rest: wake for any byte
        assert lowat(b) == 1
        wakeups.expect(16 << 20)
        wakeups.done()
        assert lowat(b) == 1  # the next frame's head is read as soon as it lands
        small = sockio.BodyWakeups(b)
        small.expect(4096)  # a small body is read as before: no syscall at all
        assert lowat(b) == 1 and small.current == 1
    finally:
        a.close()
        b.close()


def test_a_body_sent_in_small_pieces_is_read_whole_in_few_wake_ups(monkeypatch):
    from membrain_async.client.bulkconn import BulkConnection, ReplyBody

    a, b = tcp_pair()
    waits = []
    real_wait = anyio.wait_readable

    async def counted(sock):
        waits.append(sock)
        await real_wait(sock)

    monkeypatch.setattr(sockio.anyio, "wait_readable", counted)
    size = 4 << 20
    got = bytearray(size)
    data = bytes(range(256)) * (size // 256)

    async def main() -> None:
        conn = BulkConnection(b)
        async with anyio.create_task_group() as tg:
            async def send() -> None:
                for i in range(0, size, 64 << 10):  # 64 KiB at a time, as segments land
                    await sockio.send_all(a, [data[i : i + (64 << 10)]])
                    await anyio.sleep(0.001)

            tg.start_soon(send)
            with anyio.fail_after(30):
                await conn._read_body(ReplyBody([memoryview(got)[: size - 1000], memoryview(got)[size - 1000 :]]))

    try:
        anyio.run(main)
        assert bytes(got) == data
        # A wake-up per 64 KiB piece would be 64; each one waits for RECV_BATCH bytes (or the rest) instead.
        assert len(waits) <= size // sockio.RECV_BATCH + 2
        assert lowat(b) == 1
    finally:
        a.close()
        b.close()


@pytest.mark.anyio
async def test_one_scatter_receive_fills_several_buffers_in_order(anyio_backend):
    a, b = socket.socketpair()
    sockio.configure(a)
    sockio.configure(b)
    try:
        data = bytes(range(256)) * 40  # 10240 bytes
        a.sendall(data)
        bufs = [memoryview(bytearray(n)) for n in (1000, 4000, 5240)]
        got = 0
        while got < len(data):  # the kernel may hand them over in more than one go; each fills in order
            left, skip = [], got
            for buf in bufs:
                if skip >= len(buf):
                    skip -= len(buf)
                    continue
                left.append(buf[skip:])
                skip = 0
            got += await sockio.recv_into_many(b, left)
        assert b"".join(bytes(x) for x in bufs) == data
    finally:
        a.close()
        b.close()
