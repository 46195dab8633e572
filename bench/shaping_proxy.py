"""A TCP proxy that shapes bandwidth, as a network link would: one link per direction, shared by every
connection through it, each at `rate` bytes per second.

    python bench/shaping_proxy.py --upstream PORT [--rate 100e6]

prints {"port": ...} and then serves; a line "rate N" on stdin changes the rate from then on (0: unshaped),
answered by {"rate": N}. A chunk of n bytes leaves once the link has carried what was queued before it and
n / rate seconds have passed, so concurrent connections share the rate and a lookup waits behind a load.
It runs in its own process, so its work never holds the GIL of the engine it measures.
(`membrain_async.testing.proxy` injects faults, in the test's own process; it does not shape.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

CHUNK = 1 << 20  # at 100 MB/s a chunk is 10 ms on the wire, at 1 GB/s 1 ms: smooth enough, and cheap


class Link:
    def __init__(self, rate: float):
        self.rate = rate
        self.free_at = 0.0  # when the link has sent everything queued so far
        self.bytes = 0

    def departure(self, n: int) -> float:
        """When a chunk of n bytes, queued now, has crossed the link."""
        self.bytes += n
        now = time.monotonic()
        if self.rate <= 0:
            return now
        self.free_at = max(now, self.free_at) + n / self.rate
        return self.free_at


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    # Reading and sending are two tasks, so the proxy's own work overlaps the time chunks spend on the wire.
    queue: asyncio.Queue = asyncio.Queue(maxsize=64)  # at most 64 MiB in flight per connection and direction

    async def send() -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            depart, data = item
            delay = depart - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            await queue.put((link.departure(len(data)), data))
        await queue.put(None)
        await sender
    except (ConnectionError, OSError):
        pass
    finally:
        sender.cancel()
        try:
            writer.close()
        except Exception:
            pass


async def serve(upstream: tuple[str, int], rate: float) -> None:
    links = {"up": Link(rate), "down": Link(rate)}

    live: set = set()  # asyncio holds connection tasks weakly: one collected mid-transfer broke a connection

    async def handle(client_r, client_w) -> None:
        task = asyncio.current_task()
        live.add(task)
        try:
            try:
                server_r, server_w = await asyncio.open_connection(*upstream)
            except OSError:
                client_w.close()
                return
            await asyncio.gather(pump(client_r, server_w, links["up"]), pump(server_r, client_w, links["down"]))
        finally:
            live.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with server:
        while True:
            line = (await stdin.readline()).decode().split()
            if not line:
                if stdin.at_eof():
                    return
                continue
            if line[0] == "rate":
                for link in links.values():
                    link.rate = float(line[1])
                print(json.dumps({"rate": float(line[1])}), flush=True)
            elif line[0] == "bytes":
                print(json.dumps({k: v.bytes for k, v in links.items()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", type=int, required=True)
    ap.add_argument("--upstream-host", default="127.0.0.1")
    ap.add_argument("--rate", type=float, default=0.0, help="bytes per second per direction; 0: unshaped")
    args = ap.parse_args()
    asyncio.run(serve((args.upstream_host, args.upstream), args.rate))


if __name__ == "__main__":
    main()
