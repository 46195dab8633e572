"""Demo: an embedded Membrain server and a put/get round trip through the async client."""

import os

import anyio

from membrain_async.client import MembrainClient
from membrain_async.server import embedded_server


async def main(url: str) -> None:
    async with MembrainClient(url, namespace="demo") as client:
        value = os.urandom(1 << 20)
        await client.put("block-0", value)
        got = await client.get("block-0")
        print(f"put 1 MiB, got {len(got)} bytes back, identical: {bytes(got) == value}")
        print("prefix lookup of [block-0, block-1]:", await client.lookup(["block-0", "block-1"]))


if __name__ == "__main__":
    with embedded_server(mode="subprocess") as srv:
        print(f"membrain server at {srv.url}")
        anyio.run(main, srv.url)
