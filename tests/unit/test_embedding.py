"""The runtime inside hosts that run their own event loop: the examples, exercised for real."""

import importlib.util
import os

import anyio
import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_asyncio_starlette_app(server):
    app = load_example("embed_asyncio_app").build_app(server.url)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            assert (await c.put("/save/blk0", content=b"page-bytes")).json() == {"queued": True}
            assert (await c.post("/flush")).json() == {"flushed": True}
            assert (await c.get("/load/blk0")).json() == {"found": True, "bytes": 10}
            assert (await c.get("/load/none")).json() == {"found": False, "bytes": 0}
            assert (await c.post("/lookup", json={"keys": ["blk0", "none"]})).json() == {"count": 1}

    try:
        anyio.run(main, backend="asyncio")
    finally:
        app.state.runtime.close()


def test_asyncio_app_says_unavailable_when_the_server_is_down():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = load_example("embed_asyncio_app").build_app(f"http://127.0.0.1:{port}")

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            for reply in (await c.get("/load/blk0"), await c.post("/lookup", json={"keys": ["blk0"]})):
                assert reply.status_code == 503 and reply.json() == {"error": "membrain unavailable"}

    try:
        anyio.run(main, backend="asyncio")
    finally:
        app.state.runtime.close()


@pytest.mark.parametrize("runtime_backend", ["asyncio", "trio"])
def test_trio_server_app(server, runtime_backend, monkeypatch):
    import trio

    monkeypatch.setenv("VLLM_MEMBRAIN_ASYNC_BACKEND", runtime_backend)
    mod = load_example("embed_trio_app")

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(mod.serve, server.url, 0)
            stream = await trio.open_tcp_stream("127.0.0.1", port)

            async def ask(line):
                await stream.send_all(line.encode() + b"\n")
                return (await stream.receive_some(1000)).decode().strip()

            assert await ask("SAVE k1 hello") == "OK"
            assert await ask("LOAD k1") == "VALUE hello"
            assert await ask("LOAD k2") == "MISS"
            assert await ask("LOOKUP k1 k2") == "COUNT 1"
            await stream.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_asyncio_app_answers_bad_requests_with_400_and_keeps_serving(server):
    app = load_example("embed_asyncio_app").build_app(server.url)

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            for reply in (
                await c.get("/load/k!"),
                await c.put("/save/k!", content=b"x"),
                await c.post("/lookup", json={"keys": ["ok", "k!"]}),
                await c.post("/lookup", content=b"not json"),
                await c.post("/lookup", json={"keys": "not-a-list"}),
            ):
                assert reply.status_code == 400 and "error" in reply.json(), reply.text
            assert (await c.put("/save/blk0", content=b"page")).json() == {"queued": True}
            assert (await c.post("/flush")).json() == {"flushed": True}
            assert (await c.get("/load/blk0")).json() == {"found": True, "bytes": 4}

    try:
        anyio.run(main, backend="asyncio")
    finally:
        app.state.runtime.close()


def test_trio_app_answers_bad_lines_with_an_error_and_keeps_serving(server):
    import trio

    mod = load_example("embed_trio_app")

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(mod.serve, server.url, 0)

            async def ask(stream, line: bytes):
                await stream.send_all(line + b"\n")
                return (await stream.receive_some(1000)).decode().strip()

            stream = await trio.open_tcp_stream("127.0.0.1", port)
            for bad in (b"LOAD k!", b"SAVE k1", b"LOOKUP", b"LOAD \xff\xfe", b"SAVE k! v"):
                assert (await ask(stream, bad)).startswith("ERR "), bad
            assert await ask(stream, b"SAVE k1 hello") == "OK"  # the same connection goes on
            other = await trio.open_tcp_stream("127.0.0.1", port)  # and the server takes new ones
            assert await ask(other, b"LOAD k1") == "VALUE hello"
            await stream.aclose()
            await other.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
