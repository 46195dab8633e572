"""Where a benchmark's CPU goes: py-spy on engine processes, CPU seconds per process and per thread.

    with ProcessProfile(out_dir, "membrain") as prof:
        prof.watch("engine0", api.proc.pid, sample=True)   # the API server and its children (engine core)
        prof.watch("server", server.proc.pid)
        ... run the workload ...
    prof.summary  # {"engine0": {"cpu_s": ..., "threads": {...}, "top": [...]}, ...}

CPU seconds come from psutil (per process and per thread, before and after), so they cost nothing while
the workload runs. py-spy, where asked for, samples the model's worker process with `--native --threads`;
samples whose innermost frame is a wait (epoll, futex, sleep) are dropped, so the rest approximates CPU time, writes collapsed stacks (`<name>-<pid>.txt`, for
flamegraph.pl or speedscope), and the summary attributes its samples to a few named parts of the step.
py-spy needs ptrace: it is used when present and permitted, and skipped with a note otherwise.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys

import psutil

# Where a sample's time goes: the first part (in this order) that a frame of its stack names. Membrain's
# parts come first, so its work inside vLLM's step (the save gather in execute_model) counts as Membrain's.
PARTS = [
    ("membrain save", ("_stage", "start_save", "_gather", "wait_for_save", "_upload", "write_header")),
    ("membrain load", ("PageLoader", "_scatter", "loads.py", "finish_load", "_copy_in")),
    ("membrain runtime", ("membrain_async/runtime", "membrain_async/client", "membrain_async/cache", "sockio")),
    ("membrain scheduler", ("membrain_async/vllm/scheduler",)),
    ("model forward", ("execute_model", "_model_forward", "forward")),
    ("vllm scheduler", ("schedule", "update_from_output")),
]


# Leaf frames of a thread that waits (py-spy --native samples every thread, idle or not).
WAITS = ("epoll_wait", "epoll_pwait", "poll (", "select (", "pthread_cond_wait", "pthread_cond_timedwait",
         "sem_wait", "sem_timedwait", "sem_clockwait", "futex", "nanosleep", "clock_nanosleep", "accept",
         "__GI___poll", "do_futex_wait", "pthread_cond_clockwait", "recvmsg (", "read (libc")


def waiting(stack: str) -> bool:
    leaf = stack.rsplit(";", 1)[-1]
    if leaf.startswith("0x") and "(libc.so" in leaf:
        return True  # an unsymbolised libc address: in the profiles seen here, a futex wait's
    return any(w in leaf for w in WAITS)


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for name, marks in PARTS:
        if any(m in f for f in frames for m in marks):
            return name
    return "other"


def _py_spy() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.path.exists(here) else shutil.which("py-spy")


def _model_worker(pid: int) -> psutil.Process:
    """The process that runs the model: vLLM's worker (its own process under the multiprocessing executor,
    titled VLLM::Worker), else the engine core, else the process itself."""
    proc = psutil.Process(pid)
    kids = proc.children(recursive=True)
    for title in ("Worker", "EngineCore"):
        for child in kids:
            try:
                if title in child.name() or title in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
    return kids[0] if kids else proc


def _cpu(proc: psutil.Process) -> tuple[float, dict[int, float]]:
    try:
        times = proc.cpu_times()
        threads = {t.id: t.user_time + t.system_time for t in proc.threads()}
        return times.user + times.system, threads
    except psutil.Error:
        return 0.0, {}


def _thread_name(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


class ProcessProfile:
    def __init__(self, out_dir: str, label: str, rate: int = 49):
        self.out_dir, self.label, self.rate = out_dir, label, rate
        self._watched: dict[str, tuple[list[psutil.Process], dict]] = {}
        self._spies: dict[str, tuple[subprocess.Popen, str]] = {}
        self.summary: dict[str, dict] = {}
        os.makedirs(out_dir, exist_ok=True)

    def watch(self, name: str, pid: int, sample: bool = False) -> None:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        before = {p.pid: _cpu(p) for p in procs}
        self._watched[name] = (procs, before)
        spy = _py_spy()
        if sample and spy:
            core = _model_worker(pid)
            path = os.path.join(self.out_dir, f"{self.label}-{name}-{core.pid}.txt")
            self._spies[name] = (subprocess.Popen(
                [spy, "record", "--pid", str(core.pid), "--native", "--threads", "--rate", str(self.rate),
                 "--format", "raw", "--output", path],
                stdout=subprocess.DEVNULL, stderr=open(path + ".log", "w")), path)

    def __enter__(self) -> "ProcessProfile":
        return self

    def __exit__(self, *exc) -> None:
        for name, (procs, before) in self._watched.items():
            cpu_s, threads = 0.0, collections.Counter()
            for p in procs:
                total0, threads0 = before.get(p.pid, (0.0, {}))
                total1, threads1 = _cpu(p)
                cpu_s += max(0.0, total1 - total0)
                for tid, t in threads1.items():
                    threads[f"{p.pid}:{_thread_name(p.pid, tid)}"] += max(0.0, t - threads0.get(tid, 0.0))
            self.summary[name] = {"cpu_s": round(cpu_s, 3),
                                  "threads_cpu_s": {k: round(v, 3) for k, v in threads.most_common(8) if v > 0.01}}
        for name, (spy, path) in self._spies.items():
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
            self.summary[name].update(self._parts(path))

    @staticmethod
    def _parts(path: str) -> dict:
        parts, threads, total = collections.Counter(), collections.Counter(), 0
        try:
            with open(path) as f:
                for line in f:
                    stack, _, count = line.rstrip("\n").rpartition(" ")
                    if not count.isdigit():
                        continue
                    n = int(count)
                    if waiting(stack):
                        continue
                    total += n
                    parts[part_of(stack)] += n
                    threads[stack.split(";", 1)[0]] += n
        except OSError:
            return {"samples": 0, "note": "py-spy wrote nothing (ptrace not permitted?)"}
        return {"samples": total, "profile": path,
                "parts": {k: round(v / total, 3) for k, v in parts.most_common()} if total else {},
                "sample_threads": {k: round(v / total, 3) for k, v in threads.most_common(6)} if total else {}}
