"""A small thread-safe future for synchronous callers.

`done()`/`result()` never block; only `wait(timeout)` does, and only when the caller asks for it.
Set from the runtime thread, read from vLLM's threads.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

PENDING, FINISHED, FAILED, CANCELLED = 0, 1, 2, 3


class NotReady(Exception):
    """result() was called on a future that is still pending."""


class Cancelled(Exception):
    """The work was cancelled (request finished or aborted, or the runtime shut down)."""


class MembrainFuture:
    __slots__ = ("tag", "_state", "_value", "_lock", "_event", "_callbacks", "_cancel_hook")

    def __init__(self, tag: Any = None):
        self.tag = tag
        self._state = PENDING
        self._value: Any = None
        self._lock = threading.Lock()
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[["MembrainFuture"], None]] | None = None
        self._cancel_hook: Callable[[], None] | None = None

    def done(self) -> bool:
        return self._state != PENDING

    def cancelled(self) -> bool:
        return self._state == CANCELLED

    def result(self) -> Any:
        """The value, or raise the failure; raises NotReady while pending (never blocks)."""
        state = self._state
        if state == FINISHED:
            return self._value
        if state == FAILED:
            raise self._value
        if state == CANCELLED:
            raise Cancelled(f"cancelled: {self.tag!r}")
        raise NotReady("future is still pending")

    def result_or(self, default: Any) -> Any:
        """The value if finished, else `default` (pending, failed or cancelled). Never blocks or raises."""
        return self._value if self._state == FINISHED else default

    def exception(self) -> BaseException | None:
        return self._value if self._state == FAILED else None

    def wait(self, timeout: float) -> bool:
        """Explicit blocking wait with a deadline; True if done."""
        if self._state != PENDING:
            return True
        with self._lock:
            if self._state != PENDING:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def add_done_callback(self, fn: Callable[["MembrainFuture"], None]) -> None:
        """fn(future) runs on the thread that completes the future (or at once if already done)."""
        with self._lock:
            if self._state == PENDING:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)

    def cancel(self) -> bool:
        """Ask the runtime to stop the work; the future becomes cancelled unless it already finished."""
        # Marked first, then the runtime is told: a job that starts between the two sees it cancelled and
        # never runs. Told first, the runtime could start it before the mark and run it whole for nothing.
        if not self._set(CANCELLED, None):
            return False
        if self._cancel_hook is not None:
            self._cancel_hook()
        return True

    # Runtime side ---------------------------------------------------------------------------------

    def _set(self, state: int, value: Any) -> bool:
        with self._lock:
            if self._state != PENDING:
                return False
            self._state = state
            self._value = value
            event, callbacks = self._event, self._callbacks
            self._callbacks = None
        if event is not None:
            event.set()
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:  # a broken callback must not break the runtime
                pass
        return True

    def set_result(self, value: Any) -> bool:
        return self._set(FINISHED, value)

    def set_exception(self, exc: BaseException) -> bool:
        return self._set(FAILED, exc)

    def __repr__(self) -> str:
        names = {PENDING: "pending", FINISHED: "finished", FAILED: "failed", CANCELLED: "cancelled"}
        return f"<MembrainFuture {self.tag!r} {names[self._state]}>"
