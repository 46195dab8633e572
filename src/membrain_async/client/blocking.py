"""Blocking calls from async code: daemon worker threads, bounded, abandoned on timeout.

For a store client whose API blocks (Mooncake Store's Python binding): the event loop must never run its
calls, and a call that hangs must not hang the caller. `BlockingPool.run(fn)` runs `fn` in a worker
thread and awaits it (asyncio or trio); a cancellation (StoreClient's timeout) abandons the call: the
caller returns at once, the thread finishes on its own and its result is dropped. Threads are bounded:
while twice the concurrency limit of calls (abandoned ones included) are still running, new calls fail
fast with OSError, which the client counts as a connection failure (its breaker opens).

Why not anyio.to_thread: its worker threads are not daemons, so a process whose store hung waits at exit
for as long as the native call takes; here the process waits at most EXIT_WAIT for them, then exits.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, TypeVar

import anyio

T = TypeVar("T")

# At exit, how long the process waits for calls still running in these threads (a Mooncake call of a dead
# master ends within ~4.5 s). A thread still inside native code when the interpreter finalizes can abort
# the process (Mooncake: "terminate called without an active exception").
EXIT_WAIT = 10.0

_live: set[threading.Thread] = set()
_pools: "weakref.WeakSet[BlockingPool]" = weakref.WeakSet()
_live_lock = threading.Lock()
_atexit_registered = False


def start_daemon(target: Callable[[], None], name: str) -> None:
    """A daemon thread the process waits for at exit (up to EXIT_WAIT in all)."""
    global _atexit_registered

    def run() -> None:
        try:
            target()
        finally:
            with _live_lock:
                _live.discard(thread)

    thread = threading.Thread(target=run, name=name, daemon=True)
    with _live_lock:
        _live.add(thread)
        if not _atexit_registered:
            import atexit

            atexit.register(_wait_at_exit)
            _atexit_registered = True
    thread.start()


def _wait_at_exit() -> None:
    import time

    end = time.monotonic() + EXIT_WAIT
    for pool in list(_pools):
        pool.stop()
    with _live_lock:
        threads = list(_live)
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))



def _waker() -> Callable[[Callable[[], None]], None]:
    """A thread-safe, non-blocking "run this on the current loop soon": asyncio's call_soon_threadsafe or
    trio's run_sync_soon (the two backends anyio runs on)."""
    import asyncio

    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon


class BlockingPool:
    """Runs blocking calls in daemon threads of its own: at most `limit` awaited at once, and no new one
    while `2 * limit` (abandoned ones included) are still running.

    Not anyio's worker threads: those are not daemons, so a process whose store hung would wait at exit
    for as long as Mooncake's call takes. These are waited for at exit up to EXIT_WAIT seconds. A thread
    that finished tells the loop without waiting for it (call_soon_threadsafe / run_sync_soon).
    """

    def __init__(self, limit: int, what: str = "blocking"):
        import queue

        self.limiter = anyio.CapacityLimiter(limit)
        self.cap = 2 * limit
        self.what = what
        self.abandoned = 0  # calls whose caller gave up (timeout) that finished in their thread later
        self.busy_refusals = 0  # calls refused because `cap` earlier ones were still running
        self._running = 0
        self._idle = 0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        _pools.add(self)

    @property
    def running(self) -> int:
        return self._running

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()
            with self._lock:
                self._idle += 1  # free for the next job (run() reserves a worker by taking one off)

    def stop(self) -> None:
        """Let the workers end (busy ones after their call)."""
        for _ in range(self.cap + 1):
            self._jobs.put(None)

    async def run(self, fn: Callable[[], T], *, abandon: bool = True,
                  on_queued: Callable[[], None] | None = None) -> T:
        """`fn()` in a thread. Cancelled (a timeout), it is abandoned: the caller returns at once and the
        thread's result is dropped. `abandon=False` shields the wait (for bounded work such as a copy).
        `on_queued` runs just before the job is queued: from then on `fn` will run, whatever the caller
        does (a refused or cancelled call before that point never runs it)."""
        async with self.limiter:
            with self._lock:
                if self._running >= self.cap:
                    self.busy_refusals += 1
                    raise OSError(f"{self._running} {self.what} calls still running (the store is not answering)")
                self._running += 1
                spawn = self._idle == 0
                if not spawn:
                    self._idle -= 1  # this job's worker
            wake = _waker()
            done = anyio.Event()
            box: dict = {"abandoned": False}

            def job() -> None:
                try:
                    box["value"] = fn()
                except BaseException as exc:  # handed to the caller, if it still waits
                    box["error"] = exc
                finally:
                    with self._lock:
                        self._running -= 1
                        if box["abandoned"]:
                            self.abandoned += 1
                    try:
                        wake(done.set)
                    except Exception:  # the loop is gone (shutdown): nobody waits
                        pass

            if on_queued is not None:
                on_queued()
            self._jobs.put(job)
            if spawn:
                start_daemon(self._worker, f"membrain-{self.what}")
            try:
                if abandon:
                    await done.wait()
                else:
                    with anyio.CancelScope(shield=True):
                        await done.wait()
            except BaseException:
                with self._lock:
                    box["abandoned"] = "value" not in box and "error" not in box
                raise
            if "error" in box:
                raise box["error"]
            return box["value"]
