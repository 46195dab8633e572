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
from membrain_async.client import MembrainRequestError, MembrainUnavailable
from membrain_async.config import ConnectorConfig
from membrain_async.protocol.names import validate_key
from membrain_async.runtime.aio import wait_async


class BadRequest(Exception):
    """A request the app cannot serve: answered 400 with the reason, and the app goes on."""


def checked_keys(keys: object) -> list[str]:
    if not isinstance(keys, list) or not keys:
        raise BadRequest("'keys' must be a non-empty list of keys")
    for key in keys:
        try:
            validate_key(key)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    return keys


async def keys_of(request: Request) -> list[str]:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body must be JSON: {\"keys\": [...]}") from None
    return checked_keys(body.get("keys") if isinstance(body, dict) else None)


def build_app(membrain_url: str) -> Starlette:
    runtime = BlockStore(ConnectorConfig.from_sources(env={}, overrides={"endpoint": membrain_url}))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        runtime.close()  # drains queued saves within VLLM_MEMBRAIN_SHUTDOWN_DRAIN

    async def save(request: Request) -> JSONResponse:
        (key,) = checked_keys([request.path_params["key"]])
        accepted = runtime.save(key, [await request.body()])  # returns at once; uploaded behind
        return JSONResponse({"queued": accepted})

    async def load(request: Request) -> JSONResponse:
        (key,) = checked_keys([request.path_params["key"]])
        try:
            (value,) = await wait_async(runtime.fetch([key]))
        except MembrainUnavailable:  # the server is down: say so, rather than "not found"
            return JSONResponse({"error": "membrain unavailable"}, status_code=503)
        return JSONResponse({"found": value is not None, "bytes": 0 if value is None else len(value)})

    async def lookup(request: Request) -> JSONResponse:
        keys = await keys_of(request)
        try:
            return JSONResponse({"count": await wait_async(runtime.lookup(keys))})
        except MembrainUnavailable:
            return JSONResponse({"error": "membrain unavailable"}, status_code=503)

    async def flush(request: Request) -> JSONResponse:
        return JSONResponse({"flushed": runtime.flush(5)})

    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    async def refused(request: Request, exc: MembrainRequestError) -> JSONResponse:  # a limit, auth
        return JSONResponse({"error": exc.message}, status_code=400 if exc.status < 500 else 502)

    app = Starlette(
        routes=[
            Route("/save/{key}", save, methods=["PUT"]),
            Route("/load/{key}", load),
            Route("/lookup", lookup, methods=["POST"]),
            Route("/flush", flush, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={BadRequest: bad_request, MembrainRequestError: refused},
    )
    app.state.runtime = runtime
    return app


if __name__ == "__main__":
    import uvicorn

    from membrain_async.server import embedded_server

    with embedded_server() as srv:
        uvicorn.run(build_app(srv.url), host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
