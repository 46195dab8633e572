"""A prefix lookup over several key series that must all be present: hybrid KV caches.

A model with one KV unit asks "how many leading keys are stored" (one series). A hybrid model (full
attention and sliding-window layers, see vllm/shared/units.py) stores each block once per unit, and a hit at
block P needs, for each unit:
- full attention: every block before P;
- a sliding window keeping `window_tokens` tokens: only the blocks from (P * block_size - window_tokens)
  // block_size up to P. The blocks below are never read again, vLLM does not even allocate them.

The hit is the largest P every unit allows: a partial hit (one unit's block missing) is never counted,
so it can never yield wrong tokens. Pure: the store asks the server which keys exist (one round trip),
then `hit_blocks` decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Series:
    keys: tuple[str, ...]  # one per block, from the first
    window_tokens: int | None = None  # None: every earlier block is needed


@dataclass(frozen=True)
class PrefixQuery:
    series: tuple[Series, ...]
    block_size: int

    def __len__(self) -> int:
        """Blocks asked about (every series has one key per block)."""
        return min((len(s.keys) for s in self.series), default=0)

    def all_keys(self) -> list[str]:
        return [k for s in self.series for k in s.keys]


def first_needed(series: Series, hit: int, block_size: int) -> int:
    """The first block a hit of `hit` blocks needs from this series."""
    if series.window_tokens is None:
        return 0
    return max(0, hit * block_size - series.window_tokens) // block_size


def hit_blocks(query: PrefixQuery, present: Sequence[bool]) -> int:
    """The largest hit every series allows; `present` answers `query.all_keys()` in order."""
    n = len(query)
    answers, at = [], 0
    for s in query.series:
        answers.append(present[at : at + len(s.keys)])
        at += len(s.keys)
    # Full series bound the hit by their leading run; windowed ones are checked per candidate.
    limit = n
    for s, got in zip(query.series, answers):
        if s.window_tokens is None:
            lead = 0
            while lead < limit and got[lead]:
                lead += 1
            limit = lead
    for hit in range(limit, 0, -1):
        if all(all(got[first_needed(s, hit, query.block_size) : hit])
               for s, got in zip(query.series, answers) if s.window_tokens is not None):
            return hit
    return 0
