"""The connector's scheduler half (EngineCore process).

It never waits on the network: a request's lookup is submitted to the block store when the request arrives
(from the engine core's input thread where there is one, else at the next scheduling pass: lookups.py);
`get_num_new_matched_tokens` answers from the lookup's answer (None while pending, so vLLM asks again
next step) and the runtime thread does the rest. What to load and what to save reaches the workers only
through `MembrainConnectorMetadata`.

Saves are two-phase: workers stage the pages a step's plan names, and upload them only when a later
step's metadata carries that step's verdict (`SaveLedger`), issued once vLLM has handed back every
rank's invalid block ids for it. Invalid blocks are also evicted from vLLM's prefix cache at once, with
every block computed after them, so no later request can reuse pages that were never filled.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ... import keys
from ...config import ConnectorConfig
from ...cache.outcome import Outcome
from ...cache import open_store
from ...cache.prefix_query import PrefixQuery, Series
from ..shared import identity
from ..shared.roles import BOTH, Role
from ..shared.units import NULL_BLOCK_ID, KVUnit, plain_unit, unit_by_unit
from .blockhash import BlockHashes
from .handoff import Handoff, handoff_params
from .lookups import Lookups
from ..shared.metadata import BlockTransfer, MembrainConnectorMetadata, MembrainWorkerMetadata
from .save_ledger import PlannedSave, SaveLedger
from .store import SchedulerStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from .kv_events import MembrainKVEvents

log = logging.getLogger("membrain.connector")


@dataclass
class _RequestState:
    request: "Request"
    chain: BlockHashes
    answer: int | None = None  # leading blocks the lookup found (None: no answer yet, or it failed)
    answer_outcome: Outcome | None = None  # the lookup job's outcome once it ended (None: not yet)
    lookup_started: float = 0.0
    lookup_blocks: int = 0  # how many leading blocks the lookup asked about
    lookup_seq: int | None = None  # the save ledger's clock when the lookup was sent (None: no answer)
    stored_blocks: int | None = None  # leading blocks the server holds (None: not known yet)
    local_tokens: int = 0  # block-aligned local hit, as vLLM last told us
    saved_upto: int = 0  # blocks before this index are saved, stored or not to be saved
    hot_blocks: int = 0  # leading blocks in this instance's hot tier
    prefetch_sent: bool = False
    loading: bool = False  # an async load was planned; vLLM calls update_state_after_alloc again after it
    handoff: Handoff | None = None  # a prefill instance's announcement this decode request waits for
    poll_at: float | None = None  # when to look up again for the hand-off (None: no re-poll scheduled)


class MembrainScheduler:
    """The scheduler half's policy over a `SchedulerStore` it is handed.

    `release`, if given, is called once at `shutdown()`: how whoever opened the store gives it back
    (`from_vllm_config` passes the hold `open_store` took). Without it the caller owns the store.
    `clock` (seconds, monotonic) times lookups against `lookup_deadline`; tests pass their own.
    `role` is vLLM's KV role (shared/roles.py): a producer never loads (it looks up, to save only what the
    store lacks), a consumer never saves.
    """

    def __init__(self, config: ConnectorConfig, store: SchedulerStore, *, block_size: int, fingerprint: str,
                 block_bytes: int, units: "list[KVUnit] | None" = None, unit_fingerprints: list[str] | None = None,
                 release: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 role: Role = Role(BOTH)):
        self.config = config
        self.role = role
        self.block_size = block_size
        self.fingerprint = fingerprint  # the model's (KV events' ownership); keys use the units' own
        # vLLM's KV cache groups as KV units (units.py). A plain model is one full-attention unit (what the
        # connector passes for it, and what no units means): lookups, loads and saves go unit by unit for
        # every model, and a plain model's answers come out as they always did.
        self.units: list[KVUnit] = list(units) if units else [plain_unit()]
        self.unit_fingerprints = unit_fingerprints or [fingerprint]
        # Where one unit of full attention still differs from the rest (kept apart on purpose):
        # - load failures: vLLM takes failed block ids of one KV group only; with several groups or a
        #   sliding window they go per request (failed_recving), which exists for async loads only;
        # - the hot-tier estimate (_hot_capacity, below).
        self.hybrid = unit_by_unit(self.units)
        self.async_loads = config.load_mode == "async" or self.hybrid
        # Lookups ask about the first shard; every shard saves and loads the same blocks.
        self.rank = identity.rank_label(0, 0)
        self.store = store
        self._release = release  # given back once, at shutdown()
        self._clock = clock
        self._requests: dict[str, _RequestState] = {}
        self._loads: list[BlockTransfer] = []
        self._prefetch: list[BlockTransfer] = []
        self._finished: list[str] = []
        self.lookups = Lookups(store, self._count, self._observe, clock)
        self._step = 0
        self._ledger = SaveLedger()
        self._kv_cache_manager: "KVCacheManager | None" = None
        self.load_failures = 0  # requests seen holding a block that failed to load (tests and logs)
        # Hashes this instance recently loaded or saved: what the workers' hot tiers hold (an estimate;
        # a block a worker has since dropped is fetched from the server, or recomputed).
        self._hot_capacity = config.local_cache_bytes // block_bytes if config.local_cache_bytes else 0
        if self.hybrid:
            # Kept apart: a sliding-window unit's blocks outside a load's window are never loaded, so "this
            # instance recently held the block" says nothing about them: always ask the server. (It is
            # also off for several full-attention units, e.g. a draft model's: as it always was.)
            self._hot_capacity = 0
        # Loads granted in the step being scheduled: bounds what a worker fetches and holds at once.
        self._step_load_limit = max(1, config.step_load_bytes // block_bytes)
        self._step_load_blocks = 0
        self._hot: OrderedDict[str, None] = OrderedDict()
        self._stats: dict[str, Any] = {}  # counters (numbers) and timers (lists of seconds), see shared/stats.py
        self.events: "MembrainKVEvents | None" = None  # set by the connector when vLLM's KV events are on

    @classmethod
    def from_vllm_config(cls, vllm_config: "VllmConfig", config: ConnectorConfig,
                         units: "list[KVUnit]", role: Role = Role(BOTH)) -> "MembrainScheduler":
        """The connector's scheduler half: over this process's shared block store, whose hold it gives back
        at shutdown."""
        layers = sum(len(u.layer_names) for u in units)
        facts = dict(block_size=vllm_config.cache_config.block_size,
                     fingerprint=identity.fingerprint(vllm_config, config),
                     block_bytes=identity.payload_bytes(vllm_config, layers),
                     units=units, unit_fingerprints=identity.unit_fingerprints(vllm_config, config, units))
        store = open_store(config)  # last: nothing above can fail with the hold taken
        return cls(config, store, release=store.close, role=role, **facts)

    # ------------------------------------------------------------------ block hashes and keys

    def _hashes(self, st: _RequestState, upto_blocks: int) -> list[str]:
        return st.chain.extend(st.request, upto_blocks)

    def keys_for(self, hashes: list[str], unit: int = 0) -> list[str]:
        fp = self.unit_fingerprints[unit]
        return [keys.block_key(fp, self.rank, h) for h in hashes]

    def lookup_for(self, hashes: list[str]) -> "list[str] | PrefixQuery":
        """What to ask the store: every unit's keys, with what a hit needs of each (cache.prefix_query).

        A lone full-attention unit needs a leading run of its keys, which is the store's plain prefix
        count: it is sent as its key list. Same answer as a one-series PrefixQuery, but the store answers
        a key list with the server's prefix lookup (one round trip that stops at the first missing key,
        and warms the server's disk tier), a PrefixQuery by asking whether each key exists.
        """
        keys = [self.keys_for(hashes, u.index) for u in self.units]
        if len(self.units) == 1 and self.units[0].window_tokens is None:
            return keys[0]
        return PrefixQuery(tuple(Series(tuple(k), u.window_tokens) for k, u in zip(keys, self.units)), self.block_size)

    def _loadable_blocks(self, request: "Request") -> int:
        # At least one prompt token must be computed, so a hit never covers the last token.
        return max(0, (request.num_tokens - 1) // self.block_size)

    def _count(self, name: str, value: float = 1) -> None:
        self._stats[name] = self._stats.get(name, 0) + value

    def _observe(self, name: str, seconds: float) -> None:
        self._stats.setdefault(name, []).append(seconds)

    # ------------------------------------------------------------------ vLLM scheduler hooks

    def on_request_arriving(self, request: "Request") -> None:
        """Engine core input thread, while the busy loop runs a step (arrival.py): send the lookup now.

        Touches only the request, the ledger's clock (an int) and `lookups`' arrivals (under its lock).
        """
        n = self._loadable_blocks(request)
        if n == 0 or request.skip_reading_prefix_cache:
            return
        chain = BlockHashes(self.block_size)
        query = self.lookup_for(chain.extend(request, n))
        self.lookups.send_on_arrival(request.request_id, query, chain, self._ledger.now())

    def on_new_request(self, request: "Request") -> None:
        arrival = self.lookups.take_arrival(request.request_id)
        st = _RequestState(request, arrival.chain if arrival else BlockHashes(self.block_size))
        self._requests[request.request_id] = st
        n = self._loadable_blocks(request)
        if n == 0 or request.skip_reading_prefix_cache:
            st.stored_blocks = 0
            return
        hashes = self._hashes(st, n)
        st.lookup_blocks = len(hashes)
        st.handoff = Handoff.of(request, self.fingerprint, self._clock(), self.config.handoff_deadline)
        st.hot_blocks = self._hot_leading(hashes)
        if st.hot_blocks == len(hashes):
            st.stored_blocks = st.hot_blocks  # all in this instance's hot tier: the arrival's answer is not needed
            self._count("hot_lookups")
            return
        if arrival is not None:
            st.lookup_started, st.lookup_seq = arrival.started, arrival.seq
            if arrival.answer is not None:
                st.answer_outcome, st.answer = arrival.answer
            return
        st.lookup_started = self._clock()
        st.lookup_seq = self._ledger.now()
        # Sent at vLLM's next pass, with every request that arrived meanwhile (lookups.py).
        self.lookups.queue(request.request_id, self.lookup_for(hashes))

    def _is_waiting(self, req_id: str) -> bool:
        return req_id in self._requests

    def _deliver(self, req_id: str, outcome: Outcome, count: int | None) -> bool:
        st = self._requests.get(req_id)
        if st is None:
            return False
        if st.answer_outcome is None:  # else already given up on at the deadline
            st.answer_outcome, st.answer = outcome, count
        return True

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        self.lookups.send_queued(self._is_waiting)
        st = self._requests.get(request.request_id)
        if st is None:  # not seen by on_new_request (should not happen): behave as a miss
            return 0, False
        st.local_tokens = num_computed_tokens
        if st.stored_blocks is None:
            # Once per pass: two requests looked up in one job are scheduled in one step even when the
            # answer lands between vLLM's questions about them.
            self.lookups.drain_once(self._deliver)
            if st.poll_at is not None and st.answer_outcome is None:
                self._poll_handoff_when_due(st)
                return None, False  # waiting for the next re-poll, or for its answer
            if self._ask_again_for_handoff(st):
                return None, False  # the prefill's saves are still on their way: ask the store again
            if st.answer_outcome is None:
                if self._clock() - st.lookup_started < self.config.lookup_deadline:
                    self.lookups.waited()
                    self._queue_prefetch(st, num_computed_tokens)
                    return None, False  # ask again next step; the engine keeps running
                st.answer_outcome = Outcome.TIMEOUT  # a late answer is ignored
                if self._ask_again_for_handoff(st):
                    return None, False  # a prefill said its blocks are coming: a slow lookup is no miss
            if st.answer is None:
                st.lookup_seq = None  # no answer: "missing" is not known, so it proves nothing
            st.stored_blocks = max(st.hot_blocks, min(st.answer or 0, st.lookup_blocks))
            if self.events is not None and st.lookup_seq is not None:
                self.events.lookup_missing(st.chain.hashes, st.answer or 0, st.lookup_blocks, st.lookup_seq)
            self._observe("lookup_seconds", self._clock() - st.lookup_started)
            self._count("lookups")
            if st.answer_outcome is Outcome.TIMEOUT:
                self._count("lookup_timeouts")
            elif st.answer_outcome is Outcome.UNAVAILABLE:
                self._count("lookup_unavailable")
            elif st.answer_outcome is not Outcome.OK:
                self._count("lookup_errors")
        if not self.role.loads:
            # A producer looks up only to save what the store lacks (a block the server evicted since
            # this instance saved it is saved again: its decode instance waits for every block).
            return 0, False
        hit_blocks = min(st.stored_blocks, self._loadable_blocks(request))
        local_blocks = num_computed_tokens // self.block_size
        load_blocks = hit_blocks - local_blocks
        if load_blocks <= 0:
            return 0, False
        if self._step_load_blocks + load_blocks > self._step_load_limit:
            if self._step_load_blocks:
                self._count("loads_deferred")
                return None, False  # this step's loads are at the limit: ask again next step
            load_blocks = self._step_load_limit  # alone in the step: load what the limit allows
        # Async: vLLM parks the request in WAITING_FOR_REMOTE_KVS with its blocks allocated until every
        # worker reports the load finished, and runs the rest of the batch meanwhile.
        return load_blocks * self.block_size, self.async_loads

    def _ask_again_for_handoff(self, st: _RequestState) -> bool:
        """A decode request handed off by a prefill instance: the store answered with fewer blocks than the
        prefill announced, so its uploads are still under way. Look up again until they are all there,
        or until the count stood still for the hand-off's wait (then load what is there, compute the rest)."""
        if st.handoff is None or st.answer_outcome not in (Outcome.OK, Outcome.TIMEOUT):
            return False  # no hand-off, no answer yet, or no answer to come (server down: compute)
        # Blocks this instance's own prefix cache holds need not come from the store.
        have = max(st.answer or 0, st.local_tokens // self.block_size)
        if have >= min(st.handoff.blocks, st.lookup_blocks):
            st.handoff = st.poll_at = None
            return False
        now = self._clock()
        handoff = st.handoff.answered(st.answer or 0, now)
        if handoff.expired(now):
            st.handoff = st.poll_at = None
            self._count("handoff_timeouts")
            return False
        st.poll_at, st.handoff = handoff.next_poll(now)
        st.answer_outcome = st.answer = None
        self._poll_handoff_when_due(st)
        return True

    def _poll_handoff_when_due(self, st: _RequestState) -> None:
        """Send the hand-off's next lookup once its time has come (handoff.py: back-off, not every pass)."""
        if st.poll_at is None or self._clock() < st.poll_at:
            return
        st.poll_at = None
        st.lookup_started = self._clock()
        st.lookup_seq = self._ledger.now()
        self.lookups.queue(st.request.request_id, self.lookup_for(st.chain.hashes[: st.lookup_blocks]))
        self.lookups.waited()
        self._count("handoff_polls")

    def _queue_prefetch(self, st: _RequestState, local_tokens: int) -> None:
        """While the lookup is pending, let workers start fetching the blocks the local cache lacks."""
        if st.prefetch_sent or self.config.prefetch_bytes <= 0:  # prefetch staging is off (the default)
            return
        st.prefetch_sent = True
        first = local_tokens // self.block_size
        hashes = st.chain.hashes[first : st.lookup_blocks]
        if hashes:
            self._prefetch.append(BlockTransfer(st.request.request_id, [], hashes))

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        st = self._requests.get(request.request_id)
        if st is None:
            return
        if st.loading and num_external_tokens <= 0:
            st.loading = False  # back from WAITING_FOR_REMOTE_KVS: the load was planned and counted
            return
        first = st.local_tokens // self.block_size
        queried = max(0, request.num_tokens - st.local_tokens)
        self._count("query_tokens", queried)
        if num_external_tokens <= 0:
            self._count("miss_blocks", max(0, st.lookup_blocks - first))
            return
        n = num_external_tokens // self.block_size
        st.loading = self.async_loads
        self._step_load_blocks += n
        self._loads.append(self._load_plan(request.request_id, blocks.get_block_ids(), st.chain.hashes, first, n))
        self._remember_hot(st.chain.hashes[first : first + n])
        self._count("hit_blocks", n)
        self._count("hit_tokens", n * self.block_size)
        self._count("miss_blocks", max(0, st.lookup_blocks - first - n))

    def _load_plan(self, req_id: str, tables: tuple, hashes: list[str], first: int, n: int) -> BlockTransfer:
        """Blocks first..first+n of every unit, position by position. A sliding-window unit's blocks below
        the window before the hit are vLLM's null block: nothing is loaded into them. (A full-attention
        table never holds the null block: a plain model loads its table's blocks first..first+n.)"""
        plan = BlockTransfer(req_id, [], [], [])
        hit = first + n
        needed = [(u, u.first_needed_block(hit * self.block_size, self.block_size)) for u in self.units]
        for b in range(first, hit):
            for u, start in needed:
                block_id = tables[u.group][b]
                if block_id == NULL_BLOCK_ID or b < start:
                    continue
                plan.block_ids.append(block_id)
                plan.hashes.append(hashes[b])
                plan.units.append(u.index)
        return self._compact(plan)

    def _compact(self, plan: BlockTransfer) -> BlockTransfer:
        """One unit: every entry is unit 0, which BlockTransfer says with no units list (less to pickle)."""
        if len(self.units) == 1:
            plan.units = []
        return plan

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> MembrainConnectorMetadata:
        self.lookups.send_queued(self._is_waiting)  # requests this pass did not reach: their lookups go out now
        self._step += 1
        self._step_load_blocks = 0
        meta = MembrainConnectorMetadata(
            step=self._step,
            loads=self._loads,
            saves=self._plan_saves(scheduler_output),
            prefetch=self._prefetch,
            finished=self._finished,
            verdicts=self._ledger.take_verdicts(),
            idle=not scheduler_output.total_num_scheduled_tokens,
        )
        self._loads, self._prefetch, self._finished = [], [], []
        self.lookups.end_pass(meta.idle)
        return meta

    # ------------------------------------------------------------------ what each step's output says

    def bind_kv_cache_manager(self, kv_cache_manager: "KVCacheManager") -> None:
        self._kv_cache_manager = kv_cache_manager

    def update_connector_output(self, output: "KVConnectorOutput") -> None:
        """Every rank's invalid blocks (or failed requests) of a step: evict them locally, and settle that
        step's staged saves."""
        invalid = set(output.invalid_block_ids or ())
        if invalid:
            self._evict_unfilled(invalid)
        for req_id in output.failed_recving or ():
            # Hybrid models: a failed load is reported per request, and vLLM recomputes it from its start.
            # Forget the hit, or its re-admission would load the same blocks again.
            st = self._requests.get(req_id)
            if st is not None:
                self.load_failures += 1
                self._rewind_failed_load(st, 0)
        worker_meta = output.kv_connector_worker_meta
        for step in worker_meta.steps if isinstance(worker_meta, MembrainWorkerMetadata) else ():
            discarded = self._ledger.settle(step, invalid)
            for d in discarded:
                self._replan(d)
            if self.events is not None:
                self.events.settled(step, discarded)
        if self.events is not None and isinstance(worker_meta, MembrainWorkerMetadata):
            self.events.load_missing(worker_meta.missing)

    def _evict_unfilled(self, invalid: set[int]) -> None:
        """Drop blocks that failed to load, and every block computed after them, from vLLM's prefix cache.

        Under the recompute policy vLLM keeps them cached, expecting the failed request to refill them;
        if it is aborted or preempted first, or another request is scheduled before the refill, they
        would be served as if valid. Requests that hold them keep them (eviction only drops the hash).

        Block-level failures come with one KV group only (a plain model, table 0): with several, or a
        sliding window, vLLM takes failures per request (failed_recving), and this is not reached.
        """
        manager = self._kv_cache_manager
        if manager is None:
            return
        evict = set(invalid)
        for req_id in list(self._requests):
            try:
                table = manager.get_block_ids(req_id)[0]
            except (KeyError, IndexError, AssertionError):
                continue
            first = next((i for i, b in enumerate(table) if b in invalid), None)
            if first is not None:
                evict.update(table[first:])
                self.load_failures += 1
                self._rewind_failed_load(self._requests[req_id], first)
        manager.evict_blocks(evict)
        self._count("evicted_unfilled_blocks", len(evict))

    def _replan(self, discarded: PlannedSave) -> None:
        """A staged save was computed over an unfilled block: plan it again once vLLM has recomputed."""
        for h in discarded.hashes:
            self._hot.pop(h, None)
        st = self._requests.get(discarded.req_id)
        if st is not None:
            st.saved_upto = min(st.saved_upto, discarded.first_block)
        self._count("saves_discarded_unfilled", len(discarded.hashes))

    def has_pending_push_work(self) -> bool:
        # A step's verdict rides on the next step's metadata: an idle engine steps once more to send it.
        return self._ledger.verdicts_pending()

    def _plan_saves(self, scheduler_output: "SchedulerOutput") -> list[BlockTransfer]:
        """Blocks that are full once this step's forward has run, not yet saved, not known stored."""
        saves: list[BlockTransfer] = []
        block_state = scheduler_output.kv_connector_block_state
        if block_state is None or not self.role.saves:
            return saves
        bs = self.block_size
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            st = self._requests.get(req_id)
            if st is None:
                continue
            req = st.request
            self._notice_failed_load(st)
            computed_after = req.num_computed_tokens + scheduled
            full = computed_after // bs
            if not self.config.save_decode:
                full = min(full, req.num_prompt_tokens // bs)
            # Blocks the server already holds are never re-sent.
            start = max(st.saved_upto, st.stored_blocks or 0)
            if full <= start:
                continue
            hashes = self._hashes(st, full)
            full = len(hashes)
            tables = block_state.get_block_ids(req_id)
            if tables is None:
                continue
            block_ids = tables[0]
            upto = min(full, *(len(t) for t in tables))
            plan = BlockTransfer(req_id, [], [])
            plan_hashes = []
            first_planned = None
            for b in range(start, upto):
                h = hashes[b]
                # A block the lookup covered and reported missing (server restarted, evicted, our upload
                # failed) is saved again, unless this instance planned it after that lookup was sent.
                if not self._ledger.wanted(h, st.lookup_seq if b < st.lookup_blocks else None):
                    continue
                if first_planned is None:
                    first_planned = b
                plan_hashes.append(h)
                self._plan_position(plan, tables, b, h)
            st.saved_upto = max(st.saved_upto, upto)
            if plan_hashes:
                planned = self._ledger.plan(self._step, req_id, first_planned, plan_hashes, block_ids)
                if self.events is not None:
                    self.events.planned(planned, req, st.chain.hashes)
                saves.append(self._compact(plan))
                self._remember_hot(plan_hashes)
                self._count("save_blocks_planned", len(plan.block_ids))
        return saves

    def _plan_position(self, plan: BlockTransfer, tables: tuple, b: int, h: str) -> None:
        """Block `b` of every unit into a save plan. Every unit saves every block it still holds: a later
        hit may end at any block, and a sliding-window unit's window before it is then needed. A block
        vLLM already freed (outside the window) or never filled (a load's window) is the null block (never
        in a full-attention table)."""
        for u in self.units:
            block_id = tables[u.group][b]
            if block_id != NULL_BLOCK_ID:
                plan.block_ids.append(block_id)
                plan.hashes.append(h)
                plan.units.append(u.index)

    def _notice_failed_load(self, st: _RequestState) -> None:
        """A failed load sends the request back to the block it failed at: save from there again."""
        if not self.role.loads:
            return  # a producer computes the blocks the store holds: they are no load that failed
        self._rewind_failed_load(st, st.request.num_computed_tokens // self.block_size)

    def _rewind_failed_load(self, st: _RequestState, valid_blocks: int) -> None:
        """Only the first `valid_blocks` of the request hold loaded KV; the rest is recomputed.

        vLLM truncates `num_computed_tokens` to the first bad block and recomputes. Those blocks, and any
        the worker declined to save in the failing step, are then saved like fresh ones (a corrupt copy on
        the server is overwritten: the worker asked the runtime to forget it). Lowering `stored_blocks`
        also keeps a request whose async load failed from loading the same blocks again when vLLM
        re-admits it.
        """
        if not st.stored_blocks:
            return
        loaded_upto = min(st.stored_blocks, self._loadable_blocks(st.request))
        if valid_blocks >= loaded_upto:
            return
        st.stored_blocks = valid_blocks
        hashes = st.chain.hashes[valid_blocks : max(st.saved_upto, loaded_upto)]
        self._ledger.forget(hashes)
        for h in hashes:
            self._hot.pop(h, None)
        st.saved_upto = min(st.saved_upto, valid_blocks)
        self._count("reloads_recomputed")

    def _hot_leading(self, hashes: list[str]) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self._hot:
            n += 1
        return n

    def _remember_hot(self, hashes: list[str]) -> None:
        if not self._hot_capacity:
            return
        for h in hashes:
            self._hot[h] = None
            self._hot.move_to_end(h)
        while len(self._hot) > self._hot_capacity:
            self._hot.popitem(last=False)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)  # a lookup still in flight ends by its deadline
        self._finished.append(request.request_id)
        # Workers copy pages out in the step that plans them (CPU: in wait_for_save; CUDA: the compute
        # stream waits for the gather), so blocks can be freed at once.
        params = handoff_params(request, self.block_size, self.fingerprint) if self.role.hands_off else None
        return False, params

    def take_stats(self) -> dict[str, Any]:
        stats, self._stats = self._stats, {}
        return stats

    def reset_cache(self) -> None:
        self._ledger.clear()

    def shutdown(self) -> None:
        release, self._release = self._release, None  # given back once
        if release is not None:
            release()
