"""Membrain's threads run on the process's CPUs, not on the one core vLLM pinned the thread that started them."""

from __future__ import annotations

import os
import threading

import anyio
import pytest

from membrain_async import thread_cpus
from membrain_async.runtime import Executor
from membrain_async.thread_cpus import widened

linux_smp = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                               reason="needs per-thread affinity and two CPUs")


def test_a_pinned_thread_widens_to_the_process_cpus_and_never_narrows_or_guesses():
    process = frozenset({0, 1, 2, 3})
    assert widened({2}, process) == process  # vLLM pinned the creating thread to core 2
    assert widened({0, 1, 2, 3}, process) is None  # nothing pinned: nothing to do
    assert widened({0, 1, 2, 3}, frozenset({1})) is None  # never narrower than it is
    assert widened({2}, None) is None  # the process never noted its CPUs (embedded): left as it is


def affinities_from_a_runtime_started_on(cpu: int) -> tuple[set[int], set[int]]:
    """Start an executor from a thread pinned to `cpu`, as vLLM's worker main thread is; return the runtime
    thread's CPUs and those of a thread it starts (where loads are checked and copied)."""
    out: dict[str, tuple] = {}

    def pinned_caller() -> None:
        os.sched_setaffinity(0, {cpu})
        ex = Executor(default_deadline=10.0)
        try:
            async def probe():
                return os.sched_getaffinity(0), await anyio.to_thread.run_sync(os.sched_getaffinity, 0)

            fut = ex.submit("probe", probe)
            assert fut.wait(10)
            out["cpus"] = fut.result()
        finally:
            ex.shutdown(drain=1)

    t = threading.Thread(target=pinned_caller)
    t.start()
    t.join(30)
    return out["cpus"]


@linux_smp
def test_the_runtime_and_its_threads_leave_the_compute_core_for_the_process_cpus(monkeypatch):
    process = frozenset(os.sched_getaffinity(0))
    monkeypatch.setattr(thread_cpus, "_process_cpus", process)
    loop_cpus, worker_cpus = affinities_from_a_runtime_started_on(min(process))
    assert loop_cpus == set(process) and worker_cpus == set(process)


@linux_smp
def test_without_noted_cpus_the_runtime_keeps_its_creators_pinning(monkeypatch):
    monkeypatch.setattr(thread_cpus, "_process_cpus", None)
    cpu = min(os.sched_getaffinity(0))
    assert affinities_from_a_runtime_started_on(cpu) == ({cpu}, {cpu})


def test_the_first_note_wins(monkeypatch):
    monkeypatch.setattr(thread_cpus, "_process_cpus", frozenset({7}))
    thread_cpus.remember_process_cpus()
    assert thread_cpus._process_cpus == frozenset({7})


def test_a_worker_pinned_before_plugins_load_notes_the_cpus_of_the_process_that_started_it(monkeypatch):
    """libgomp pins a vLLM worker's main thread when torch loads, before the plugin runs: the engine core
    that started the worker still has the CPUs vLLM was given."""
    ppid = os.getppid()
    for own, parent, noted in (({0}, {0, 1, 2, 3}, {0, 1, 2, 3}),  # the worker under OpenMP pinning
                               ({0, 1}, {0, 1}, {0, 1}),  # nothing pinned
                               ({0}, {1}, {0})):  # a parent that does not hold ours: no guessing
        monkeypatch.setattr(thread_cpus, "_process_cpus", None)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: parent if pid == ppid else own, raising=False)
        thread_cpus.remember_process_cpus()
        assert thread_cpus._process_cpus == frozenset(noted)
