"""The in-memory store of the scheduler policy tests answers as the real one does.

Every scenario runs twice: over `testing.fake_store.FakeSchedulerStore`, and over a real `BlockStore` and
server on loopback (or a port nothing listens on). What the scheduler half reads of an answer (the
future, the ring's completion: kind, tag, outcome, value) must be the same, so the policy tests that run
over the fake say what production does.
"""

from __future__ import annotations

import socket

import pytest

from membrain_async.cache import BlockStore
from membrain_async.cache.prefix_query import PrefixQuery, Series
from membrain_async.client.errors import MembrainUnavailable
from membrain_async.config import ConnectorConfig
from membrain_async.runtime import CompletionRing
from membrain_async.testing.fake_store import FakeSchedulerStore
from membrain_async.vllm.scheduler.store import SchedulerStore

BS = 32


class Real:
    def __init__(self, url: str, **overrides):
        self.store = BlockStore(ConnectorConfig.from_sources(env={}, overrides={"endpoint": url, **overrides}))

    def put(self, keys):
        for key in keys:
            assert self.store.save(key, [b"page"])
        assert self.store.flush(10)

    def answers(self, ring: CompletionRing, n: int, outcome: str = "ok"):
        got = []
        while len(got) < n and ring.wait(20):
            got += ring.poll()
        return got

    def close(self):
        self.store.close(drain=0)


class Fake:
    def __init__(self):
        self.store = FakeSchedulerStore()

    def put(self, keys):
        self.store.put(keys)

    def answers(self, ring: CompletionRing, n: int, outcome: str = "ok"):
        assert not len(ring)  # nothing lands before the test answers
        self.store.answer(outcome=outcome)
        return ring.poll()

    def close(self):
        pass


@pytest.fixture(params=["fake", "real"])
def either(request):
    if request.param == "fake":
        s = Fake()
    else:
        s = Real(request.getfixturevalue("server").url)
    yield s
    s.close()


@pytest.fixture(params=["fake", "real"])
def unreachable(request):
    """A store whose server cannot be reached."""
    if request.param == "fake":
        yield Fake()
        return
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = Real(f"http://127.0.0.1:{port}", timeout=1.0, lookup_deadline=10.0)
    yield s
    s.close()


def test_both_stores_are_scheduler_stores():
    assert isinstance(FakeSchedulerStore(), SchedulerStore)
    real = BlockStore(ConnectorConfig.from_sources(env={}, overrides={}))
    assert isinstance(real, SchedulerStore)
    real.close(drain=0)


def test_a_lookup_counts_the_leading_stored_keys(either):
    either.put(["a", "b", "d"])
    ring = CompletionRing()
    fut = either.store.lookup(["a", "b", "c", "d"], tag=("r1",), ring=ring)
    (done,) = either.answers(ring, 1)
    assert (done.kind, done.tag, done.outcome, done.value) == ("lookup", ("r1",), "ok", 2)
    assert fut.result() == 2


def test_lookups_sent_together_get_one_count_each_in_one_completion(either):
    either.put(["a", "b"])
    ring = CompletionRing()
    fut = either.store.lookup_many([["a", "b", "c"], ["b"], ["c", "a"], []], tag=("x", "y", "z", "w"), ring=ring)
    (done,) = either.answers(ring, 1)
    assert (done.kind, done.tag, done.outcome, done.value) == ("lookup", ("x", "y", "z", "w"), "ok", [2, 1, 0, 0])
    assert fut.result() == [2, 1, 0, 0]


def test_a_prefix_query_is_answered_with_the_hit_every_unit_allows(either):
    full = tuple(f"f{b}" for b in range(4))
    window = tuple(f"s{b}" for b in range(4))
    query = PrefixQuery((Series(full), Series(window, 63)), BS)
    either.put([*full, "s2", "s3"])  # a 4-block hit needs the window's blocks 2 and 3 only
    ring = CompletionRing()
    single = either.store.lookup(query, tag=("r1",), ring=ring)
    many = either.store.lookup_many([query, list(full[:2]) + ["s0"]], tag=("r2", "r3"), ring=ring)
    got = {c.tag: c.value for c in either.answers(ring, 2)}
    assert got == {("r1",): 4, ("r2", "r3"): [4, 2]}
    assert (single.result(), many.result()) == (4, [4, 2])


def test_an_unreachable_server_is_unavailable_for_single_and_joint_lookups(unreachable):
    ring = CompletionRing()
    single = unreachable.store.lookup(["a", "b"], tag=("r1",), ring=ring)
    many = unreachable.store.lookup_many([["a"], ["b", "c"]], tag=("r2", "r3"), ring=ring)
    got = {c.tag: c for c in unreachable.answers(ring, 2, outcome="unavailable")}
    assert {tag: c.outcome for tag, c in got.items()} == {("r1",): "unavailable", ("r2", "r3"): "unavailable"}
    for fut, tag in ((single, ("r1",)), (many, ("r2", "r3"))):
        # Not "nothing stored": the exception says why, and result_or is how a caller serves it as a miss.
        assert isinstance(fut.exception(), MembrainUnavailable) and fut.result_or(0) == 0
        assert got[tag].value is fut.exception()
