"""The start-up line's account of memory beyond --capacity is an upper bound: bookkeeping per stored value,
measured with tracemalloc (the arena's values are mmap'd, outside it), stays under what the line states."""

import gc
import tracemalloc

import pytest

from membrain_async.server.store import Store, bookkeeping_per_value, memory_line

VALUES = 3072  # whole 4 MiB slabs of 4 KiB values: the arena maps whole slabs only
SIZE = 4096


@pytest.mark.parametrize("policy", ["lru", "second-sight", "adaptive"])
def test_bookkeeping_per_value_is_within_the_stated_bound(policy):
    value = bytes(SIZE)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = Store(VALUES * SIZE, policy=policy)
        # Churn through 4x the capacity, every key put twice (past any filter), so that the index and the
        # admission filter's generations are at their steady size; 64-character keys, as block hashes are.
        for i in range(4 * VALUES):
            key = f"{i:064x}"
            store.put("tenant", key, value)
            store.put("tenant", key, value)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(store) >= VALUES - 1  # a replacement takes its new slot before the old one is freed
    assert used / len(store) <= bookkeeping_per_value(policy)


def test_memory_line_states_the_total_at_capacity():
    line = memory_line(1 << 30, "lru")
    assert "950 bytes per stored value" in line and "262144 of them" in line
