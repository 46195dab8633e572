"""What the scheduler half asks of the block store: prefix lookups, and nothing else.

`MembrainScheduler` is handed a `SchedulerStore`; the connector hands it the process's `BlockStore`
(`cache.open_store`, see `MembrainScheduler.from_vllm_config`), tests an in-memory one
(`membrain_async.testing.fake_store`). Saves, loads and prefetches are the workers' (they reach them
through the step's metadata); the scheduler half only asks how much of a prompt is stored.

The contract, as `cache.store.BlockStore` keeps it:

- both calls return at once, and may be called from the engine core's input thread (a lookup sent on
  arrival, arrival.py) as well as from the scheduler's;
- the job's end lands in `ring` as one `Completion("lookup", tag, value, outcome, latency_s)`, after the
  returned future is set;
- outcome "ok": `value` is how many leading blocks are stored (`lookup`: an int; `lookup_many`: a list,
  one per query). A `PrefixQuery` (several KV units) is answered with its hit: the most leading blocks
  every unit allows (`cache.prefix_query.hit_blocks`);
- outcome "unavailable": the server could not be reached (not proof that anything is missing); "timeout":
  the store's lookup deadline passed; "error": anything else. `value` is then the exception, and every
  request of a `lookup_many` job gets the same outcome.

Who opens a store closes it: the scheduler half never does (see `MembrainScheduler`'s `release`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence, Union, runtime_checkable

if TYPE_CHECKING:
    from ...cache.prefix_query import PrefixQuery
    from ...runtime.future import MembrainFuture
    from ...runtime.ring import CompletionRing

# The keys of one unit's blocks from the first (a plain model), or every unit's with what a hit needs.
LookupQuery = Union[Sequence[str], "PrefixQuery"]


@runtime_checkable
class SchedulerStore(Protocol):
    def lookup(self, keys: LookupQuery, *, tag: Any = None, ring: "CompletionRing | None" = None) -> "MembrainFuture":
        """How many leading blocks of one query are stored. Result: int."""
        ...

    def lookup_many(
        self, key_lists: Sequence[LookupQuery], *, tag: Any = None, ring: "CompletionRing | None" = None
    ) -> "MembrainFuture":
        """Several queries in one job, answered together. Result: list[int], one per query."""
        ...
