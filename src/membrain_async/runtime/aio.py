"""Await a MembrainFuture from a host's own event loop (asyncio or trio) without blocking it.

The runtime never touches the host's loop: completion is signalled into it with the loop's own
thread-safe, non-blocking call (`call_soon_threadsafe` / `TrioToken.run_sync_soon`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from .future import MembrainFuture


def loop_options(backend: str) -> dict:
    """anyio backend options: uvloop for asyncio when installed (vLLM brings it), for less time per
    wake-up and syscall (and so less GIL time per I/O)."""
    if backend != "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


async def wait_async(future: MembrainFuture) -> Any:
    """`await wait_async(rt.lookup(keys))` inside asyncio or trio code; returns the result or raises."""
    if not future.done():
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            waiter = loop.create_future()

            def wake(_f: MembrainFuture) -> None:
                loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

            future.add_done_callback(wake)
            await waiter
        else:
            import trio

            token = trio.lowlevel.current_trio_token()
            event = trio.Event()
            future.add_done_callback(lambda _f: token.run_sync_soon(event.set))
            await event.wait()
    return future.result()
