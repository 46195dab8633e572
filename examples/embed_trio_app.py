"""Embedding Membrain in a trio server: a line protocol over TCP ("SAVE key value", "LOAD key", "LOOKUP k1 k2 ...").

The trio loop serves clients; Membrain I/O runs on the runtime's own thread (asyncio by default, or trio
with VLLM_MEMBRAIN_ASYNC_BACKEND=trio: a separate loop either way).

    python examples/embed_trio_app.py               # embedded Membrain server, app on :8001
"""

from __future__ import annotations

import os

import trio

from membrain_async.cache import BlockStore
from membrain_async.client import MembrainRequestError, MembrainUnavailable
from membrain_async.config import ConnectorConfig
from membrain_async.protocol.names import validate_key
from membrain_async.runtime.aio import wait_async

ARITY = {"SAVE": 2, "LOAD": 1}  # LOOKUP takes one key or more


class BadRequest(Exception):
    """A line the app cannot serve: the client is told why, and the connection goes on."""


def parse(line: bytes) -> list[str]:
    try:
        words = line.decode().split()
    except UnicodeDecodeError:
        raise BadRequest("not UTF-8") from None
    command, args = (words[0], words[1:]) if words else ("", [])
    if command not in ("SAVE", "LOAD", "LOOKUP"):
        raise BadRequest(f"unknown command {command[:20]!r}")
    if len(args) != ARITY.get(command, len(args)) or not args:
        raise BadRequest(f"{command} takes {ARITY.get(command, 'one or more')} argument(s)")
    keys = args[:1] if command == "SAVE" else args
    for key in keys:
        try:
            validate_key(key)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    return words


async def answer(runtime: BlockStore, words: list[str]) -> str:
    """The reply to a line parse() accepted."""
    if words[0] == "SAVE":
        ok = runtime.save(words[1], [words[2].encode()])
        ok = ok and runtime.flush(5)
        return "OK" if ok else "DROPPED"
    if words[0] == "LOAD":
        (value,) = await wait_async(runtime.fetch([words[1]]))
        return "MISS" if value is None else f"VALUE {bytes(value).decode()}"
    return f"COUNT {await wait_async(runtime.lookup(words[1:]))}"  # LOOKUP (parse() let nothing else through)


def make_handler(runtime: BlockStore):
    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        async for chunk in stream:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    reply = await answer(runtime, parse(line))
                except BadRequest as exc:
                    reply = f"ERR {exc}"
                except MembrainRequestError as exc:  # the Membrain server refused it (a limit, auth)
                    reply = f"ERR {exc.message}"
                except MembrainUnavailable:  # the server is down: say so, rather than "MISS"
                    reply = "UNAVAILABLE"
                await stream.send_all(reply.encode() + b"\n")

    return handle


async def serve(membrain_url: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    cfg = ConnectorConfig.from_sources(overrides={"endpoint": membrain_url})
    runtime = BlockStore(cfg)
    try:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(make_handler(runtime), listeners)
    finally:
        runtime.close()


if __name__ == "__main__":
    from membrain_async.server import embedded_server

    with embedded_server() as srv:
        trio.run(serve, srv.url, int(os.environ.get("PORT", "8001")))
