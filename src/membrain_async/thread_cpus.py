"""Which CPUs the runtime's threads run on: the process's, not the compute thread's that started them.

vLLM on CPU pins each worker's OMP threads, its main thread among them, to the cores given to that rank
(VLLM_CPU_OMP_THREADS_BIND). A thread inherits the affinity of the thread that creates it, so the runtime
thread, started from the worker's main thread, and the threads it starts (load checks and copies, the
write-behind's) would all run on the one core the forward pass computes on, and take their time from it,
while a core the process may use sits idle (in a fleet, the neighbour engine's between its requests).

The pinning is OpenMP's (vLLM sets OMP_PLACES and OMP_PROC_BIND for each worker it starts), and libgomp
binds the main thread as soon as torch loads it, before any plugin runs: the worker's own affinity is
already the compute core's by then. The process that started the worker (vLLM's engine core) still has the
CPUs the engine was given. So the vLLM plugin notes, in every vLLM process, the CPUs of its parent where they
include its own (`remember_process_cpus`), and the runtime thread widens its affinity to them when it
starts (`widen_this_thread`). The kernel then places Membrain's threads wherever there is room. Nothing is
widened beyond what vLLM was started with (`taskset`, a cgroup's cpuset), and nothing changes in a process
that never noted its CPUs (Membrain embedded in an application keeps whatever pinning that has).
"""

from __future__ import annotations

import os

_process_cpus: frozenset[int] | None = None


def remember_process_cpus() -> None:
    """At a vLLM process's start (the first call wins): the CPUs it was given, its parent's where they
    include this thread's (see above), else this thread's own."""
    global _process_cpus
    if _process_cpus is not None or not hasattr(os, "sched_getaffinity"):
        return
    own = frozenset(os.sched_getaffinity(0))
    try:
        parent = frozenset(os.sched_getaffinity(os.getppid()))
    except OSError:  # gone, or not ours to read
        parent = frozenset()
    _process_cpus = parent if own <= parent else own


def widened(current: set[int] | frozenset[int], process: frozenset[int] | None) -> frozenset[int] | None:
    """The CPUs a runtime thread pinned to `current` should take: the process's, where they are wider;
    None to leave it as it is."""
    if not process or process <= current:
        return None
    return process


def widen_this_thread() -> None:
    """In a runtime thread, first thing: run on the process's CPUs rather than the creating thread's."""
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = widened(os.sched_getaffinity(0), _process_cpus)
    if cpus is not None:
        try:
            os.sched_setaffinity(0, cpus)  # 0: this thread only (Linux affinity is per thread)
        except OSError:
            pass  # a cpuset narrowed since start: stay where the creating thread was
