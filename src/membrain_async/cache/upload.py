"""The write path to the remote tier: one write-behind batch at a time, skip what the server already
holds, put the rest, keep a copy in the hot tier, count what happened.

Keys a reader found corrupt (`BlockStore.forget`) are overwritten by their next save even though the
server holds them: the "already stored" check would otherwise keep a bad page there for good.
Runs on the runtime thread only.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import anyio

from .. import telemetry
from ..client.errors import MembrainUnavailable
from ..config import ConnectorConfig
from .hot import HotTier
from .outcome import Outcome
from .remote import RemoteTier
from .stats import StoreStats
from .write_behind import PendingSave

log = logging.getLogger("membrain.runtime")

OVERWRITE_MAX = 65536  # keys found corrupt and not re-saved by then are simply forgotten


class Uploader:
    def __init__(self, config: ConnectorConfig, remote: RemoteTier, hot: HotTier | None, stats: StoreStats, metrics: Any):
        self.config = config
        self.remote = remote
        self.hot = hot
        self.stats = stats
        self.metrics = metrics
        self._overwrite: set[str] = set()

    def overwrite(self, keys: Sequence[str]) -> None:
        """The next save of these keys uploads even if the server holds them (their copy is corrupt)."""
        if len(self._overwrite) > OVERWRITE_MAX:
            self._overwrite.clear()
        self._overwrite.update(keys)

    async def upload(self, saves: list[PendingSave], size: int) -> None:
        """One write-behind batch (one save per key): skip what the server holds, put the rest."""
        by_key = {s.key: s for s in saves}
        keys = list(by_key)
        todo = keys
        stored = 0
        t0 = time.perf_counter()
        attrs = {"membrain.namespace": self.config.namespace, "membrain.keys": len(keys), "membrain.bytes": size}
        with telemetry.span("membrain.save_batch", saves[0].parent, attrs) as sp:
            try:
                with anyio.fail_after(max(5.0, 3 * self.config.timeout)):
                    present = await self.remote.exists(keys)
                    todo = [k for k, p in zip(keys, present) if not p or k in self._overwrite]
                    self._overwrite.difference_update(todo)
                    self.stats.saves_skipped_present += len(keys) - len(todo)
                    if todo:
                        stored = await self.remote.put_many(todo, [by_key[k].parts for k in todo])
            except MembrainUnavailable:
                outcome = Outcome.UNAVAILABLE
                self.stats.saves_unavailable += len(todo)
            except Exception as exc:  # TimeoutError, refusals: a save is best effort
                log.debug("membrain save batch failed: %r", exc)
                outcome = Outcome.ERROR
            else:
                outcome = Outcome.OK if stored == len(todo) else Outcome.FAILED
            # Each save's own outcome, for its submitter's ring. put_many reports only how many it stored:
            # in a partial batch the first `stored` are taken as the stored ones (the counts are exact).
            sent = set(todo)
            for i, k in enumerate(todo):
                by_key[k].outcome = Outcome.OK if i < stored else (
                    Outcome.UNAVAILABLE if outcome is Outcome.UNAVAILABLE else Outcome.FAILED)
            for k in keys:
                if k not in sent:
                    by_key[k].outcome = Outcome.PRESENT
            if self.hot is not None:
                for k in keys:
                    parts = by_key[k].parts
                    self.hot.put(k, parts[0] if len(parts) == 1 else b"".join(parts))
            self.stats.saves_uploaded += stored
            self.stats.saves_failed += len(todo) - stored
            self.stats.upload_batches += 1
            nbytes = sum(by_key[k].nbytes for k in todo) if stored == len(todo) else 0
            self.stats.saved_bytes += nbytes
            self.metrics.bytes.add(nbytes, {"direction": "save"})
            self.metrics.outcomes.add(1, {"op": "save_batch", "outcome": outcome})
            telemetry.set_attributes(sp, **{"membrain.outcome": outcome, "membrain.stored": stored,
                                            "membrain.skipped": len(keys) - len(todo)})
        latency = time.perf_counter() - t0
        self.stats.record_latency("save_batch", latency)
        self.metrics.latency.record(latency, {"op": "save_batch"})

    def lost(self, saves: list[PendingSave]) -> None:
        """A batch never uploaded (its prepare hook failed): counted as failed."""
        self.stats.saves_failed += len(saves)
        for item in saves:
            item.outcome = Outcome.FAILED
