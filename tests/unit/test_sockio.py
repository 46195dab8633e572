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
