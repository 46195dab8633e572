"""Loading pages into a worker's KV cache: fetched, checked and copied off the forward path.

Each request's load is one job of the block store. On a CPU cache the runtime thread receives every block
straight into the request's allocated blocks (a `Scatter`: the header to a small buffer, each layer's page
where it lies), and a worker thread checks them (header, checksum, key tag, shape): no copy at all. On a
device, or a cache that is not one contiguous tensor per layer, pages are received into the slots of a
pooled host buffer (movers.py) and the worker thread copies the checked ones into the blocks, one copy per
layer. Torch copies and the checksum release the GIL, so the forward pass runs on meanwhile. The job's outcome lands
in this worker's completion ring; the worker drains it once per step (`drain`), and vLLM learns which
requests finished receiving and which blocks failed.

In async mode (the default) vLLM parks the request in WAITING_FOR_REMOTE_KVS until every rank reported
it, and the batch never waits. In sync mode the worker waits for the step's loads before its forward.

The one rule that keeps reused KV correct: nothing may write into a request's blocks after the request is
reported finished, because vLLM may then hand those blocks to another request. A `_Ticket` makes the
report and every write exclusive: the copy starts only if the load is still wanted, and once it started
the load is reported only when the copy ended. A deadline or an abort that arrives mid-copy waits for it
(a copy of one request's pages takes milliseconds; the network wait before it is what deadlines bound).
A load received straight into the blocks writes from its first byte: its job begins only if the load is
still wanted, and a load stopped once it began is reported only when its job is over (`_release`), never
while a receive may still land in the blocks. A block whose receive failed half-way holds garbage, and is
reported failed like any other: vLLM recomputes it before anything reads it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ... import codec
from ...cache.outcome import Outcome, classify
from ...runtime import Completion, CompletionRing
from ...scatter import Scatter
from ..shared.metadata import BlockTransfer
from .movers import PageMover
from .pages import check_block

log = logging.getLogger("membrain.connector")

_WAITING, _COPYING, _DONE = 0, 1, 2


@dataclass
class LoadOutcome:
    """What became of one request's load on this worker."""

    req_id: str
    block_ids: list[int]
    loaded: int = 0  # leading blocks copied in and valid
    loaded_bytes: int = 0
    why: Outcome = Outcome.OK  # what stopped the blocks after `loaded` (OK: every block loaded)
    corrupt_keys: list[str] = field(default_factory=list)
    missing_hash: str = ""  # why is MISSING: the chain hash of the first block the server lacked
    seconds: float = 0.0

    @property
    def failed_block_ids(self) -> list[int]:
        return self.block_ids[self.loaded :]


class _Ticket:
    """One load in flight: guards the hand-off between the copying thread and the report."""

    __slots__ = ("load", "hosts", "lock", "state", "writing", "deferred", "future", "started", "ended", "stop_reason")

    def __init__(self, load: BlockTransfer):
        self.load = load
        self.hosts: dict[int, object] = {}  # unit -> the host buffer its pages are received into (not direct)
        self.lock = threading.Lock()
        self.state = _WAITING
        self.writing = False  # its job began and may still write into the blocks (direct units)
        self.deferred: LoadOutcome | None = None  # stopped while writing: reported when the job is over
        self.future = None
        self.started = time.perf_counter()
        self.ended = threading.Event()
        self.stop_reason = Outcome.CANCELLED  # what a stop before the copy is reported as


class PageLoader:
    """Submits, copies, reports and cancels the loads of one worker."""

    def __init__(self, store, movers: list[PageMover], key_of: Callable[[str, int], str], deadline: float):
        self.store = store  # the cache layer: fetches, then runs the copy on a worker thread
        self.movers = movers  # one per KV unit (vllm/shared/units.py): BlockTransfer.units index them
        self.key_of = key_of  # (chain hash, unit) -> key
        self.deadline = deadline
        self.ring = CompletionRing()
        self.ended = threading.Event()  # set whenever a load ended (for an idle step's short wait)
        self._inflight: dict[str, _Ticket] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def submit(self, load: BlockTransfer) -> None:
        """Start fetching and copying one request's pages; returns at once."""
        ticket = _Ticket(load)
        previous = self._inflight.get(load.req_id)
        if previous is not None:  # not expected: vLLM loads a request once per admission
            log.warning("Membrain: request %s loads again while a load is in flight", load.req_id)
        self._inflight[load.req_id] = ticket
        units = [load.unit(i) for i in range(len(load.hashes))]
        for unit in set(units):
            if not self.movers[unit].direct:
                ticket.hosts[unit] = self.movers[unit].host_buffer(units.count(unit), any_size=True)
        headers = memoryview(bytearray(codec.HEADER_SIZE * len(units)))  # direct blocks' headers land here
        keys, slots, taken = [], [], dict.fromkeys(ticket.hosts, 0)
        for i, (block_id, block_hash, unit) in enumerate(zip(load.block_ids, load.hashes, units)):
            keys.append(self.key_of(block_hash, unit))
            mover = self.movers[unit]
            if mover.direct:
                header = headers[i * codec.HEADER_SIZE : (i + 1) * codec.HEADER_SIZE]
                slots.append(Scatter([header, *mover.pieces(block_id)], codec.running_checksum))
            else:
                slots.append(mover.slot(ticket.hosts[unit], taken[unit]))
                taken[unit] += 1
        ticket.future = self.store.load(keys, lambda values: self._copy(ticket, values), into=slots,
                                        begin=lambda: self._begin(ticket), release=lambda: self._release(ticket),
                                        tag=load.req_id, deadline=self.deadline)
        ticket.future.add_done_callback(lambda fut: self._ended_without_copy(ticket, fut))

    def _begin(self, ticket: _Ticket) -> bool:
        """The job begins (runtime thread), before any byte is received: only if the load is still wanted."""
        with ticket.lock:
            if ticket.state != _WAITING:
                return False  # reported already: its blocks may belong to someone else now
            ticket.writing = True
            return True

    def _release(self, ticket: _Ticket) -> None:
        """The job is over (runtime thread): nothing writes into the blocks, or into or from its host
        buffers, any more. A load stopped meanwhile is reported now."""
        for unit, host in ticket.hosts.items():
            self.movers[unit].release_host(host)
        with ticket.lock:
            ticket.writing = False
            deferred, ticket.deferred = ticket.deferred, None
        if deferred is not None:
            self._finish(ticket, deferred)

    def cancel(self, req_id: str) -> None:
        """The request finished or was aborted: stop its fetch (a copy already running completes)."""
        ticket = self._inflight.get(req_id)
        if ticket is not None and ticket.future is not None:
            ticket.future.cancel()

    def wait(self, req_ids: list[str], timeout: float) -> None:
        """Sync mode: wait (bounded) for these loads; a late one is cancelled, and waited for if copying."""
        end = time.monotonic() + timeout
        for req_id in req_ids:
            ticket = self._inflight.get(req_id)
            if ticket is None:
                continue
            if not ticket.ended.wait(max(0.0, end - time.monotonic())):
                ticket.stop_reason = Outcome.TIMEOUT  # late for the forward that needs it: recomputed
                ticket.future.cancel()
                ticket.ended.wait()  # only a running copy is left: it is never abandoned

    def idle_wait(self, timeout: float) -> None:
        """A step with nothing to compute: rest briefly (until a load ends) instead of spinning.

        vLLM steps an engine whose only requests wait for their KV in a tight loop; spinning holds the
        GIL and a core the copying thread needs. Only called when the step had no work, so nothing waits.
        """
        if self._inflight and not len(self.ring):
            self.ended.wait(timeout)

    def drain(self) -> list[LoadOutcome]:
        """Loads that ended since the last call (never blocks)."""
        self.ended.clear()
        out = []
        for completion in self.ring.poll():
            outcome: LoadOutcome = completion.value
            if self._inflight.get(outcome.req_id) is completion.tag:
                del self._inflight[outcome.req_id]
            out.append(outcome)
        return out

    def cancel_all(self) -> None:
        for req_id in list(self._inflight):
            self.cancel(req_id)

    # ------------------------------------------------------------------ runtime side

    def _finish(self, ticket: _Ticket, outcome: LoadOutcome) -> None:
        outcome.seconds = time.perf_counter() - ticket.started
        self.ring.push(Completion("load", ticket, outcome, outcome.why))
        ticket.ended.set()
        self.ended.set()

    def _ended_without_copy(self, ticket: _Ticket, future) -> None:
        """The job ended (failed, timed out, cancelled) before any copy started: report it now."""
        # An unreachable server is UNAVAILABLE: not a miss, not a corrupt page (classify decides, once).
        why = ticket.stop_reason if future.cancelled() else classify(future.exception() or RuntimeError())
        outcome = LoadOutcome(ticket.load.req_id, list(ticket.load.block_ids), why=why)
        with ticket.lock:
            if ticket.state != _WAITING:
                return  # the copy ran, or runs: it reports
            ticket.state = _DONE
            if ticket.writing:  # cancelled mid-receive: a receive may still land in the blocks
                ticket.deferred = outcome
                return
        self._finish(ticket, outcome)

    def _copy(self, ticket: _Ticket, values: list) -> LoadOutcome | None:
        """On a worker thread: check the fetched pages and copy the valid leading ones into the blocks."""
        with ticket.lock:
            if ticket.state != _WAITING:
                return None  # cancelled while fetching: the blocks may belong to someone else now
            ticket.state = _COPYING
        load = ticket.load
        outcome = LoadOutcome(load.req_id, list(load.block_ids))
        try:
            self._check_and_copy(ticket, values, outcome)
        except Exception:  # a bug or a device error: nothing after `loaded` is trusted
            log.exception("Membrain: copying the pages of request %s failed", load.req_id)
            if outcome.why is Outcome.OK:
                outcome.why = Outcome.ERROR
        finally:
            with ticket.lock:
                ticket.state = _DONE
            self._finish(ticket, outcome)
        return outcome

    def _check_and_copy(self, ticket: _Ticket, values: list, outcome: LoadOutcome) -> None:
        load = ticket.load
        good_ids: dict[int, list[int]] = {}  # unit -> its leading good blocks, in slot order
        good = good_bytes = 0
        for i, (block_id, block_hash, value) in enumerate(zip(load.block_ids, load.hashes, values)):
            if value is None:
                outcome.why = Outcome.MISSING
                outcome.missing_hash = block_hash
                break
            unit = load.unit(i)
            try:
                check_block(self.movers[unit].layout, value, self.key_of(block_hash, unit))
            except codec.PayloadError as exc:
                log.warning("Membrain: block %s of request %s failed its check (%s); recomputing", i, load.req_id, exc)
                outcome.why = Outcome.CORRUPT
                outcome.corrupt_keys = self._corrupt_keys(load, values, i)
                break
            good_ids.setdefault(unit, []).append(block_id)
            good += 1
            good_bytes += len(value)
        if good < len(load.block_ids) and outcome.why is Outcome.OK:
            outcome.why = Outcome.MISSING  # fewer values than blocks
            outcome.missing_hash = load.hashes[good]
        for unit, ids in good_ids.items():  # the good blocks lead each unit's slots: one copy per layer
            if unit in ticket.hosts:  # direct units' pages are in their blocks already
                self.movers[unit].load(ids, ticket.hosts[unit])
        # Only now: a copy that raised leaves `loaded` at 0, and every block is reported failed.
        outcome.loaded, outcome.loaded_bytes = good, good_bytes

    def _corrupt_keys(self, load: BlockTransfer, values: list, first_bad: int) -> list[str]:
        """Every corrupt block of this load (checked now, on the failure path only), so saves repair them."""
        bad = []
        for i in range(first_bad, min(len(load.hashes), len(values))):
            value = values[i]
            if value is None:
                continue
            key = self.key_of(load.hashes[i], load.unit(i))
            try:
                check_block(self.movers[load.unit(i)].layout, value, key)
            except codec.PayloadError:
                bad.append(key)
        return bad
