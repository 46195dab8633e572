"""A TCP proxy that injects faults between a client and a Membrain server, for tests and benchmarks.

    with FaultProxy(upstream_port) as proxy:          # own thread and event loop, free port
        proxy.delay = 0.05                            # every server reply arrives 50 ms late
        proxy.mode = "blackhole"                      # accept, read, never answer
        proxy.mode = "reset"                          # new and open connections are reset
        proxy.truncate_replies_over = 4096            # a reply chunk larger than this is cut short, then closed
        proxy.hold_replies_over = 4096                # reply chunks larger than this wait for release
        proxy.held.wait(); ...; proxy.hold_replies_over = None   # a load is provably in flight here
        proxy.hold_requests_over = 4096               # the same for client data: a save is in flight

Changing a setting affects data from then on; `mode` applies to connections already open too.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import anyio
from anyio.from_thread import start_blocking_portal

MODES = ("pass", "blackhole", "reset")


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.delay = 0.0
        self.mode = "pass"
        self.truncate_replies_over: int | None = None
        self.truncated = 0
        self.hold_replies_over: int | None = None
        self.hold_requests_over: int | None = None
        self.held = threading.Event()
        self.connections = 0
        self.port: int | None = None
        self._portal_cm = None
        self._future = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FaultProxy":
        self._portal_cm = start_blocking_portal("asyncio")
        portal = self._portal_cm.__enter__()
        self._future, self.port = portal.start_task(self._serve, name="fault-proxy")
        return self

    def __exit__(self, *exc) -> None:
        portal = self._portal_cm  # type: ignore[assignment]
        self._future.cancel()  # type: ignore[union-attr]
        portal.__exit__(None, None, None)  # type: ignore[union-attr]

    async def _serve(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started(port)
            await listener.serve(self._handle)

    async def _handle(self, client) -> None:
        self.connections += 1
        async with client:
            if self.mode == "reset":
                _reset(client)
                return
            try:
                upstream = await anyio.connect_tcp(*self.upstream)
            except OSError:
                _reset(client)
                return
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, upstream, False, tg.cancel_scope)
                tg.start_soon(self._pump, upstream, client, True, tg.cancel_scope)

    async def _pump(self, src, dst, is_reply: bool, scope) -> None:
        send, receive = anyio.create_memory_object_stream(max_buffer_size=1 << 16)

        async def forward() -> None:
            async with receive:
                async for arrived, data in receive:
                    if is_reply and self.delay:
                        await anyio.sleep(max(0.0, arrived + self.delay - time.monotonic()))
                    hold = self.hold_replies_over if is_reply else self.hold_requests_over
                    if hold is not None and len(data) > hold:
                        self.held.set()
                        while (self.hold_replies_over if is_reply else self.hold_requests_over) is not None:
                            await anyio.sleep(0.01)
                    if self.mode == "reset":
                        _reset(dst)
                        scope.cancel()
                        return
                    if self.mode == "blackhole":
                        continue
                    if is_reply and self.truncate_replies_over is not None and len(data) > self.truncate_replies_over:
                        # Small replies (lookups) pass; a payload arrives cut short, then the connection drops.
                        self.truncated += 1
                        await dst.send(data[: self.truncate_replies_over])
                        scope.cancel()
                        return
                    await dst.send(data)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(forward)
                async with send:
                    while True:
                        try:
                            data = await src.receive(1 << 20)
                        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                            break
                        await send.send((time.monotonic(), data))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        scope.cancel()


def _reset(stream) -> None:
    """Close with RST instead of FIN, as a crashed or firewalled peer would."""
    try:
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except Exception:
        pass


def main() -> None:
    """`python -m membrain_async.testing.proxy --upstream PORT [--delay S]`: prints {"port": ...} then runs."""
    import argparse
    import sys

    import orjson

    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    proxy = FaultProxy(args.upstream)
    proxy.delay = args.delay

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(proxy._serve)
            sys.stdout.write(orjson.dumps({"port": port}).decode() + "\n")
            sys.stdout.flush()

    anyio.run(run)


if __name__ == "__main__":
    main()
