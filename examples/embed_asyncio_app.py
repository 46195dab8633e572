"""Embedding Membrain in an asyncio web app (Starlette, as vLLM's own OpenAI server uses).

The app runs on its own asyncio loop; Membrain I/O runs on the runtime's thread. Handlers submit work
and `await wait_async(...)`, so the app's loop is never blocked and never touched by the runtime.

    python examples/embed_asyncio_app.py            # starts an embedded Membrain server and the app on :8000
"""

from __future__ import annotations

import os

import contextlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from membrain_async.cache import BlockStore
from membrain_async.client import MembrainUnavailable
from membrain_async.config import ConnectorConfig
from membrain_async.runtime.aio import wait_async


def build_app(membrain_url: str) -> Starlette:
    runtime = BlockStore(ConnectorConfig.from_sources(env={}, overrides={"endpoint": membrain_url}))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        runtime.close()  # drains queued saves within VLLM_MEMBRAIN_SHUTDOWN_DRAIN

    async def save(request: Request) -> JSONResponse:
        key = request.path_params["key"]
        accepted = runtime.save(key, [await request.body()])  # returns at once; uploaded behind
        return JSONResponse({"queued": accepted})

    async def load(request: Request) -> JSONResponse:
        key = request.path_params["key"]
        try:
            (value,) = await wait_async(runtime.fetch([key]))
        except MembrainUnavailable:  # the server is down: say so, rather than "not found"
            return JSONResponse({"error": "membrain unavailable"}, status_code=503)
        return JSONResponse({"found": value is not None, "bytes": 0 if value is None else len(value)})

    async def lookup(request: Request) -> JSONResponse:
        keys = (await request.json())["keys"]
        try:
            return JSONResponse({"count": await wait_async(runtime.lookup(keys))})
        except MembrainUnavailable:
            return JSONResponse({"error": "membrain unavailable"}, status_code=503)

    async def flush(request: Request) -> JSONResponse:
        return JSONResponse({"flushed": runtime.flush(5)})

    app = Starlette(
        routes=[
            Route("/save/{key}", save, methods=["PUT"]),
            Route("/load/{key}", load),
            Route("/lookup", lookup, methods=["POST"]),
            Route("/flush", flush, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    return app


if __name__ == "__main__":
    import uvicorn

    from membrain_async.server import embedded_server

    with embedded_server() as srv:
        uvicorn.run(build_app(srv.url), host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
