"""BlockStore: the one thing vLLM's halves (and embedding hosts) call for Membrain I/O.

    store = open_store(config)                        # shared per process; store.close() when done
    fut = store.lookup(keys, tag=req_id, ring=ring)   # returns at once
    ... later, never blocking: ring.poll(), fut.result_or(None)

Every call returns at once (a `MembrainFuture`, or a bool for `save`); the work runs on the executor's
thread (`runtime.Executor`). Behind the facade the tiers stack, nearest first:

    reads:  hot tier (cache.hot) -> prefetch staging (cache.staging) -> remote (cache.remote)
    writes: write-behind queue (cache.write_behind) -> uploader (cache.upload) -> remote; the hot tier
            keeps a copy

This is the one place that decides what an unreachable server means, and counts every outcome
(`StoreStats`), so a dead server, a miss and a corrupt page are told apart. An unreachable server is
never passed off as "not stored":

- lookup, fetch, load: the future fails with `MembrainUnavailable` (its ring Completion's outcome is
  "unavailable"), and `future.result_or(miss)` is how a caller serves it as a miss (the scheduler
  recomputes, the worker reports the blocks as load errors, not as missing). Counted `lookups_unavailable` / `fetch_unavailable` (keys). A real miss is
  a short count or None in the result (`fetch_misses`); any other failure fails the future with its
  error (`lookup_errors`, `fetch_errors`); a deadline with TimeoutError (`lookup_timeouts`,
  `fetch_timeouts`). What this process holds (the hot tier, prefetch staging) answers without the
  server, alive or not.
- prefetch: stages nothing (`prefetch_unavailable`); nobody waits on a prefetch.
- save: never waits; a full queue drops (`saves_dropped`); an upload to an unreachable server fails
  (`saves_failed`, of which `saves_unavailable`).
- corrupt pages are found by the reader (the payload check needs the KV layout); `forget()` is how it
  tells the store (`forgotten`), and the next save of such a key overwrites it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

import anyio

from .. import scatter, telemetry
from ..client.errors import MembrainUnavailable
from ..config import ConnectorConfig
from ..runtime.executor import Executor
from ..runtime.future import MembrainFuture
from ..runtime.ring import CompletionRing
from .outcome import Outcome, classify
from .prefix_query import PrefixQuery, hit_blocks
from .hot import HotTier
from .remote import RemoteTier, make_client
from .shared_fetch import SharedFetches
from .staging import PrefetchStaging
from .stats import StoreStats
from .upload import Uploader
from .write_behind import Buffer, PendingSave, WriteBehind

log = logging.getLogger("membrain.runtime")


class BlockStore:
    def __init__(
        self, config: ConnectorConfig, client_factory: Callable[[], Any] | None = None, meter_provider: Any = None
    ):
        self.config = config
        self.stats = StoreStats()
        self.hot = HotTier(config.local_cache_bytes) if config.local_cache_bytes > 0 else None
        self.staging = PrefetchStaging(config.prefetch_bytes)
        self.shared = SharedFetches()
        self.write_behind = WriteBehind(config.write_behind_bytes, config.batch_bytes)
        self.remote = RemoteTier(client_factory or (lambda: make_client(config)))
        self.metrics = telemetry.RuntimeMetrics(self._observe, meter_provider)
        self.uploader = Uploader(config, self.remote, self.hot, self.stats, self.metrics)
        self.executor = Executor(
            backend=config.async_backend,
            default_deadline=config.timeout,
            drain_deadline=config.shutdown_drain,
            resident=_OnLoop(self),
            observer=self._job_ended,
            span_attributes={"membrain.namespace": config.namespace},
            describe=_result_attributes,
        )
        self._pid = self.executor.pid
        # Who holds this store: its creator, plus one per open_store() that shared it. The last close()
        # stops it (after draining the write-behind queue within the drain deadline).
        self._holders = 1
        self._holders_lock = threading.Lock()
        self._on_stop: Callable[["BlockStore"], None] | None = None

    # ------------------------------------------------------------------ lifetime

    @property
    def running(self) -> bool:
        return self.executor.running

    @property
    def client(self) -> Any:
        return self.remote.client

    def start(self) -> None:
        """Start the runtime thread now (otherwise the first call does)."""
        self.executor.start()

    def together(self):
        """`with store.together():` the calls inside start on the runtime thread at once (one step's loads
        of a shared prefix then fetch it once: see Executor.together)."""
        return self.executor.together()

    def acquire(self) -> bool:
        """Take one more hold on a live store (see `open_store`); False if it is already stopping."""
        with self._holders_lock:
            if self._holders == 0:
                return False
            self._holders += 1
            return True

    def close(self, drain: float | None = None, join_timeout: float | None = None) -> None:
        """Give back this holder's hold; the last one drains the write-behind queue (within `drain`
        seconds, default VLLM_MEMBRAIN_SHUTDOWN_DRAIN) and stops the thread."""
        with self._holders_lock:
            if self._holders == 0:
                return
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._stop(drain, join_timeout)

    def stop_now(self, drain: float | None = None, join_timeout: float | None = None) -> None:
        """Stop whatever holds remain (process exit)."""
        with self._holders_lock:
            was, self._holders = self._holders, 0
        if was:
            self._stop(drain, join_timeout)

    def _stop(self, drain: float | None, join_timeout: float | None) -> None:
        if self._on_stop is not None:
            self._on_stop(self)
        self.write_behind.close()
        self.executor.shutdown(drain, join_timeout)

    # ------------------------------------------------------------------ reads (caller threads)

    def lookup(self, keys: Sequence[str], *, tag: Any = None, ring: CompletionRing | None = None) -> MembrainFuture:
        """How many leading keys are stored (one round trip, none if the hot tier has them all). Result: int.
        Fails with MembrainUnavailable when the server is needed and unreachable. A `PrefixQuery` (hybrid
        KV caches) asks which of its keys exist instead, in the same one round trip, and answers its hit."""
        keys = keys if isinstance(keys, PrefixQuery) else list(keys)
        self.stats.lookups += 1
        return self.executor.submit(
            "lookup", lambda: self._lookup(keys), tag=tag, ring=ring, deadline=self.config.lookup_deadline,
            attributes={"membrain.keys": len(keys)},
        )

    def lookup_many(
        self, key_lists: Sequence[Sequence[str]], *, tag: Any = None, ring: CompletionRing | None = None
    ) -> MembrainFuture:
        """Several prefix lookups in one job, run concurrently; one future completes them all at once.

        For requests that arrive together: their answers reach the scheduler in the same step, so a
        request sharing another's prefix is scheduled beside it. Result: list[int], one per key list.
        """
        lists = [keys if isinstance(keys, PrefixQuery) else list(keys) for keys in key_lists]
        self.stats.lookups += len(lists)

        async def go() -> list[int]:
            counts = [0] * len(lists)

            async def one(i: int) -> None:
                counts[i] = await self._lookup(lists[i])

            try:
                async with anyio.create_task_group() as tg:
                    for i in range(len(lists)):
                        tg.start_soon(one, i)
            except BaseExceptionGroup as group:
                # The job fails with one error, as a single lookup would: an unreachable server is
                # "unavailable" for all of them, whatever else failed alongside.
                first = group.subgroup(MembrainUnavailable) or group
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from group
            return counts

        return self.executor.submit("lookup", go, tag=tag, ring=ring, deadline=self.config.lookup_deadline,
                                    attributes={"membrain.keys": sum(map(len, lists))})

    def fetch(
        self, keys: Sequence[str], *, tag: Any = None, ring: CompletionRing | None = None, deadline: float | None = None
    ) -> MembrainFuture:
        """Values for keys (None: the server does not hold it). Result: list. Fails with
        MembrainUnavailable when the server is needed and unreachable."""
        keys = list(keys)
        return self.executor.submit(
            "fetch", lambda: self._fetch(keys), tag=tag, ring=ring, deadline=deadline or self.config.load_deadline,
            attributes={"membrain.keys": len(keys)},
        )

    def load(
        self,
        keys: Sequence[str],
        apply: Callable[[list], Any],
        *,
        into: Sequence[scatter.Target] | None = None,
        begin: Callable[[], bool] | None = None,
        release: Callable[[], None] | None = None,
        tag: Any = None,
        ring: CompletionRing | None = None,
        deadline: float | None = None,
    ) -> MembrainFuture:
        """Fetch keys, then run `apply(values)` on a worker thread (off the loop and off the caller).

        For copying fetched pages into their destination without the caller waiting: `apply` checks
        and copies (torch copies and checksums release the GIL). It is never abandoned once started: a
        deadline or cancellation that arrives meanwhile waits for it, so nothing writes into the
        destination after the job ends. Fails as fetch() does before `apply` runs. Result: what
        `apply` returns.

        `into`: one buffer per key, where its value is received (the values `apply` sees are views of
        them, or the Scatters themselves), so a load allocates nothing. A key another load is receiving
        right now is not asked of the server again: it is copied from that load's buffer
        (`shared_fetch.py`). `begin()`, if given, runs on the runtime thread before anything is written
        into the buffers; if it returns False the job ends there (its caller has given the buffers up).
        `release()` then runs on the runtime thread once nothing can write into or read from the buffers
        any more (after `apply`, and whatever happened). Neither is called for a job cancelled before it
        started: such buffers were never written, and the caller's pool simply does not get them back.
        """
        keys = list(keys)
        buffers = list(into) if into is not None else None

        async def go() -> Any:
            try:
                if begin is not None and not begin():
                    return None
                values = await self._fetch(keys, buffers)
                return await anyio.to_thread.run_sync(apply, values)
            finally:
                if release is not None:
                    release()

        return self.executor.submit(
            "load", go, tag=tag, ring=ring, deadline=deadline or self.config.load_deadline,
            attributes={"membrain.keys": len(keys)},
        )

    def prefetch(self, keys: Sequence[str], *, tag: Any = None) -> MembrainFuture:
        """Start fetching keys into staging memory; a later fetch() of them is served from there.
        Result: how many pages were staged."""
        keys = list(keys)
        self.stats.prefetches += 1
        return self.executor.submit(
            "prefetch", lambda: self._prefetch(keys, tag), tag=tag, deadline=self.config.load_deadline,
            attributes={"membrain.keys": len(keys)},
        )

    def cancel(self, tag: Any) -> None:
        """Cancel every pending job of `tag` and drop its staged prefetches (request finished or aborted)."""
        self.executor.cancel_tag(tag, then=lambda: self.staging.drop(tag))

    # ------------------------------------------------------------------ writes (caller threads)

    def save(
        self,
        key: str,
        parts: Sequence[Buffer],
        *,
        tag: Any = None,
        on_done: Callable[[], None] | None = None,
        prepare: Callable[[], None] | None = None,
        ring: CompletionRing | None = None,
    ) -> bool:
        """Queue a save (bytes already copied out of the KV cache). False if dropped: the queue is full.

        With `ring`, the save's end lands there as Completion("save", tag, key, outcome), outcome one
        of ok, present (the server already held it), failed, unavailable, dropped (never sent).

        `on_done()` runs on the runtime thread once the bytes are no longer needed (uploaded, skipped,
        failed or dropped at shutdown), so the caller can reuse the buffer. Not called when False is returned.
        `prepare()` runs before the upload, off the caller's thread (e.g. checksumming the payload).
        """
        nbytes = sum(memoryview(p).nbytes for p in parts)
        if not self.executor.stopping:
            self.executor.start()
        save = PendingSave(key, parts, nbytes, tag, telemetry.capture_context(), on_done, prepare, ring)
        if self.executor.stopping or not self.write_behind.offer(save):
            self.stats.saves_dropped += 1
            self.metrics.dropped.add(1)
            return False
        self.stats.saves_queued += 1
        self.executor.call_soon(self.write_behind.kick)
        return True

    def forget(self, keys: Sequence[str]) -> MembrainFuture:
        """Drop keys whose payload failed its check, locally and on the server, so the next save repairs them.

        Saves skip keys the server already holds; without this a corrupt block would be refused on every
        load and never rewritten. Result: how many the server deleted.
        """
        keys = list(keys)
        self.stats.forgotten += len(keys)

        async def go() -> int:
            self.uploader.overwrite(keys)  # even if the delete fails, the next save overwrites
            if self.hot is not None:
                for key in keys:
                    self.hot.discard(key)
            deleted = 0
            for key in keys:
                try:
                    deleted += bool(await self.remote.delete(key))
                except MembrainUnavailable:
                    break  # the forced overwrite repairs them once the server is back
            return deleted

        return self.executor.submit("forget", go, deadline=max(5.0, 3 * self.config.timeout),
                                    attributes={"membrain.keys": len(keys)})

    def flush(self, timeout: float) -> bool:
        """Explicitly wait (blocking, with a deadline) until the write-behind queue is empty."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.write_behind.idle:
                return True
            time.sleep(0.005)
        return self.write_behind.idle

    # ------------------------------------------------------------------ what it counts

    def _observe(self) -> dict[str, float]:
        return {
            "write_behind_bytes": self.write_behind.bytes,
            "write_behind_items": len(self.write_behind),
            "staging_bytes": self.staging.used,
            "inflight_jobs": self.executor.inflight,
        }

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = self.stats.counters()
        out.update(self.executor.stats.__dict__)
        out.update(self._observe())
        out.update(self.stats.percentiles())
        return out

    def _job_ended(self, kind: str, outcome: str, value: Any, latency: float) -> str:
        """Executor observer (runtime thread), before the job's future is set. Returns the outcome the
        completion ring reports: "unavailable" for a job the unreachable server failed."""
        outcome = Outcome.CANCELLED if outcome == "cancelled" else classify(value if outcome != "ok" else None)
        if outcome is Outcome.TIMEOUT:
            if kind == "lookup":
                self.stats.lookup_timeouts += 1
            elif kind in ("fetch", "load"):
                self.stats.fetch_timeouts += 1
        self.stats.record_latency(kind, latency)
        self.metrics.latency.record(latency, {"op": kind})
        self.metrics.outcomes.add(1, {"op": kind, "outcome": outcome})
        return outcome

    # ------------------------------------------------------------------ the tiers (runtime thread)

    async def _lookup(self, keys: "list[str] | PrefixQuery") -> int:
        if isinstance(keys, PrefixQuery):
            return await self._lookup_units(keys)
        local = self.hot.leading(keys) if self.hot is not None else 0
        if local == len(keys):
            return local  # every block is in this process: no round trip
        return local + await self._counted_lookup(self.remote.lookup(keys[local:]))

    async def _counted_lookup(self, call):
        """A lookup's round trip, its failures counted by kind."""
        try:
            return await call
        except MembrainUnavailable:
            # Not "0 stored": the scheduler must not take it as proof that its saved blocks are gone.
            self.stats.lookups_unavailable += 1
            raise
        except Exception:
            self.stats.lookup_errors += 1
            raise

    async def _lookup_units(self, query: PrefixQuery) -> int:
        wanted = query.all_keys()
        present = [self.hot is not None and k in self.hot for k in wanted]
        ask = [i for i, p in enumerate(present) if not p]
        if ask:
            answers = await self._counted_lookup(self.remote.exists([wanted[i] for i in ask]))
            for i, got in zip(ask, answers):
                present[i] = bool(got)
        return hit_blocks(query, present)

    async def _fetch(self, keys: list[str], buffers: list[memoryview] | None = None) -> list[memoryview | None]:
        """Values for keys, nearest tier first; with `buffers`, every value is in its key's buffer."""
        out: list[memoryview | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        if self.hot is not None:
            before = len(missing)
            missing = self.hot.fill(keys, out, missing)
            self.stats.hot_hits += before - len(missing)
        if missing:
            before = len(missing)
            # A load into buffers copies the page below, before anything else runs on the loop: the page
            # stays staged for the other requests that share it.
            missing = await self.staging.fill(keys, out, missing, take=buffers is None)
            self.stats.prefetch_used += before - len(missing)
        if buffers is not None:
            for i, value in enumerate(out):
                if value is not None:
                    out[i] = _copy_into(value, buffers[i])
        if missing:
            try:
                if buffers is None:
                    values = await self.remote.get_many([keys[i] for i in missing])
                else:
                    values = await self._receive_into([keys[i] for i in missing], [buffers[i] for i in missing])
            except MembrainUnavailable:
                self.stats.fetch_unavailable += len(missing)
                raise  # not a miss: the caller must not report these blocks as gone
            except Exception:
                self.stats.fetch_errors += len(missing)
                raise
            for i, value in zip(missing, values):
                out[i] = value
                if value is not None and not isinstance(value, scatter.Misfit) and self.hot is not None:
                    self.hot.put(keys[i], value)
        got = sum(len(v) for v in out if v is not None)
        self.stats.fetch_misses += out.count(None)
        self.stats.fetched_bytes += got
        self.metrics.bytes.add(got, {"direction": "load"})
        return out

    async def _receive_into(self, keys: list[str], buffers: list[memoryview]) -> list[memoryview | None]:
        shared_before = self.shared.shared
        sizes = await self.shared.get_into(keys, buffers, self.remote.get_many_into)
        self.stats.fetch_shared += self.shared.shared - shared_before
        return [scatter.filled(buf, size) for buf, size in zip(buffers, sizes)]

    async def _prefetch(self, keys: list[str], tag: Any) -> int:
        try:
            result = await self.staging.prefetch(keys, tag, self.remote.get_many)
        except MembrainUnavailable:
            self.stats.prefetch_unavailable += 1
            return 0
        if result.skipped:
            self.stats.prefetch_skipped += 1
        return result.staged

class _OnLoop:
    """The store's part of the executor's life (runtime thread): open the client and start the
    uploader, drain the queue at shutdown, close the client, give up what is left."""

    def __init__(self, store: BlockStore):
        self.store = store

    async def start(self, task_group) -> None:
        self.store.remote.open()
        task_group.start_soon(self.store.write_behind.run, self.store.uploader.upload, self.store.uploader.lost)

    async def drain(self) -> None:
        await self.store.write_behind.drain()

    async def close(self) -> None:
        await self.store.remote.aclose()

    def abandon(self) -> None:
        store = self.store
        dropped = store.write_behind.abandon()
        if dropped:
            store.stats.saves_dropped += dropped
            store.metrics.dropped.add(dropped)
            log.warning("membrain shutdown dropped %d queued saves (drain deadline %.1fs)",
                        dropped, store.executor.drain_deadline)


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


def _copy_into(value, buf: scatter.Target) -> scatter.Target | scatter.Misfit:
    """A value a local tier held, copied into the load's buffer (a Misfit if it does not fit it)."""
    return scatter.filled(buf, scatter.write(buf, value))
