"""BlockingPool: blocking calls off the event loop, abandoned on timeout, bounded (asyncio and trio)."""

from __future__ import annotations

import threading

import anyio
import pytest

from membrain_async.client.blocking import BlockingPool

pytestmark = pytest.mark.anyio

GUARD = 30  # hang guard only


async def test_values_and_errors_come_back(anyio_backend):
    pool = BlockingPool(2, "test")
    assert await pool.run(lambda: threading.current_thread().name) == "membrain-test"
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 / 0)
    assert pool.running == 0
    pool.stop()


async def test_a_call_that_hangs_is_abandoned_and_hung_calls_are_bounded(anyio_backend):
    pool = BlockingPool(1, "test")  # at most 1 awaited, 2 running
    release = threading.Event()
    for _ in range(2):
        with anyio.move_on_after(0.05) as scope:
            await pool.run(lambda: release.wait(GUARD))
        assert scope.cancelled_caught  # the caller got away; the thread did not
    assert pool.running == 2
    with pytest.raises(OSError, match="still running"):
        await pool.run(lambda: 1)
    assert pool.busy_refusals == 1
    release.set()
    with anyio.fail_after(GUARD):
        while pool.running:
            await anyio.sleep(0.01)
    assert pool.abandoned == 2
    assert await pool.run(lambda: 2) == 2  # served again
    pool.stop()


async def test_a_shielded_call_is_waited_for(anyio_backend):
    pool = BlockingPool(1, "test")
    done = []
    with anyio.move_on_after(0.01):
        await pool.run(lambda: (threading.Event().wait(0.1), done.append(1)), abandon=False)
    assert done == [1]  # the copy a put makes is never left running behind its caller
    pool.stop()
