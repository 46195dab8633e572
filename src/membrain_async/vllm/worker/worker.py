"""The connector's worker half (one per worker process and rank).

Loads (`loads.PageLoader`): a request's pages are received by the runtime thread (started early by
prefetch hints) into a host buffer's slots, then checked (header, checksum, shape) and copied whole into
its blocks on a worker thread. In async mode (the default) the request waits in vLLM's WAITING_FOR_REMOTE_KVS meanwhile and is
reported in `get_finished`; the batch never waits. In sync mode the step waits before its forward. A
page that is missing, late past the load deadline or corrupt is reported through
`get_block_ids_with_load_errors` (in the same step as the request), and vLLM recomputes it.

Saves: after the forward pass, newly full pages are gathered into a host buffer's slots, one copy per
layer (so vLLM may reuse the blocks at once), within the save budget, and held there as a `StagedSave`
under the step that computed them. They are handed to
the runtime's write-behind queue only when a later step's metadata carries that step's verdict: the
scheduler half has then seen every rank's invalid blocks for the step, and names the requests whose KV
was computed over a block that was never filled. Their copies are discarded, never uploaded.
The forward pass never waits on the network.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ... import keys
from ...config import ConnectorConfig
from ...cache import open_store
from ...cache.outcome import Outcome
from ...runtime import CompletionRing
from ..shared import identity
from ..shared.units import KVUnit, unit_by_unit
from .loads import PageLoader
from ..shared.metadata import MembrainConnectorMetadata, MembrainWorkerMetadata, SaveVerdict, kv_events_enabled
from .movers import PageMover, make_mover
from .pages import PageLayout, SaveBudget, UnsupportedLayout, write_header

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig

log = logging.getLogger("membrain.connector")

# Steps a staged save waits for its verdict before it is dropped (the scheduler stopped tracking it).
STAGED_STEPS_MAX = 16
# How long a step with nothing to compute rests while loads are in flight; it ends as soon as a load
# ends. Only an idle engine rests, so the one cost is that a request arriving meanwhile waits up to this
# long to be scheduled (less than a decode step here). Between rests vLLM's engine and worker processes
# spin, taking cores from the load's receive: a fresh instance loading 168 MB took 67-102 ms with 2 ms
# rests and 56-62 ms with 10 ms (raw loopback: ~49 ms).
IDLE_STEP_WAIT_S = 0.010


@dataclass
class StagedSave:
    """One request's blocks of one KV unit, gathered into the slots of a host buffer.

    Staged under its step until the step's verdict, then uploaded slot by slot once `copied` says the
    pages are in host memory (at once on CPU; after the device-to-host copy on an accelerator).
    """

    req_id: str
    unit: int
    hashes: list[str]
    host: "torch.Tensor"
    copied: Any  # an event: query() is True once the pages are in `host`
    nbytes: int  # held in the save budget until the last slot's upload ended
    discard: bool = False  # its verdict refused it: give the buffer back, upload nothing


class MembrainWorker:
    def __init__(self, vllm_config: "VllmConfig", config: ConnectorConfig, num_blocks: int, units: list[KVUnit]):
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        self.config = config
        self.num_blocks = num_blocks
        self.block_size = vllm_config.cache_config.block_size
        self.units = units
        self.fingerprints = identity.unit_fingerprints(vllm_config, config, units)
        # Several units or a sliding-window one (as the scheduler half): failures go per request, since vLLM
        # takes block ids of one KV group only (see get_transfer_results).
        self.hybrid = unit_by_unit(units)
        try:
            tp_rank, pp_rank = get_tp_group().rank_in_group, get_pp_group().rank_in_group
        except (AssertionError, AttributeError):  # groups not initialised (single process tools)
            tp_rank, pp_rank = 0, 0
        self.rank = identity.rank_label(tp_rank, pp_rank)
        self.store = open_store(config)  # held until shutdown()
        self.movers: list[PageMover] = []  # one per unit, over its layers' pages; empty: no usable layout
        self.budget = SaveBudget(config.write_behind_bytes)
        self._staged: dict[int, list[StagedSave]] = {}  # step -> saves awaiting that step's verdict
        self._ready: list[StagedSave] = []  # verdict given: uploaded (or released) once their copy finished
        self.loader: PageLoader | None = None
        self.async_loads = config.load_mode == "async" or self.hybrid
        self._finished_recving: set[str] = set()
        self._failed_recving: set[str] = set()  # hybrid: loads that failed, reported per request
        self._idle_step = False
        self._load_errors: set[int] = set()
        # Requests whose load failed this step: their forward ran without the missing pages, so whatever
        # it computed after them is wrong and must not be saved (vLLM recomputes it next step).
        self._failed_requests: set[str] = set()
        self._stats: dict[str, Any] = {}  # counters (numbers) and timers (lists of seconds), see shared/stats.py
        self._upload_ring = CompletionRing()  # the end of each save handed to the store
        self._allocated_reported = 0  # host buffers the movers had made at the last take_stats
        # Blocks loads found missing on the server, for the scheduler half's KV events (only when vLLM's are on).
        self._report_missing = kv_events_enabled(vllm_config)
        self._missing: list[str] = []

    def _key(self, block_hash: str, unit: int = 0) -> str:
        return keys.block_key(self.fingerprints[unit], self.rank, block_hash)

    def _count(self, name: str, value: float = 1) -> None:
        self._stats[name] = self._stats.get(name, 0) + value

    def _observe(self, name: str, seconds: float) -> None:
        self._stats.setdefault(name, []).append(seconds)

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        first = next(iter(kv_caches.values()), None)
        device = first.device if first is not None else None
        try:
            layouts = [self._unit_layout(kv_caches, u, identity.kv_layout(device.type if device else "cpu"))
                       for u in self.units]
            # Chosen once: accelerators take the device path; CPU moves pages between the cache and the slots.
            # Free host buffers are kept up to the budgets that bound them in flight (memory_budget.py).
            pool = (self.config.write_behind_bytes + self.config.step_load_bytes) // len(layouts)
            self.movers = [make_mover(layout, device, self.config.device_path_on_cpu, pool) for layout in layouts]
        except (UnsupportedLayout, ValueError) as exc:
            log.warning("Membrain disabled on this worker: %s", exc)
            self.movers = []
            return
        self.loader = PageLoader(self.store, self.movers, self._key, self.config.load_deadline)
        # The first load must not pay for what a serving instance pays once: the I/O thread and its
        # connections, and fresh host memory (below).
        self.store.start()
        self._prefault_loads()
        first_layout = layouts[0]
        log.info(
            "Membrain worker rank %s: %d layers in %d KV unit(s), page %s %s, %d bytes per block, %s",
            self.rank, sum(len(lay.layer_names) for lay in layouts), len(layouts), first_layout.page_shape,
            first_layout.dtype_name, sum(lay.payload_bytes for lay in layouts), type(self.movers[0]).__name__,
        )

    def _prefault_loads(self) -> None:
        """Fault in a buffer for a whole step's loads (VLLM_MEMBRAIN_STEP_LOAD_BYTES, counted in the worker's
        memory budget). With 64 MiB, a fresh instance's first 84 and 168 MB loads took 0.28 and 0.56 s over
        their limit, most of it page faults (a CPU cache received into directly needs none). At most a quarter of the memory available now; a failure costs only
        the first loads their faults: a step-load budget the host cannot give must not stop vLLM."""
        import psutil  # vLLM's dependency, as in plugin.py

        wanted = min(self.config.step_load_bytes, psutil.virtual_memory().available // 4)
        for mover in self.movers:
            if mover.direct:
                continue  # its loads land straight in the KV cache: no host buffer to fault in
            try:
                mover.prefault(max(1, wanted // mover.slot_bytes // len(self.movers)))
            except (RuntimeError, MemoryError) as exc:
                log.warning("Membrain: could not fault in %d MiB of host buffers for loads (%s); first loads "
                            "will pay page faults", wanted >> 20, str(exc).splitlines()[0])
                return

    def _unit_layout(self, kv_caches: dict[str, "torch.Tensor"], unit: KVUnit, layout: str) -> PageLayout:
        missing = [n for n in unit.layer_names if n not in kv_caches]
        if missing:
            raise UnsupportedLayout(f"KV group {unit.group}'s layers {missing[:3]} have no registered KV cache")
        return PageLayout.from_kv_caches({n: kv_caches[n] for n in unit.layer_names}, self.num_blocks, layout)

    # ------------------------------------------------------------------ loads

    def start_load_kv(self, meta: MembrainConnectorMetadata) -> None:
        self._failed_requests = set()
        self._idle_step = meta.idle
        self._apply_verdicts(meta.verdicts)
        self._expire_staged(meta.step)
        for finished in meta.finished:
            self.store.cancel(finished)  # its prefetches and its load, if one is still in flight
            if self.loader is not None:
                self.loader.cancel(finished)
        if self.loader is None:  # no usable layout: every load fails, and vLLM recomputes
            for load in meta.loads:
                self._fail(load.req_id, load.block_ids, Outcome.ERROR)
                if self.async_loads:
                    self._finished_recving.add(load.req_id)
            return
        with self.store.together():  # requests sharing a prefix in this step fetch it once
            for hint in meta.prefetch:
                self.store.prefetch(self._prefetch_keys(hint.hashes), tag=hint.req_id)
            for load in meta.loads:
                self.loader.submit(load)  # returns at once: the runtime fetches, a worker thread copies
        if meta.loads and not self.async_loads:
            # Sync mode: the forward pass needs these pages, so this step waits for them (bounded by the
            # deadline; whatever is late is reported and recomputed).
            t0 = time.perf_counter()
            self.loader.wait([load.req_id for load in meta.loads], self.config.load_deadline)
            self._collect_loads()
            self._observe("load_wait_seconds", time.perf_counter() - t0)

    def _prefetch_keys(self, hashes: list[str]) -> list[str]:
        """Every unit's keys a hit at the end of `hashes` would load (of a sliding window, its last blocks)."""
        out = []
        for u in self.units:
            first = u.first_needed_block(len(hashes) * self.block_size, self.block_size)
            out.extend(self._key(h, u.index) for h in hashes[first:])
        return out

    def _collect_loads(self) -> None:
        """Account for the loads that ended: finished requests for vLLM, failed blocks to recompute."""
        assert self.loader is not None
        for outcome in self.loader.drain():
            if self.async_loads:
                self._finished_recving.add(outcome.req_id)
            self._count("loaded_blocks", outcome.loaded)
            self._count("loaded_bytes", outcome.loaded_bytes)
            self._observe("load_seconds", outcome.seconds)
            if outcome.corrupt_keys:
                self.store.forget(outcome.corrupt_keys)
            if outcome.missing_hash and self._report_missing:
                self._missing.append(outcome.missing_hash)
            if outcome.why is Outcome.CANCELLED:  # the request finished or was aborted: nothing to recompute
                self._count("loads_cancelled")
            elif outcome.why is not Outcome.OK:
                self._fail(outcome.req_id, outcome.failed_block_ids, outcome.why)
                if self.hybrid:  # block ids are per group there: vLLM takes the request, and recomputes it
                    self._failed_recving.add(outcome.req_id)

    def get_finished(self) -> set[str] | None:
        """Requests whose async load ended on this rank (loaded, failed or cancelled), for vLLM."""
        if self.loader is not None:
            if self._idle_step:
                self.loader.idle_wait(IDLE_STEP_WAIT_S)
            self._collect_loads()
        done, self._finished_recving = self._finished_recving, set()
        return done or None

    def take_failed_recving(self) -> set[str]:
        """Requests whose async load failed on this rank (hybrid models: vLLM recomputes them whole)."""
        failed, self._failed_recving = self._failed_recving, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before the forward that reads them (sync) or before vLLM schedules it (async)

    def _fail(self, req_id: str, block_ids: list[int], why: Outcome) -> None:
        # vLLM truncates the request's computed tokens at the first bad block and recomputes from there.
        # Hybrid models: block ids are per group, so the request is reported failed instead.
        if not self.hybrid:
            self._load_errors.update(block_ids)
        self._failed_requests.add(req_id)
        self._count(f"load_errors_{why}", len(block_ids))
        self._count("load_error_blocks", len(block_ids))

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ------------------------------------------------------------------ saves

    def wait_for_save(self, meta: MembrainConnectorMetadata) -> None:
        """After the step's forward: gather the pages its plan saves, then upload what is ready.

        The one hook vLLM calls at the end of every step (idle ones too), so saves whose verdict came at
        this step's start (start_load_kv) and device copies that finished are handed on here."""
        if self.movers and meta.saves:
            t0 = time.perf_counter()
            self._stage(meta)
            self._observe("save_copy_seconds", time.perf_counter() - t0)
        self._upload_ready()

    def _stage(self, meta: MembrainConnectorMetadata) -> None:
        # This rank's own failed loads: the scheduler would discard these anyway, so skip the copy.
        saves = [s for s in meta.saves if s.req_id not in self._failed_requests]
        skipped = sum(len(s.block_ids) for s in meta.saves if s.req_id in self._failed_requests)
        if skipped:
            self._count("saves_skipped_after_load_error", skipped)
        staged = self._staged.setdefault(meta.step, [])
        for save in saves:
            units = [save.unit(i) for i in range(len(save.block_ids))]
            for unit in sorted(set(units)):
                idx = [i for i, u in enumerate(units) if u == unit]
                mover = self.movers[unit]
                nbytes = len(idx) * mover.slot_bytes
                if not self.budget.reserve(nbytes):  # a future miss, never a wait
                    self._count("dropped_saves", len(idx))
                    continue
                host, copied = mover.start_save([save.block_ids[i] for i in idx])
                staged.append(StagedSave(save.req_id, unit, [save.hashes[i] for i in idx], host, copied, nbytes))

    def worker_meta(self, meta: MembrainConnectorMetadata | None) -> MembrainWorkerMetadata | None:
        """Which step this output belongs to, for the scheduler to settle that step's staged saves."""
        if meta is None or not (meta.saves or self._missing):
            return None
        missing, self._missing = self._missing, []
        return MembrainWorkerMetadata([meta.step] if meta.saves else [], missing)

    def _apply_verdicts(self, verdicts: list[SaveVerdict]) -> None:
        for verdict in verdicts:
            discard = set(verdict.discard)
            for staged in self._staged.pop(verdict.step, ()):
                if staged.req_id in discard:
                    self._drop(staged, "save_copies_discarded")
                else:
                    self._ready.append(staged)

    def _expire_staged(self, step: int) -> None:
        for stale in [s for s in self._staged if s < step - STAGED_STEPS_MAX]:
            for staged in self._staged.pop(stale):
                self._drop(staged, "saves_unconfirmed")

    def _drop(self, staged: StagedSave, counter: str) -> None:
        # A device copy may still be writing its host buffer: it is given back once the copy finished.
        staged.discard = True
        self._ready.append(staged)
        self._count(counter, len(staged.hashes))

    def _upload_ready(self) -> None:
        """Hand saves whose verdict came and whose copy finished to the uploader (polls; never waits)."""
        still = []
        for staged in self._ready:
            if not staged.copied.query():
                still.append(staged)
            elif staged.discard:
                self._release(staged)
            else:
                self._upload(staged)
        self._ready = still

    def _upload(self, staged: StagedSave) -> None:
        mover = self.movers[staged.unit]
        left = [len(staged.hashes)]

        def uploaded() -> None:  # runtime thread, once per slot
            left[0] -= 1
            if left[0] == 0:
                self._release(staged)

        for i, block_hash in enumerate(staged.hashes):
            key = self._key(block_hash, staged.unit)
            payload = mover.slot(staged.host, i)
            # The checksum and header are written by the runtime thread, off the forward path.
            prepare = lambda p=payload, lay=mover.layout, k=key: write_header(lay, p, k)  # noqa: E731
            if self.store.save(key, [payload], tag=staged.req_id, on_done=uploaded, prepare=prepare,
                               ring=self._upload_ring):
                self._count("saved_blocks")
                self._count("saved_bytes", len(payload))
            else:
                uploaded()
                self._count("dropped_saves")

    def _release(self, staged: StagedSave) -> None:
        self.movers[staged.unit].release_host(staged.host)
        self.budget.release(staged.nbytes)

    def take_stats(self) -> dict[str, Any]:
        # Upload outcomes come back through this worker's completion ring (never waited for).
        for done in self._upload_ring.poll():
            if done.outcome in (Outcome.OK, Outcome.PRESENT):
                self._count("uploaded_blocks")
            elif done.outcome is Outcome.DROPPED:
                self._count("uploads_dropped")
            else:
                self._count("upload_failed_blocks")
        allocated = sum(m.allocated for m in self.movers)
        if allocated > self._allocated_reported:
            self._count("host_buffers_allocated", allocated - self._allocated_reported)
            self._allocated_reported = allocated
        stats, self._stats = self._stats, {}
        return stats

    def shutdown(self) -> None:
        if self.loader is not None:
            self.loader.cancel_all()
        # Saves still waiting for a verdict are dropped: unconfirmed KV is never uploaded.
        for step in list(self._staged):
            for staged in self._staged.pop(step):
                self._drop(staged, "saves_unconfirmed")
        for staged in self._ready:
            staged.copied.synchronize()  # shutting down: the last saves may wait for their copies
        self._upload_ready()
        store, self.store = self.store, None  # one hold, given back once
        if store is not None:
            store.close()
