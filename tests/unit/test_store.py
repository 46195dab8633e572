import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membrain_async.server.store import Store

SCALE = float(os.environ.get("MEMBRAIN_FUZZ_SCALE", "1"))


def test_lru_eviction_keeps_within_capacity():
    s = Store(100)
    for i in range(5):
        s.put("ns", f"k{i}", bytes(30))
    assert s.used <= 100 and len(s) == 3
    assert s.get("ns", "k0") is None and s.get("ns", "k4") is not None
    assert s.namespaces["ns"].evictions == 2


def test_get_refreshes_recency():
    s = Store(96)  # three 32-byte slots (30-byte values round up to 8 bytes)
    for k in "abc":
        s.put("ns", k, bytes(30))
    s.get("ns", "a")
    s.put("ns", "d", bytes(30))
    assert s.contains("ns", "a") and not s.contains("ns", "b")


def test_overwrite_replaces_and_counts_once():
    s = Store(100)
    assert s.put("ns", "k", b"old") is True
    assert s.put("ns", "k", b"newer") is False
    assert bytes(s.get("ns", "k")) == b"newer"
    assert s.used == 5 and s.namespaces["ns"].keys == 1


def test_too_big_value_rejected():
    s = Store(10)
    assert s.put("ns", "k", bytes(11)) is None and s.totals.rejected == 1


def test_prefix_count_stops_at_first_missing():
    s = Store(1000)
    for k in ("a", "b", "d"):
        s.put("ns", k, b"x")
    assert s.prefix_count("ns", ["a", "b", "c", "d"]) == 2
    assert s.prefix_count("other", ["a"]) == 0


def test_namespaces_are_separate():
    s = Store(1000)
    s.put("a", "k", b"1")
    assert s.get("b", "k") is None
    assert s.stats({"b"})["namespaces"].keys() == {"b"}


def test_value_being_read_is_never_overwritten_under_the_reader():
    s = Store(64)  # room for exactly one 60-byte value (a 64-byte slot)
    s.put("ns", "k", b"A" * 60)
    entry = s.entry("ns", "k")
    s.pin(entry)  # a reader sends straight from the slot
    assert s.put("ns", "k2", b"B" * 60) is None  # evicts k, but its slot is pinned: no room, nothing overwritten
    assert bytes(entry.view) == b"A" * 60 and not s.contains("ns", "k") and s.totals.no_room == 1
    s.unpin(entry)  # the send ended: the slot is free again
    assert s.put("ns", "k2", b"B" * 60) is True and bytes(s.get("ns", "k2")) == b"B" * 60


def test_puts_reuse_slots_without_new_slabs():
    s = Store(1 << 20)
    for i in range(100):
        assert s.put("ns", f"k{i}", bytes(64 << 10)) is not None
    assert s.arena.slabs_created == 1 and s.arena.mapped <= s.capacity and len(s) == 16


def test_an_empty_slab_moves_to_the_size_now_stored():
    s = Store(1 << 20)
    for i in range(16):
        s.put("ns", f"small{i}", bytes(64 << 10))
    for i in range(4):  # a new size: the old values go, and their slab is re-carved, not mapped again
        assert s.put("ns", f"big{i}", bytes(256 << 10)) is not None
    assert s.arena.slabs_created == 1 and s.arena.slabs_moved == 1
    assert s.arena.mapped <= s.capacity and len(s) == 4


def test_a_value_of_another_class_still_finds_room():
    s = Store(1 << 20)
    for i in range(16):
        s.put("ns", f"small{i}", bytes(64 << 10))
    s.put("ns", "odd", bytes(100))  # another class while the arena is all mapped
    assert bytes(s.get("ns", "odd")) == bytes(100) and s.arena.mapped <= s.capacity


def test_an_odd_sized_value_costs_one_slab_not_the_whole_store():
    s = Store(8 << 20)  # two 4 MiB slabs of 64 KiB values
    for i in range(128):
        s.put("ns", f"small{i}", bytes(64 << 10))
    s.put("ns", "odd", bytes(100))
    assert len(s) == 64 + 1 and s.contains("ns", "small127") and s.arena.mapped <= s.capacity


_SIZES = [0, 5, 100, 4000, 5000, 64 << 10, 300 << 10]


@settings(max_examples=int(150 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["put", "get", "pin", "unpin", "delete"]), st.integers(0, 11),
                          st.sampled_from(_SIZES)), max_size=120))
def test_arena_model_pinned_values_never_change_and_gets_see_the_last_put(ops):
    s = Store(1 << 20)
    model: dict[str, bytes] = {}
    pinned: list[tuple] = []  # (entry, bytes it held when pinned)
    n = 0
    for op, k, size in ops:
        key = f"k{k}"
        if op == "put":
            n += 1
            value = (n.to_bytes(4, "little") * (size // 4 + 1))[:size]
            result = s.put("ns", key, value)
            if result is None:  # no room: every slot pinned. The old value stays unless it was evicted meanwhile
                if not s.contains("ns", key):
                    model.pop(key, None)
            else:
                model[key] = value
        elif op == "get":
            got = s.get("ns", key)
            assert got is None or bytes(got) == model.get(key)
        elif op == "pin":
            entry = s.entry("ns", key)
            if entry is not None:
                s.pin(entry)
                pinned.append((entry, bytes(entry.view)))
        elif op == "unpin" and pinned:
            entry, _ = pinned.pop(0)
            s.unpin(entry)
        elif op == "delete":
            s.delete("ns", key)
            model.pop(key, None)
        for entry, held in pinned:
            assert bytes(entry.view) == held  # a send in flight sees exactly what it started with
        assert s.arena.mapped <= s.capacity and s.used <= s.capacity
        for key in list(model):
            if not s.contains("ns", key):
                del model[key]  # evicted
    for entry, _ in pinned:
        s.unpin(entry)
    assert all(bytes(s.get("ns", k)) == v for k, v in model.items())


def test_a_slab_too_small_for_a_new_size_is_unmapped_and_its_room_reused():
    s = Store(8 << 20)
    for i in range(128):
        s.put("ns", f"small{i}", bytes(64 << 10))  # two 4 MiB slabs
    assert s.put("ns", "big", bytes(6 << 20)) is not None  # needs a 6 MiB slab: both small slabs go
    assert s.arena.mapped <= s.capacity and bytes(s.get("ns", "big")) == bytes(6 << 20)
