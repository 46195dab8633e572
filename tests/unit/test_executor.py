"""The executor alone: jobs, deadlines, cancellation, the completion ring and shutdown, with no cache
layer and no network (what the BlockStore builds on)."""

import threading

import anyio
import pytest

from membrain_async.runtime import Cancelled, CompletionRing, Executor


@pytest.fixture(params=["asyncio", "trio"])
def executor(request):
    ex = Executor(backend=request.param, default_deadline=10.0)
    yield ex
    ex.shutdown(drain=1)


def wait_ring(ring, n):
    got = []
    for _ in range(2000):  # bounded; nothing here measures time
        got += ring.poll()
        if len(got) >= n:
            break
        threading.Event().wait(0.005)
    return got


def test_a_job_runs_on_the_loop_thread_and_lands_in_the_ring(executor):
    ring = CompletionRing()

    async def job():
        await anyio.sleep(0)
        return threading.current_thread().name

    future = executor.submit("probe", job, tag="t", ring=ring)
    (c,) = wait_ring(ring, 1)
    assert (c.kind, c.tag, c.value, c.outcome) == ("probe", "t", "membrain-runtime", "ok")
    assert future.result() == "membrain-runtime" and executor.stats.jobs_ok == 1


def test_deadline_error_and_cancel_outcomes(executor):
    ring = CompletionRing()

    async def forever():
        await anyio.sleep(3600)

    async def broken():
        raise ValueError("bug")

    timed = executor.submit("slow", forever, deadline=0.1, ring=ring)
    failed = executor.submit("broken", broken, ring=ring)
    cancelled = executor.submit("held", forever, tag="req", ring=ring)
    executor.cancel_tag("req")
    outcomes = {c.kind: c.outcome for c in wait_ring(ring, 3)}
    assert outcomes == {"slow": "timeout", "broken": "error", "held": "cancelled"}
    assert isinstance(timed.exception(), TimeoutError) and isinstance(failed.exception(), ValueError)
    with pytest.raises(Cancelled):
        cancelled.result()


def test_a_job_cancelled_while_queued_never_runs(executor):
    """cancel() marks the future before it tells the runtime: a job the loop starts in between sees the mark.
    The loop is held while the job is queued, and released from inside the cancel, after the runtime was
    told and before the caller returns: the worst moment for the order to be the other way round."""
    gate, ran = threading.Event(), threading.Event()
    executor.call_soon(lambda: gate.wait(10))  # the loop thread waits here: the job below stays queued

    async def job():
        ran.set()

    future = executor.submit("held", job)
    tell_runtime = future._cancel_hook

    def tell_then_let_the_loop_run():
        tell_runtime()
        gate.set()
        ran.wait(0.5)  # long enough for the loop to start the job, had it not been marked cancelled

    future._cancel_hook = tell_then_let_the_loop_run
    assert future.cancel()
    assert executor.submit("after", lambda: anyio.sleep(0)).wait(10)
    assert future.cancelled() and not ran.is_set()


def test_calls_run_in_order_with_submissions_and_after_a_cancel(executor):
    seen = []
    executor.call_soon(lambda: seen.append("first"))
    executor.cancel_tag("req", then=lambda: seen.append("after cancel"))
    future = executor.submit("probe", lambda: anyio.sleep(0))
    assert future.wait(10)
    assert seen == ["first", "after cancel"]


class Resident:
    def __init__(self):
        self.events = []
        self.release = threading.Event()

    async def start(self, task_group):
        self.events.append("start")

    async def drain(self):
        self.events.append("drain")
        while not self.release.is_set():
            await anyio.sleep(0.01)
        self.events.append("drained")

    async def close(self):
        self.events.append("close")

    def abandon(self):
        self.events.append("abandon")


@pytest.mark.parametrize("drained", [True, False])
def test_shutdown_gives_the_resident_its_drain_deadline_then_closes(drained):
    resident = Resident()
    ex = Executor(resident=resident)
    ex.start()
    if drained:
        resident.release.set()
    ex.shutdown(drain=0.2)
    assert not ex.running
    expected = ["start", "drain", "drained", "close", "abandon"] if drained else ["start", "drain", "close", "abandon"]
    assert resident.events == expected
    late = ex.submit("late", lambda: anyio.sleep(0))
    assert isinstance(late.exception(), Cancelled)


def test_an_unhashable_tag_is_refused_at_submit_not_on_the_loop(executor):
    with pytest.raises(TypeError):
        executor.submit("probe", lambda: anyio.sleep(0), tag=["not", "hashable"])
    assert executor.submit("probe", lambda: anyio.sleep(0), tag=("fine",)).wait(10) and executor.running


def test_jobs_submitted_together_start_in_one_dispatch_however_far_apart_they_were_submitted(executor):
    """A step's loads of one prefix share its fetch only if the loop starts them before the first one ends:
    inside `together()` nothing reaches the loop until the block ends."""
    order = []

    def job(name):
        async def run():
            order.append(f"{name} starts")
            await anyio.lowlevel.checkpoint()  # the other job runs here, if it was started with this one
            order.append(f"{name} ends")
        return run

    executor.start()
    with executor.together():
        first = executor.submit("probe", job("a"))
        threading.Event().wait(0.2)  # a loop that had it would have run "a" to its end by now
        assert not first.done()
        second = executor.submit("probe", job("b"))
    assert first.wait(10) and second.wait(10)
    assert sorted(order[:2]) == ["a starts", "b starts"]  # both started before either ended (trio may
    assert sorted(order[2:]) == ["a ends", "b ends"]  # run them in either order)
    third = executor.submit("probe", job("c"))  # outside the block: sent as before
    assert third.wait(10) and order[-2:] == ["c starts", "c ends"]
