"""The scheduler half's save policy: what to save once per instance, and when a staged save may be uploaded.

Pure bookkeeping (no vLLM, no I/O), so the rules are unit-tested without an engine.

Two rules live here:

- **Once per instance.** A block hash planned for saving is remembered with a sequence number. Another
  request that meets the same hash later skips it, even if its own lookup said "missing": that lookup was
  answered before our save landed. Only a lookup sent *after* our save was planned, and still saying
  "missing", proves the copy is gone (server restarted, evicted, upload failed) and earns a re-save.
- **Nothing computed over an unfilled block is uploaded.** Workers stage a step's saves and upload them
  only once the scheduler has seen that step's invalid block ids from every rank. A request whose block
  table (up to its last saved block) holds an invalid block computed its saved KV over unfilled pages, on
  some rank: its staged saves are discarded and planned again after vLLM recomputes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..shared.metadata import SaveVerdict

# Steps a staged save may wait for its verdict; past that the scheduler stops tracking it (the workers
# drop the copies on their side, see worker.STAGED_STEPS_MAX): a lost save is a future miss, nothing worse.
AWAIT_STEPS_MAX = 8


@dataclass
class PlannedSave:
    step: int
    req_id: str
    first_block: int  # index in the request's block table of the first planned block
    hashes: list[str]
    reads: frozenset[int]  # block ids whose KV the saved blocks were computed over (table[:last + 1])
    stamp: int = 0  # the clock when planned: a lookup stamped later than this was sent after the plan


class SaveLedger:
    def __init__(self, recent_limit: int = 1 << 16):
        self._recent: OrderedDict[str, int] = OrderedDict()  # hash -> sequence number when planned
        self._recent_limit = recent_limit
        self._seq = 0
        self._awaiting: dict[int, list[PlannedSave]] = {}  # step -> saves staged by workers in that step
        self._verdicts: list[SaveVerdict] = []

    def now(self) -> int:
        """A sequence number to stamp a lookup with when it is sent."""
        return self._seq

    def wanted(self, block_hash: str, lookup_seq: int | None) -> bool:
        """Should this block be saved?

        `lookup_seq` is the stamp of a lookup that covered this block and said it is missing; None if no
        lookup covered it.
        """
        seq = self._recent.get(block_hash)
        if seq is None:
            return True
        if lookup_seq is not None and seq < lookup_seq:
            return True  # saved before a lookup that now says missing: the copy is gone
        self._recent.move_to_end(block_hash)
        return False

    def plan(self, step: int, req_id: str, first_block: int, hashes: list[str], table: list[int]) -> PlannedSave:
        """Record saves workers will stage in `step`; `table` is the request's block ids (group 0)."""
        stamp, self._seq = self._seq, self._seq + 1  # a lookup stamped later than this save sees a higher clock
        for h in hashes:
            self._recent[h] = stamp
            self._recent.move_to_end(h)
        while len(self._recent) > self._recent_limit:
            self._recent.popitem(last=False)
        last = first_block + len(hashes)
        planned = PlannedSave(step, req_id, first_block, list(hashes), frozenset(table[:last]), stamp)
        self._awaiting.setdefault(step, []).append(planned)
        self._expire(step)
        return planned

    def _expire(self, step: int) -> None:
        for stale in [s for s in self._awaiting if s < step - AWAIT_STEPS_MAX]:
            for p in self._awaiting.pop(stale):
                self.forget(p.hashes)  # never confirmed: let a later request save these blocks

    def settle(self, step: int, invalid_block_ids: set[int]) -> list[PlannedSave]:
        """Step `step`'s output arrived (every rank's invalid blocks): queue its verdict, return the discards.

        Callers re-plan the discarded saves (their hashes are forgotten here) once vLLM has recomputed.
        """
        planned = self._awaiting.pop(step, [])
        self._expire(step)
        if not planned:
            return []
        discarded = [p for p in planned if invalid_block_ids and not p.reads.isdisjoint(invalid_block_ids)]
        for p in discarded:
            self.forget(p.hashes)
        self._verdicts.append(SaveVerdict(step, sorted({p.req_id for p in discarded})))
        return discarded

    def take_verdicts(self) -> list[SaveVerdict]:
        verdicts, self._verdicts = self._verdicts, []
        return verdicts

    def verdicts_pending(self) -> bool:
        """Verdicts not yet sent: an idle engine must step once more to deliver them.

        Steps still awaiting their output need nothing: the engine processes every step it scheduled.
        """
        return bool(self._verdicts)

    def awaiting_steps(self) -> list[int]:
        return sorted(self._awaiting)

    def forget(self, hashes) -> None:
        for h in hashes:
            self._recent.pop(h, None)

    def clear(self) -> None:
        self._recent.clear()
