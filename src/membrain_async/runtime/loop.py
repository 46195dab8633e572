"""The Membrain runtime: one background thread per process running an anyio event loop that owns the
client and every Membrain I/O. vLLM's synchronous scheduler and workers talk to it only through
non-blocking calls that return a `MembrainFuture` at once, and through completion rings they drain with
`poll()`.

Hand-off: callers append work to a deque and, if the loop is not already being woken, write one byte
to a socketpair the loop waits on. That is a couple of microseconds and never waits for the loop;
`anyio.from_thread` would block the caller until the loop ran the callback.

Structure: the loop's task group owns every job task (each under its own deadline and cancel scope) and
the write-behind uploader; `shutdown()` drains the write-behind queue within a deadline, then closes the
task group: every task has an owner and an end.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import anyio

from .. import telemetry
from ..config import ConnectorConfig
from .future import CANCELLED, Cancelled, MembrainFuture
from .hot import HotTier
from .ring import Completion, CompletionRing

log = logging.getLogger("membrain.runtime")

Buffer = bytes | bytearray | memoryview


@dataclass
class RuntimeStats:
    jobs_submitted: int = 0
    jobs_ok: int = 0
    jobs_failed: int = 0
    jobs_timed_out: int = 0
    jobs_cancelled: int = 0
    lookups: int = 0
    fetched_bytes: int = 0
    fetch_misses: int = 0
    hot_hits: int = 0
    prefetches: int = 0
    prefetch_used: int = 0
    prefetch_skipped: int = 0
    saves_queued: int = 0
    saves_dropped: int = 0
    saves_skipped_present: int = 0
    saves_uploaded: int = 0
    saves_failed: int = 0
    forgotten: int = 0
    saved_bytes: int = 0
    upload_batches: int = 0
    latency_s: dict = field(default_factory=dict)  # op -> list of recent latencies (bounded)

    def record_latency(self, op: str, seconds: float) -> None:
        window = self.latency_s.setdefault(op, deque(maxlen=1024))
        window.append(seconds)


@dataclass(slots=True, eq=False)  # identity semantics: jobs live in sets
class _Job:
    kind: str
    fn: Callable[..., Awaitable[Any]]
    future: MembrainFuture
    tag: Any
    deadline: float
    ring: CompletionRing | None
    parent: Any
    attributes: dict
    scope: anyio.CancelScope | None = None


class _CancelledEarly(Exception):
    pass


@dataclass(slots=True)
class _Save:
    key: str
    parts: Sequence[Buffer]
    nbytes: int
    tag: Any
    parent: Any
    on_done: Callable[[], None] | None
    prepare: Callable[[], None] | None


class MembrainRuntime:
    def __init__(
        self, config: ConnectorConfig, client_factory: Callable[[], Any] | None = None, meter_provider: Any = None
    ):
        self.config = config
        self._client_factory = client_factory or (lambda: make_client(config))
        self.client: Any = None
        self.stats = RuntimeStats()
        self._inbox: deque = deque()
        self._lock = threading.Lock()  # guards thread start and byte accounting; never held across I/O
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self._wake_pending = False
        self._sleeping = True
        self._rsock: socket.socket | None = None
        self._wsock: socket.socket | None = None
        self._jobs_by_tag: dict[Any, set[_Job]] = {}
        self._inflight = 0
        # write-behind
        self._wb: deque[_Save] = deque()
        self._wb_bytes = 0
        self._wb_event: anyio.Event | None = None
        self._wb_idle: anyio.Event | None = None
        self._uploading = 0
        # prefetch staging: key -> (tag, value); only touched on the loop thread
        self._staging: OrderedDict[str, tuple[Any, memoryview]] = OrderedDict()
        self._staging_bytes = 0
        self._prefetching: dict[str, anyio.Event] = {}
        self._prefetch_slots: anyio.Semaphore | None = None
        self.hot = HotTier(config.local_cache_bytes) if config.local_cache_bytes > 0 else None
        self._force_upload: set[str] = set()  # keys found corrupt: their next save skips the "already stored" check
        self._drain_deadline = config.shutdown_drain
        self.metrics = telemetry.RuntimeMetrics(self._observe, meter_provider)

    # ------------------------------------------------------------------ lifecycle (caller threads)

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
            if os.getpid() != self._pid:
                raise RuntimeError("a MembrainRuntime cannot cross a fork; use get_runtime() in the child")
            self._rsock, self._wsock = socket.socketpair()
            self._rsock.setblocking(False)
            self._wsock.setblocking(False)
            self._thread = threading.Thread(target=self._thread_main, name="membrain-runtime", daemon=True)
            self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("membrain runtime thread did not start")

    def shutdown(self, drain: float | None = None, join_timeout: float | None = None) -> None:
        """Upload what the write-behind queue holds (within `drain` seconds), then stop the thread."""
        if self._thread is None or self._stopping:
            return
        self._drain_deadline = self.config.shutdown_drain if drain is None else drain
        self._stopping = True
        self._wake()
        self._thread.join(join_timeout if join_timeout is not None else self._drain_deadline + 5)

    def _thread_main(self) -> None:
        try:
            anyio.run(self._main, backend=self.config.async_backend, backend_options=_backend_options(self.config))
        except BaseException:  # the thread must never die silently
            log.exception("membrain runtime loop crashed; Membrain is off for this process")
        finally:
            self._stopping = True
            self._fail_leftovers()
            self._stopped.set()
            self._ready.set()

    # ------------------------------------------------------------------ submission (caller threads)

    def _wake(self) -> None:
        # A busy loop re-checks the inbox before it sleeps, so only a sleeping loop needs the byte; a
        # send() releases the GIL and may hand it to the runtime thread, which callers feel as latency.
        if self._wake_pending or not self._sleeping or self._wsock is None:
            return
        self._wake_pending = True
        _write_wake_byte(self._wsock)

    def submit(
        self,
        kind: str,
        fn: Callable[..., Awaitable[Any]],
        *,
        tag: Any = None,
        deadline: float | None = None,
        ring: CompletionRing | None = None,
        attributes: dict | None = None,
    ) -> MembrainFuture:
        """Run `await fn(client)` on the loop under a deadline; returns at once with a future."""
        future = MembrainFuture(tag)
        if self._stopping:
            future.set_exception(Cancelled("membrain runtime is shut down"))
            return future
        self.start()
        job = _Job(
            kind,
            fn,
            future,
            tag,
            deadline or self.config.timeout,
            ring,
            telemetry.capture_context(),
            attributes or {},
        )
        future._cancel_hook = lambda: self._post(("cancel_job", job))
        self.stats.jobs_submitted += 1
        self._post(("job", job))
        return future

    def _post(self, message: tuple) -> None:
        self._inbox.append(message)
        self._wake()

    def lookup(self, keys: Sequence[str], *, tag: Any = None, ring: CompletionRing | None = None) -> MembrainFuture:
        """How many leading keys the server holds (one round trip). Result: int."""
        keys = list(keys)
        self.stats.lookups += 1
        return self.submit(
            "lookup",
            lambda client: self._lookup(client, keys),
            tag=tag,
            ring=ring,
            deadline=self.config.lookup_deadline,
            attributes={"membrain.keys": len(keys)},
        )

    def lookup_many(
        self, key_lists: Sequence[Sequence[str]], *, tag: Any = None, ring: CompletionRing | None = None
    ) -> MembrainFuture:
        """Several prefix lookups in one job, run concurrently; one future completes them all at once.

        For requests that arrive together: their answers reach the scheduler in the same step, so a
        request sharing another's prefix is scheduled beside it. Result: list[int], one per key list.
        """
        lists = [list(keys) for keys in key_lists]
        self.stats.lookups += len(lists)

        async def go(client) -> list[int]:
            counts = [0] * len(lists)

            async def one(i: int) -> None:
                counts[i] = await self._lookup(client, lists[i])

            async with anyio.create_task_group() as tg:
                for i in range(len(lists)):
                    tg.start_soon(one, i)
            return counts

        return self.submit("lookup", go, tag=tag, ring=ring, deadline=self.config.lookup_deadline,
                           attributes={"membrain.keys": sum(map(len, lists))})

    def fetch(
        self, keys: Sequence[str], *, tag: Any = None, ring: CompletionRing | None = None, deadline: float | None = None
    ) -> MembrainFuture:
        """Values for keys (None for a miss), from prefetch staging where possible. Result: list."""
        keys = list(keys)
        return self.submit(
            "fetch",
            lambda client: self._fetch(client, keys),
            tag=tag,
            ring=ring,
            deadline=deadline or self.config.load_deadline,
            attributes={"membrain.keys": len(keys)},
        )

    def load(
        self,
        keys: Sequence[str],
        apply: Callable[[list], Any],
        *,
        tag: Any = None,
        ring: CompletionRing | None = None,
        deadline: float | None = None,
    ) -> MembrainFuture:
        """Fetch keys, then run `apply(values)` on a worker thread (off the loop and off the caller).

        For copying fetched pages into their destination without the caller waiting: `apply` checks
        and copies (torch copies and checksums release the GIL). It is never abandoned once started: a
        deadline or cancellation that arrives meanwhile waits for it, so nothing writes into the
        destination after the future is done. Result: what `apply` returns.
        """
        keys = list(keys)

        async def go(client) -> Any:
            values = await self._fetch(client, keys)
            return await anyio.to_thread.run_sync(apply, values)

        return self.submit(
            "load",
            go,
            tag=tag,
            ring=ring,
            deadline=deadline or self.config.load_deadline,
            attributes={"membrain.keys": len(keys)},
        )

    def prefetch(self, keys: Sequence[str], *, tag: Any = None) -> MembrainFuture:
        """Start fetching keys into staging memory; a later fetch() of them is served from there."""
        keys = list(keys)
        self.stats.prefetches += 1
        return self.submit(
            "prefetch",
            lambda client: self._prefetch(client, keys, tag),
            tag=tag,
            deadline=self.config.load_deadline,
            attributes={"membrain.keys": len(keys)},
        )

    def save(
        self,
        key: str,
        parts: Sequence[Buffer],
        *,
        tag: Any = None,
        on_done: Callable[[], None] | None = None,
        prepare: Callable[[], None] | None = None,
    ) -> bool:
        """Queue a save (bytes already copied out of the KV cache). False if dropped: the queue is full.

        `on_done()` runs on the runtime thread once the bytes are no longer needed (uploaded, skipped,
        failed or dropped at shutdown), so the caller can reuse the buffer. Not called when False is returned.
        `prepare()` runs before the upload, off the caller's thread (e.g. checksumming the payload).
        """
        nbytes = sum(memoryview(p).nbytes for p in parts)
        if self._stopping:
            self.stats.saves_dropped += 1
            self.metrics.dropped.add(1)
            return False
        with self._lock:
            if self._wb_bytes + nbytes > self.config.write_behind_bytes:
                self.stats.saves_dropped += 1
                self.metrics.dropped.add(1)
                return False
            self._wb_bytes += nbytes
        self.start()
        self._wb.append(_Save(key, parts, nbytes, tag, telemetry.capture_context(), on_done, prepare))
        self.stats.saves_queued += 1
        self._post(("saves",))
        return True

    def forget(self, keys: Sequence[str]) -> MembrainFuture:
        """Drop keys whose payload failed its check, locally and on the server, so the next save repairs them.

        Saves skip keys the server already holds; without this a corrupt block would be refused on every
        load and never rewritten. Result: how many the server deleted.
        """
        keys = list(keys)
        self.stats.forgotten += len(keys)

        async def go(client) -> int:
            if len(self._force_upload) > 65536:  # bounded: a key not re-saved by then is simply forgotten
                self._force_upload.clear()
            self._force_upload.update(keys)  # even if the delete fails, the next save overwrites
            if self.hot is not None:
                for key in keys:
                    self.hot.discard(key)
            deleted = 0
            for key in keys:
                deleted += bool(await client.delete(key))
            return deleted

        return self.submit("forget", go, deadline=max(5.0, 3 * self.config.timeout), attributes={"membrain.keys": len(keys)})

    def cancel(self, tag: Any) -> None:
        """Cancel every pending job of `tag` and drop its staged prefetches (request finished or aborted)."""
        if self._thread is not None and not self._stopping:
            self._post(("cancel_tag", tag))

    def flush(self, timeout: float) -> bool:
        """Explicitly wait (blocking, with a deadline) until the write-behind queue is empty."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self._wb and self._uploading == 0:
                return True
            time.sleep(0.005)
        return not self._wb and self._uploading == 0

    def _observe(self) -> dict[str, float]:
        return {
            "write_behind_bytes": self._wb_bytes,
            "write_behind_items": len(self._wb),
            "staging_bytes": self._staging_bytes,
            "inflight_jobs": self._inflight,
        }

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        out = {k: v for k, v in s.__dict__.items() if k != "latency_s"}
        out.update(self._observe())
        for op, window in list(s.latency_s.items()):
            values = sorted(window)
            if values:
                out[f"{op}_p50_ms"] = values[len(values) // 2] * 1e3
                out[f"{op}_p99_ms"] = values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3
        return out

    # ------------------------------------------------------------------ the loop (runtime thread)

    async def _main(self) -> None:
        self.client = self._client_factory()
        self._prefetch_slots = anyio.Semaphore(2)
        self._wb_event = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._uploader)
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
                with anyio.move_on_after(self._drain_deadline):
                    await self._drain_write_behind()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self.client.aclose()
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
            elif kind == "cancel_job":
                job = message[1]
                if job.scope is not None:
                    job.scope.cancel()
            elif kind == "cancel_tag":
                tag = message[1]
                for job in list(self._jobs_by_tag.get(tag, ())):
                    job.future.cancel()
                    if job.scope is not None:
                        job.scope.cancel()
                self._drop_staging(tag)
        if self._wb and self._wb_event is not None:
            self._wb_event.set()

    async def _run_job(self, job: _Job) -> None:
        t0 = time.perf_counter()
        outcome, value = "ok", None
        self._inflight += 1
        try:
            if job.future.cancelled():  # cancelled between submit and start
                raise _CancelledEarly
            attrs = {"membrain.namespace": self.config.namespace, **job.attributes}
            with telemetry.span(f"membrain.{job.kind}", job.parent, attrs) as sp:
                with anyio.CancelScope() as scope:
                    job.scope = scope
                    with anyio.fail_after(job.deadline):
                        value = await job.fn(self.client)
                if scope.cancelled_caught:
                    outcome = "cancelled"
                telemetry.set_attributes(sp, **{"membrain.outcome": outcome, **_result_attributes(job.kind, value)})
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
            self._inflight -= 1
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
        stats.record_latency(job.kind, latency)
        self.metrics.latency.record(latency, {"op": job.kind})
        self.metrics.outcomes.add(1, {"op": job.kind, "outcome": outcome})
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
            job.ring.push(Completion(job.kind, job.tag, value, outcome, latency))

    # ------------------------------------------------------------------ loads and prefetch

    async def _lookup(self, client, keys: list[str]) -> int:
        local = self.hot.leading(keys) if self.hot is not None else 0
        if local == len(keys):
            return local  # every block is in this process: no round trip
        return local + await client.lookup(keys[local:])

    async def _fetch(self, client, keys: list[str]) -> list[memoryview | None]:
        out: list[memoryview | None] = [None] * len(keys)
        if self.hot is not None:
            for i, key in enumerate(keys):
                out[i] = self.hot.get(key)
                if out[i] is not None:
                    self.stats.hot_hits += 1
        # Wait for prefetches of these keys already on the wire rather than asking twice.
        for key in keys:
            pending = self._prefetching.get(key)
            if pending is not None:
                await pending.wait()
        missing = []
        for i, key in enumerate(keys):
            if out[i] is not None:
                continue
            staged = self._staging.pop(key, None)
            if staged is not None:
                self._staging_bytes -= len(staged[1])
                self.stats.prefetch_used += 1
                out[i] = staged[1]
            else:
                missing.append(i)
        if missing:
            values = await client.get_many([keys[i] for i in missing])
            for i, v in zip(missing, values):
                out[i] = v
                if v is not None and self.hot is not None:
                    self.hot.put(keys[i], v)
        got = sum(len(v) for v in out if v is not None)
        self.stats.fetch_misses += out.count(None)
        self.stats.fetched_bytes += got
        self.metrics.bytes.add(got, {"direction": "load"})
        return out

    async def _prefetch(self, client, keys: list[str], tag: Any) -> int:
        keys = [k for k in keys if k not in self._staging and k not in self._prefetching]
        if not keys or self._staging_bytes >= self.config.prefetch_bytes:
            self.stats.prefetch_skipped += 1
            return 0
        events = {k: anyio.Event() for k in keys}
        self._prefetching.update(events)
        staged = 0
        try:
            assert self._prefetch_slots is not None
            async with self._prefetch_slots:
                values = await client.get_many(keys)
            for key, value in zip(keys, values):
                if value is None:
                    break  # a prefix: nothing after the first miss will be loaded
                if self._staging_bytes + len(value) > self.config.prefetch_bytes:
                    self.stats.prefetch_skipped += 1
                    break
                self._staging[key] = (tag, value)
                self._staging_bytes += len(value)
                staged += 1
        finally:
            for key, event in events.items():
                self._prefetching.pop(key, None)
                event.set()
        return staged

    def _drop_staging(self, tag: Any) -> None:
        for key in [k for k, (t, _) in self._staging.items() if t == tag]:
            _, value = self._staging.pop(key)
            self._staging_bytes -= len(value)

    # ------------------------------------------------------------------ write-behind

    async def _uploader(self) -> None:
        assert self._wb_event is not None
        while True:
            if not self._wb:
                if self._wb_idle is not None:
                    self._wb_idle.set()
                await self._wb_event.wait()
                self._wb_event = anyio.Event()
                continue
            batch: list[_Save] = []
            size = 0
            while self._wb and len(batch) < 256 and (size < self.config.batch_bytes or not batch):
                item = self._wb.popleft()
                batch.append(item)
                size += item.nbytes
            self._uploading += 1
            try:
                await self._upload(batch, size)
            finally:
                self._uploading -= 1
                with self._lock:
                    self._wb_bytes -= size
                _release(batch)

    async def _upload(self, batch: list[_Save], size: int) -> None:
        # Last write wins within a batch; one key is uploaded once.
        unique: dict[str, _Save] = {}
        for item in batch:
            unique[item.key] = item
        keys = list(unique)
        t0 = time.perf_counter()
        await self._prepare(batch, size)
        parent = batch[0].parent
        with telemetry.span("membrain.save_batch", parent, {"membrain.namespace": self.config.namespace, "membrain.keys": len(keys), "membrain.bytes": size}) as sp:
            try:
                with anyio.fail_after(max(5.0, 3 * self.config.timeout)):
                    present = await self.client.exists(keys)
                    todo = [k for k, p in zip(keys, present) if not p or k in self._force_upload]
                    self._force_upload.difference_update(todo)
                    self.stats.saves_skipped_present += len(keys) - len(todo)
                    stored = await self.client.put_many(todo, [unique[k].parts for k in todo]) if todo else 0
            except Exception as exc:  # TimeoutError, refusals: a save is best effort
                log.debug("membrain save batch failed: %r", exc)
                stored, todo = 0, keys
                outcome = "error"
            else:
                outcome = "ok" if stored == len(todo) else "partial"
            if self.hot is not None:
                for k in keys:
                    parts = unique[k].parts
                    self.hot.put(k, parts[0] if len(parts) == 1 else b"".join(parts))
            failed = len(todo) - stored
            self.stats.saves_uploaded += stored
            self.stats.saves_failed += failed
            self.stats.upload_batches += 1
            nbytes = sum(unique[k].nbytes for k in todo[:stored]) if stored == len(todo) else 0
            self.stats.saved_bytes += nbytes
            self.metrics.bytes.add(nbytes, {"direction": "save"})
            self.metrics.outcomes.add(1, {"op": "save_batch", "outcome": outcome})
            telemetry.set_attributes(sp, **{"membrain.outcome": outcome, "membrain.stored": stored, "membrain.skipped": len(keys) - len(todo)})
        latency = time.perf_counter() - t0
        self.stats.record_latency("save_batch", latency)
        self.metrics.latency.record(latency, {"op": "save_batch"})

    async def _prepare(self, batch: list[_Save], size: int) -> None:
        hooks = [item.prepare for item in batch if item.prepare is not None]
        if not hooks:
            return

        def run() -> None:
            for hook in hooks:
                hook()

        if size > (4 << 20):
            await anyio.to_thread.run_sync(run)  # big payloads: keep the loop answering meanwhile
        else:
            run()

    async def _drain_write_behind(self) -> None:
        while self._wb or self._uploading:
            self._wb_idle = anyio.Event()
            if self._wb_event is not None:
                self._wb_event.set()
            await self._wb_idle.wait()

    def _fail_leftovers(self) -> None:
        dropped = len(self._wb)
        if dropped:
            self.stats.saves_dropped += dropped
            self.metrics.dropped.add(dropped)
            log.warning("membrain shutdown dropped %d queued saves (drain deadline %.1fs)", dropped, self._drain_deadline)
            _release(self._wb)
            self._wb.clear()
            with self._lock:
                self._wb_bytes = 0
        while self._inbox:
            message = self._inbox.popleft()
            if message[0] == "job":
                message[1].future._set(CANCELLED, None)


def _release(saves) -> None:
    for item in saves:
        if item.on_done is not None:
            try:
                item.on_done()
            except Exception:
                log.exception("membrain save callback failed")


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


def _backend_options(config: ConnectorConfig) -> dict:
    if config.async_backend != "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401  (vLLM depends on it; a faster loop means less GIL time per I/O)
    except ImportError:
        return {}
    return {"use_uvloop": True}


def _result_attributes(kind: str, value: Any) -> dict:
    if kind == "lookup" and isinstance(value, int):
        return {"membrain.hit_keys": value, "membrain.hit": value > 0}
    if kind == "lookup" and isinstance(value, list):
        return {"membrain.hit_keys": sum(value), "membrain.lookups": len(value)}
    if kind == "fetch" and isinstance(value, list):
        return {
            "membrain.bytes": sum(len(v) for v in value if v is not None),
            "membrain.missing": sum(1 for v in value if v is None),
        }
    if kind == "prefetch" and isinstance(value, int):
        return {"membrain.staged": value}
    return {}


def make_client(config: ConnectorConfig):
    """One node: a MembrainClient. Several (a comma-separated endpoint list): a MembrainCluster."""
    from ..client import CircuitBreaker, MembrainClient
    from ..client.cluster import MembrainCluster
    from ..tls import connector_context

    if len(config.endpoint) > 1 or config.replicas > 1:
        return MembrainCluster(
            config.endpoint,
            namespace=config.namespace,
            token=config.token or None,
            replicas=config.replicas,
            timeout=config.timeout,
            breaker_threshold=config.breaker_threshold,
            breaker_cooldown=config.breaker_cooldown,
            bulk_connections=config.connections,
            tls=connector_context(config),
        )
    return MembrainClient(
        config.endpoint[0],
        namespace=config.namespace,
        token=config.token or None,
        timeout=config.timeout,
        breaker=CircuitBreaker(config.breaker_threshold, config.breaker_cooldown),
        bulk_connections=config.connections,
        tls=connector_context(config),
    )
