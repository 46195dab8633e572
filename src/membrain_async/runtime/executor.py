"""The executor: one background thread running an anyio event loop, and nothing about KV blocks.

Callers on any thread `submit()` a coroutine function and get a `MembrainFuture` at once; the job runs
on the loop under its own deadline and cancel scope, and its completion lands in the future and, if
given, in a `CompletionRing`. `cancel_tag()` stops every job of a tag (a request finished or aborted).

Hand-off: callers append messages to a deque and, if the loop is asleep and not already being woken,
write one byte to a socketpair the loop waits on. That is a couple of microseconds and never waits for
the loop; `anyio.from_thread` would block the caller until the loop ran the callback.

Structure: the loop's task group owns every job task and whatever long-running tasks the resident (the
cache layer: see `Resident`) starts in it. `shutdown()` gives the resident's `drain()` the drain deadline,
then cancels the task group: every task has an owner and an end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, Protocol

import anyio

from .. import telemetry, thread_cpus
from .aio import loop_options
from .future import CANCELLED, Cancelled, MembrainFuture
from .ring import Completion, CompletionRing

log = logging.getLogger("membrain.runtime")


class Resident(Protocol):
    """What lives on the loop besides jobs; its hooks run on the loop thread (abandon: as the thread ends)."""

    async def start(self, task_group: Any) -> None: ...  # before the first job; may start tasks in the group

    async def drain(self) -> None: ...  # at shutdown, within the drain deadline

    async def close(self) -> None: ...  # after the task group has ended (shielded, bounded)

    def abandon(self) -> None: ...  # the thread is ending: give up what is left


class _NoResident:
    async def start(self, task_group: Any) -> None:
        pass

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


@dataclass
class ExecutorStats:
    jobs_submitted: int = 0
    jobs_ok: int = 0
    jobs_failed: int = 0
    jobs_timed_out: int = 0
    jobs_cancelled: int = 0


# observer(kind, outcome, value, latency_s): runs on the loop thread before the future is set, so a
# caller that sees the future done also sees what the observer counted. It may return a finer outcome
# for the ring's Completion (e.g. "unavailable" for an "error"); the future is set as before.
Observer = Callable[[str, str, Any, float], "str | None"]


@dataclass(slots=True, eq=False)  # identity semantics: jobs live in sets
class _Job:
    kind: str
    fn: Callable[[], Awaitable[Any]]
    future: MembrainFuture
    tag: Any
    deadline: float
    ring: CompletionRing | None
    parent: Any
    attributes: dict
    scope: anyio.CancelScope | None = None


class _CancelledEarly(Exception):
    pass


class Executor:
    def __init__(
        self,
        *,
        backend: str = "asyncio",
        default_deadline: float = 2.0,
        drain_deadline: float = 5.0,
        resident: Resident | None = None,
        observer: Observer | None = None,
        span_attributes: dict | None = None,
        describe: Callable[[str, Any], dict] | None = None,
    ):
        self.backend = backend
        self.default_deadline = default_deadline
        self.stats = ExecutorStats()
        self._resident: Resident = resident or _NoResident()
        self._observer = observer
        self._span_attributes = span_attributes or {}
        self._describe = describe or (lambda kind, value: {})
        self.drain_deadline = drain_deadline
        self._inbox: deque = deque()
        self._held = threading.local()  # messages of a `together()` block, per submitting thread
        self._lock = threading.Lock()  # guards thread start; never held across I/O
        self._thread: threading.Thread | None = None
        self.pid = os.getpid()
        self._ready = threading.Event()
        self._stopping = False
        self._wake_pending = False
        self._sleeping = True
        self._rsock: socket.socket | None = None
        self._wsock: socket.socket | None = None
        self._jobs_by_tag: dict[Any, set[_Job]] = {}
        self.inflight = 0

    # ------------------------------------------------------------------ lifecycle (caller threads)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        """Start the loop thread (idempotent). Called lazily by the first submission."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is not None:
                return
            if os.getpid() != self.pid:
                raise RuntimeError("a Membrain runtime cannot cross a fork; open a new one in the child")
            self._rsock, self._wsock = socket.socketpair()
            self._rsock.setblocking(False)
            self._wsock.setblocking(False)
            self._thread = threading.Thread(target=self._thread_main, name="membrain-runtime", daemon=True)
            self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("membrain runtime thread did not start")

    def shutdown(self, drain: float | None = None, join_timeout: float | None = None) -> None:
        """Let the resident drain (within `drain` seconds), then stop the thread."""
        if self._thread is None or self._stopping:
            self._stopping = True  # never started: stays stopped, later submissions are refused
            return
        if drain is not None:
            self.drain_deadline = drain
        self._stopping = True
        self._wake()
        self._thread.join(join_timeout if join_timeout is not None else self.drain_deadline + 5)

    def _thread_main(self) -> None:
        thread_cpus.widen_this_thread()  # before anything starts threads of its own: they inherit it
        try:
            anyio.run(self._main, backend=self.backend, backend_options=loop_options(self.backend))
        except BaseException:  # the thread must never die silently
            log.exception("membrain runtime loop crashed; Membrain is off for this process")
        finally:
            self._stopping = True
            try:
                self._resident.abandon()
            except Exception:
                log.exception("membrain runtime: giving up queued work failed")
            self._cancel_unstarted()
            self._ready.set()

    # ------------------------------------------------------------------ submission (caller threads)

    def submit(
        self,
        kind: str,
        fn: Callable[[], Awaitable[Any]],
        *,
        tag: Any = None,
        deadline: float | None = None,
        ring: CompletionRing | None = None,
        attributes: dict | None = None,
    ) -> MembrainFuture:
        """Run `await fn()` on the loop under a deadline; returns at once with a future.

        `tag` must be hashable (it is what cancel_tag finds jobs by); checked here, where the caller can
        see the mistake, not on the loop, where it would stop every job."""
        hash(tag)
        future = MembrainFuture(tag)
        if self._stopping:
            future.set_exception(Cancelled("membrain runtime is shut down"))
            return future
        self.start()
        job = _Job(kind, fn, future, tag, deadline or self.default_deadline, ring, telemetry.capture_context(), attributes or {})
        future._cancel_hook = lambda: self._post(("cancel_job", job))
        self.stats.jobs_submitted += 1
        self._post(("job", job))
        return future

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn()` on the loop thread, in order with submissions (starts the thread if needed)."""
        if self._stopping:
            return
        self.start()
        self._post(("call", fn))

    def cancel_tag(self, tag: Any, then: Callable[[], None] | None = None) -> None:
        """Cancel every pending job of `tag`, then run `then()` on the loop (e.g. drop what it staged)."""
        if self._thread is not None and not self._stopping:
            self._post(("cancel_tag", tag, then))

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Submissions made inside (on this thread) reach the loop at once, so it starts them in one dispatch.

        Without it a loop on another core may start and finish the first job before the caller has
        submitted the second: a step's loads of one prefix would then each fetch it, since a fetch is
        shared only with loads running at the same moment (cache/shared_fetch.py)."""
        if getattr(self._held, "messages", None) is not None:  # nested: the outer block sends them
            yield
            return
        self._held.messages = held = []
        try:
            yield
        finally:
            self._held.messages = None
            if held:
                self._inbox.extend(held)  # one call under the GIL: the loop sees all of them or none
                self._wake()

    def _post(self, message: tuple) -> None:
        held = getattr(self._held, "messages", None)
        if held is not None:
            held.append(message)
            return
        self._inbox.append(message)
        self._wake()

    def _wake(self) -> None:
        # A busy loop re-checks the inbox before it sleeps, so only a sleeping loop needs the byte; a
        # send() releases the GIL and may hand it to the runtime thread, which callers feel as latency.
        if self._wake_pending or not self._sleeping or self._wsock is None:
            return
        self._wake_pending = True
        _write_wake_byte(self._wsock)

    # ------------------------------------------------------------------ the loop (runtime thread)

    async def _main(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                await self._resident.start(tg)
                self._ready.set()
                assert self._rsock is not None
                while True:
                    self._sleeping = True
                    if self._inbox or self._stopping:  # posted while we were busy: no byte was sent
                        self._sleeping = False
                        self._dispatch(tg)
                        if self._stopping:
                            break
                        await anyio.lowlevel.checkpoint()
                        continue
                    await anyio.wait_readable(self._rsock)
                    self._sleeping = False
                    try:
                        while self._rsock.recv(4096):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                    # Order matters: clear the flag after draining the wake-up bytes and before draining
                    # the inbox, so a submit racing with us either lands in this dispatch or sends a byte.
                    self._wake_pending = False
                    self._dispatch(tg)
                    if self._stopping:
                        break
                with anyio.move_on_after(self.drain_deadline):
                    await self._resident.drain()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self._resident.close()
                except Exception:
                    pass
            wsock, self._wsock = self._wsock, None  # callers stop writing wake-ups first
            for sock in (wsock, self._rsock):
                if sock is not None:
                    sock.close()

    def _dispatch(self, tg) -> None:
        while self._inbox:
            message = self._inbox.popleft()
            kind = message[0]
            if kind == "job":
                job = message[1]
                if job.future.done():  # cancelled before it started
                    continue
                self._jobs_by_tag.setdefault(job.tag, set()).add(job)
                tg.start_soon(self._run_job, job)
            elif kind == "call":
                self._call(message[1])
            elif kind == "cancel_job":
                job = message[1]
                if job.scope is not None:
                    job.scope.cancel()
            elif kind == "cancel_tag":
                _, tag, then = message
                for job in list(self._jobs_by_tag.get(tag, ())):
                    job.future.cancel()
                    if job.scope is not None:
                        job.scope.cancel()
                if then is not None:
                    self._call(then)

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # a broken callback must not stop the loop
            log.exception("membrain runtime callback failed")

    async def _run_job(self, job: _Job) -> None:
        t0 = time.perf_counter()
        outcome, value = "ok", None
        self.inflight += 1
        try:
            if job.future.cancelled():  # cancelled between submit and start
                raise _CancelledEarly
            attrs = {**self._span_attributes, **job.attributes}
            with telemetry.span(f"membrain.{job.kind}", job.parent, attrs) as sp:
                with anyio.CancelScope() as scope:
                    job.scope = scope
                    with anyio.fail_after(job.deadline):
                        value = await job.fn()
                if scope.cancelled_caught:
                    outcome = "cancelled"
                telemetry.set_attributes(sp, **{"membrain.outcome": outcome, **self._describe(job.kind, value)})
        except _CancelledEarly:
            outcome = "cancelled"
        except TimeoutError as exc:
            outcome, value = "timeout", exc
        except Exception as exc:
            outcome, value = "error", exc
        except BaseException:  # the runtime itself is shutting down: the job ends with it
            job.future._set(CANCELLED, None)
            raise
        finally:
            self.inflight -= 1
            tagged = self._jobs_by_tag.get(job.tag)
            if tagged is not None:
                tagged.discard(job)
                if not tagged:
                    del self._jobs_by_tag[job.tag]
        self._complete(job, outcome, value, time.perf_counter() - t0)

    def _complete(self, job: _Job, outcome: str, value: Any, latency: float) -> None:
        stats = self.stats
        if job.future.cancelled():
            outcome, value = "cancelled", None
        label = outcome
        if self._observer is not None:
            try:
                label = self._observer(job.kind, outcome, value, latency) or outcome
            except Exception:
                log.exception("membrain runtime observer failed")
        if outcome == "ok":
            stats.jobs_ok += 1
            job.future.set_result(value)
        elif outcome == "cancelled":
            stats.jobs_cancelled += 1
            job.future._set(CANCELLED, None)
        else:
            if outcome == "timeout":
                stats.jobs_timed_out += 1
            else:
                stats.jobs_failed += 1
                log.debug("membrain %s failed: %r", job.kind, value)
            job.future.set_exception(value)
        if job.ring is not None:
            job.ring.push(Completion(job.kind, job.tag, value, label, latency))

    def _cancel_unstarted(self) -> None:
        while self._inbox:
            message = self._inbox.popleft()
            if message[0] == "job":
                message[1].future._set(CANCELLED, None)


def _gil_holding_write() -> Callable[[int], int] | None:
    """libc write() called through ctypes.PyDLL, which keeps the GIL during the call.

    socket.send() releases the GIL around its syscall; the runtime thread, woken by that very byte, then
    takes the GIL and the submitting thread (vLLM's scheduler) waits for it to come back: measured as a
    p99 of 300-700 us per submit. Holding the GIL across a one-byte write (a few us) keeps the caller
    in front; the runtime thread runs when the caller next blocks.
    """
    try:
        import ctypes

        libc_write = ctypes.PyDLL(None).write
        libc_write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
        libc_write.restype = ctypes.c_ssize_t
    except (OSError, AttributeError):
        return None
    return lambda fd: libc_write(fd, b"\0", 1)


_raw_write = _gil_holding_write()


def _write_wake_byte(sock: socket.socket) -> None:
    try:
        if _raw_write is not None:
            _raw_write(sock.fileno())  # -1 (EAGAIN: a wake-up is already queued, or closed) is fine
        else:
            sock.send(b"\0")
    except (BlockingIOError, OSError):
        pass  # buffer full: a wake-up is already on its way; closed: the loop is gone
