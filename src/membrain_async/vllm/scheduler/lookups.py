"""The scheduler half's lookups: when each is sent, and how its answer reaches its request.

Two ways out:
- on arrival, from the engine core's input thread while a step runs (arrival.py): answered, at loopback
  latency, before the request's first scheduling pass;
- queued, then sent at the next pass with every request queued meanwhile, as one job (the in-process engine
  core, whose requests arrive right before the pass that schedules them): requests sharing a prefix get
  their answers in the same step, so one is scheduled beside the other and takes its blocks from vLLM's
  prefix cache instead of loading them again a step later.

Answers come back through a completion ring tagged with the request ids they answer, and are drained once
per scheduling pass, so every request of a pass sees the same answers. Nothing here waits on the network,
except an idle pass (nothing else to run) resting up to IDLE_WAIT_S for an answer instead of spinning.
The arrivals table is the only state two threads share; its lock is never held across I/O.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ...cache.outcome import Outcome
from ...runtime import CompletionRing
from .blockhash import BlockHashes

if TYPE_CHECKING:
    from .store import LookupQuery, SchedulerStore

# A pass with nothing scheduled while lookups are pending rests this long at most (until an answer lands):
# vLLM steps such an engine in a tight loop that holds the GIL the Membrain thread needs to read the answer.
# Nothing waits on an idle step, so the rest costs nothing.
IDLE_WAIT_S = 0.002
# Lookups sent on arrival for requests vLLM then refused (never added) are forgotten past this many.
MAX_ARRIVALS = 4096


@dataclass
class Arrival:
    """A lookup sent from the input thread before vLLM added its request."""

    chain: BlockHashes
    lookup_blocks: int
    started: float
    seq: int
    answer: tuple[Outcome, Any] | None = None  # (outcome, count), if it landed before the request was added


# deliver(request id, outcome, leading blocks found or None) -> False if the request is not known (yet).
Deliver = Callable[[str, str, "int | None"], bool]


class Lookups:
    def __init__(self, store: "SchedulerStore", count: Callable[[str, float], None],
                 observe: Callable[[str, float], None], clock: Callable[[], float] = time.monotonic):
        self.store = store
        self._count = count
        self._observe = observe
        self._clock = clock
        self.answers = CompletionRing()  # drained by the scheduler thread, once per pass
        self._queued: "list[tuple[str, LookupQuery]]" = []
        self._drained = False  # in this pass
        self._pass_waits = 0  # requests of this pass that sat out for their answer
        self._arrivals: dict[str, Arrival] = {}
        self._arrivals_lock = threading.Lock()

    # ---- on arrival (engine core input thread)

    def send_on_arrival(self, req_id: str, keys: "LookupQuery", chain: BlockHashes, seq: int) -> None:
        arrival = Arrival(chain, len(keys), self._clock(), seq)
        with self._arrivals_lock:
            self._arrivals[req_id] = arrival
        self.store.lookup(keys, tag=(req_id,), ring=self.answers)

    def take_arrival(self, req_id: str) -> Arrival | None:
        """vLLM added the request: its arrival's lookup (and answer, if in), handed over once."""
        with self._arrivals_lock:
            arrival = self._arrivals.pop(req_id, None)
            if len(self._arrivals) > MAX_ARRIVALS:
                for stale in list(self._arrivals)[: MAX_ARRIVALS // 2]:
                    del self._arrivals[stale]
        return arrival

    # ---- queued (scheduler thread)

    def queue(self, req_id: str, keys: "LookupQuery") -> None:
        self._queued.append((req_id, keys))

    def send_queued(self, still_wanted: Callable[[str], bool]) -> None:
        """One job for every request queued since the last pass (those still waiting)."""
        if not self._queued:  # asked at every question of every pass: nothing to build then
            return
        pending = [(rid, keys) for rid, keys in self._queued if still_wanted(rid)]
        self._queued = []
        if not pending:
            return
        tag = tuple(rid for rid, _ in pending)
        if len(pending) == 1:
            self.store.lookup(pending[0][1], tag=tag, ring=self.answers)
        else:
            self.store.lookup_many([keys for _, keys in pending], tag=tag, ring=self.answers)

    # ---- answers (scheduler thread)

    def drain_once(self, deliver: Deliver) -> None:
        """The answers landed so far, at the pass's first question; later questions of the pass see the same."""
        if self._drained:
            return
        self._drained = True
        for done in self.answers.poll():
            outcome = Outcome(done.outcome)
            counts = done.value if outcome is Outcome.OK else None
            self._observe("lookup_rtt_seconds", done.latency_s)  # the round trip alone, not the steps waited
            self._count("lookup_jobs", 1)
            for i, req_id in enumerate(done.tag):
                count = None if counts is None else counts if isinstance(counts, int) else counts[i]
                if deliver(req_id, outcome, count):
                    continue
                with self._arrivals_lock:  # sent on arrival, not added yet (or finished meanwhile)
                    arrival = self._arrivals.get(req_id)
                    if arrival is not None:
                        arrival.answer = (outcome, count)

    def waited(self) -> None:
        """A request of this pass sits out for its answer."""
        self._count("lookup_waits", 1)
        self._pass_waits += 1

    def end_pass(self, idle: bool) -> None:
        if idle and self._pass_waits:
            self.answers.wait(IDLE_WAIT_S)
        self._drained = False
        self._pass_waits = 0
