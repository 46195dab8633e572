from membrain_async.server.buffers import BufferPool
from membrain_async.server.store import Store


def test_lru_eviction_keeps_within_capacity():
    s = Store(100)
    for i in range(5):
        s.put("ns", f"k{i}", bytes(30))
    assert s.used <= 100 and len(s) == 3
    assert s.get("ns", "k0") is None and s.get("ns", "k4") is not None
    assert s.namespaces["ns"].evictions == 2


def test_get_refreshes_recency():
    s = Store(90)
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


def test_value_being_read_is_never_recycled_under_the_reader():
    pool = BufferPool(1 << 20)
    s = Store(100, recycle=pool.release)
    first = pool.acquire(60)
    first[:] = b"A" * 60
    s.put("ns", "k", first)
    del first
    reader = memoryview(s.get("ns", "k"))  # a reader holds a view while it sends
    s.put("ns", "k2", bytearray(60))  # evicts k into the pool
    fresh = pool.acquire(60)  # must not hand out the buffer the reader still sees
    fresh[:] = b"B" * 60
    assert bytes(reader) == b"A" * 60
    # Once nobody holds it, the buffer is reused.
    reader.release()
    s.delete("ns", "k2")
    pool.release(fresh)
    before = pool.reused
    pool.acquire(60)
    assert pool.reused == before + 1


def test_pool_respects_its_limit():
    pool = BufferPool(100)
    pool.release(bytearray(80))
    pool.release(bytearray(80))
    assert pool.free_bytes == 80


def test_buffers_of_a_size_no_longer_used_give_way_to_the_size_in_use():
    pool = BufferPool(1 << 20)
    for _ in range(16):
        pool.release(bytearray(64 << 10))  # the pool is full of an old size
    big = bytearray(512 << 10)
    big_id = id(big)
    pool.release(big)
    del big  # nobody else holds it, so the pool may hand it out again
    assert pool.free_bytes <= 1 << 20
    assert id(pool.acquire(512 << 10)) == big_id  # kept, and reused rather than faulting in fresh memory
    pool.acquire(64 << 10)
    assert pool.reused == 2 and pool.allocated == 0
