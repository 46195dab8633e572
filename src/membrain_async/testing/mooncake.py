"""A real Mooncake Store on loopback, as processes: `mooncake_master` (with its HTTP metadata server) and
one store segment process that lends the store its memory. For the tests and the benchmarks.

Mooncake needs both: the master only holds metadata (which object lives where, leases, eviction); the
bytes live in segments that clients mount. A client that mounts nothing (global segment size 0, as the
connector's default) can only store data if some other process has mounted a segment, so the segment
runs in a process of its own, like a storage node. Killing the master (`kill_master`) is how the tests
make the store unreachable without touching the data.

    with MooncakeCluster(capacity=64 << 20) as mc:
        mc.endpoint          # "mooncake://127.0.0.1:<rpc port>"
        mc.metadata          # "http://127.0.0.1:<port>/metadata"

`unavailable()` says why Mooncake cannot run here (the wheel is not installed, or does not load: its
transfer engine links Debian's libibverbs1), or None.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

WHEEL = "mooncake-transfer-engine-non-cuda==0.3.13.post1"

# The segment process: mount `capacity` bytes into the store, say so, and serve until killed.
_SEGMENT = """
import sys, time
from mooncake.store import MooncakeDistributedStore
s = MooncakeDistributedStore()
rc = s.setup("127.0.0.1", sys.argv[1], int(sys.argv[3]), 16 << 20, "tcp", "", sys.argv[2])
print("ready" if rc == 0 else f"setup failed {rc}", flush=True)
while True:
    time.sleep(3600)
"""


def unavailable() -> str | None:
    """Why Mooncake Store cannot run here, or None."""
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        return f"{WHEEL} does not import: {exc} (pip install {WHEEL}; Debian: apt install libibverbs1)"
    if not master_binary():
        return "mooncake_master not found (it ships in the mooncake wheel)"
    return None


def master_binary() -> str | None:
    import mooncake

    local = os.path.join(os.path.dirname(mooncake.__file__), "mooncake_master")
    return local if os.path.exists(local) else shutil.which("mooncake_master")


def version() -> str:
    import importlib.metadata as md

    return md.version("mooncake-transfer-engine-non-cuda")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} in {timeout}s")


class MooncakeCluster:
    """mooncake_master + one segment process of `capacity` bytes, on free loopback ports.

    `master_flags` are extra `-flag=value` arguments for mooncake_master (e.g. eviction watermark, lease
    TTL). Output of both goes to `log_dir` if given (Mooncake logs every failed put), else nowhere.
    """

    def __init__(self, capacity: int = 64 << 20, *, master_flags: dict | None = None, log_dir: str | None = None):
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.capacity = capacity
        self.rpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.metadata = f"http://127.0.0.1:{self.http_port}/metadata"
        self.master_addr = f"127.0.0.1:{self.rpc_port}"
        self.endpoint = f"mooncake://{self.master_addr}"
        self.master_flags = dict(master_flags or {})
        self.log_dir = log_dir
        self.master: subprocess.Popen | None = None
        self.segment: subprocess.Popen | None = None
        self._logs: list = []
        try:
            self.start_master()
            self.start_segment()
        except BaseException:
            self.stop()
            raise

    def _out(self, name: str):
        if not self.log_dir:
            return subprocess.DEVNULL
        f = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        self._logs.append(f)
        return f

    def start_master(self) -> None:
        """(Re)start the master on the same ports. A restarted master knows no objects and no segments."""
        flags = {
            "rpc_port": self.rpc_port,
            "rpc_address": "127.0.0.1",
            "enable_http_metadata_server": "true",
            "http_metadata_server_host": "127.0.0.1",
            "http_metadata_server_port": self.http_port,
            "metrics_port": self.metrics_port,
            **self.master_flags,
        }
        argv = [master_binary(), *(f"-{k}={v}" for k, v in flags.items())]
        self.master = subprocess.Popen(argv, stdout=self._out("mooncake-master"), stderr=subprocess.STDOUT)
        wait_port(self.rpc_port, self.master, "mooncake_master")
        wait_port(self.http_port, self.master, "mooncake metadata server")

    def start_segment(self) -> None:
        self.segment = subprocess.Popen(
            [sys.executable, "-c", _SEGMENT, self.metadata, self.master_addr, str(self.capacity)],
            stdout=subprocess.PIPE, stderr=self._out("mooncake-segment"), text=True,
        )
        line = self.segment.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"mooncake segment failed to start: {line!r}")

    def fill_with_pinned(self, chunk: int = 256 << 10) -> int:
        """Fill the store with hard-pinned objects (never evicted) until it refuses: a store that is full
        for good. Returns the bytes it took."""
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig

        store = MooncakeDistributedStore()
        rc = store.setup("127.0.0.1", self.metadata, 0, 16 << 20, "tcp", "", self.master_addr)
        if rc != 0:
            raise RuntimeError(f"mooncake fill client setup failed: {rc}")
        pinned = ReplicateConfig()
        pinned.with_hard_pin = True
        taken = 0
        try:
            for size in (chunk, 16 << 10, 1 << 10):  # then smaller pieces, into the last gaps
                value = bytes(size)
                while store.put(f"membrain-test-pinned-{taken}", value, pinned) == 0:
                    taken += size
        finally:
            store.close()
        return taken

    def kill_master(self) -> None:
        """SIGKILL the master (and with it the metadata server): the store is unreachable, as in a crash."""
        if self.master is not None and self.master.poll() is None:
            self.master.kill()
            self.master.wait(10)

    def stop(self) -> None:
        for p in (self.segment, self.master):
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for f in self._logs:
            f.close()
        self._logs = []

    def __enter__(self) -> "MooncakeCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
