"""Real redis-server processes on loopback for tests and benchmarks: one server, or a Redis Cluster.

Debian's `redis-server` and `redis-cli` (apt install redis-server); nothing is mocked. Every server runs
with no persistence (`--save "" --appendonly no`), as a KV cache should, in a directory of its own.
A cluster is N masters with R replicas each, made by `redis-cli --cluster create`, with a short
`cluster-node-timeout` so a killed master's replica takes over within a few seconds.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def unavailable_reason() -> str | None:
    """Why no Redis can be started here, or None."""
    for tool in ("redis-server", "redis-cli"):
        if not shutil.which(tool):
            return f"{tool} not found (Debian: apt-get install redis-server; nox -s tests installs it when root)"
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return "hiredis not installed (pip install 'membrain-async[redis]')"
    return None


def _free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node one below 55535 whose bus port (+10000) is free too."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(200):
        port = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def cli(port: int, *args: str, timeout: float = 10) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True,
                         timeout=timeout)
    return out.stdout.strip()


class RedisServer:
    """One redis-server process. `extra` are more `--name value` arguments (maxmemory, requirepass...)."""

    def __init__(self, *extra: str, port: int | None = None, directory: str | None = None, tls: bool = False):
        # tls: `extra` carries --port 0 --tls-port P ...; the server is then reached on P, over TLS.
        self.port = int(extra[list(extra).index("--tls-port") + 1]) if tls else port or _free_port("--cluster-enabled" in extra)
        self.tls = tls
        self.dir = directory or tempfile.mkdtemp(prefix=f"redis-{self.port}-")
        self._own_dir = directory is None
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = ["redis-server", *([] if self.tls else ["--port", str(self.port)]), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start ({self.proc.returncode}): {self.log_tail()}")
            try:
                socket.create_connection(self.addr, timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not listen on {self.port}")

    def cli(self, *args: str) -> str:
        return cli(self.port, *args)

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no goodbye to the cluster, as a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """`masters` masters with `replicas` replicas each, all on loopback; `url` names one seed."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000, *extra: str):
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                              "--cluster-node-timeout", str(node_timeout_ms),
                                              # A replica's first sync at once (the default waits 5 s for others).
                                              "--repl-diskless-sync-delay", "0", *extra))
            if masters >= 3:
                out = subprocess.run(
                    ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                     "--cluster-replicas", str(replicas), "--cluster-yes"],
                    capture_output=True, text=True, timeout=60)
                if out.returncode != 0:
                    raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
            else:
                self._assemble(masters, replicas)  # redis-cli --cluster create wants 3 masters at least
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def _assemble(self, masters: int, replicas: int) -> None:
        """By hand: slots split evenly over the first `masters` nodes, the others replicate them in turn."""
        step = 16384 // masters
        for i, n in enumerate(self.nodes[:masters]):
            hi = 16383 if i == masters - 1 else (i + 1) * step - 1
            n.cli("CLUSTER", "ADDSLOTSRANGE", str(i * step), str(hi))
        for n in self.nodes[1:]:
            n.cli("CLUSTER", "MEET", "127.0.0.1", str(self.nodes[0].port))
        deadline = time.monotonic() + 20
        while len(self.cluster_nodes()) < len(self.nodes) or any(
                "handshake" in ",".join(e["flags"]) for e in self.cluster_nodes()):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster nodes did not meet")
            time.sleep(0.1)
        ids = {e["port"]: e["id"] for e in self.cluster_nodes()}
        for j, n in enumerate(self.nodes[masters:]):
            master = self.nodes[j % masters]
            while n.cli("CLUSTER", "REPLICATE", ids[master.port]) != "OK":
                if time.monotonic() > deadline:
                    raise RuntimeError("replica could not attach")
                time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def urls(self) -> list[str]:
        """Every node as a seed (any one of them is enough)."""
        return [f"redis+cluster://127.0.0.1:{n.port}" for n in self.nodes]

    def _alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc and n.proc.poll() is None]

    def cluster_nodes(self) -> list[dict]:
        """CLUSTER NODES as seen by a live node: id, port, role, master id, flags, slots."""
        for n in self._alive():
            text = n.cli("CLUSTER", "NODES")
            if text:
                break
        out = []
        for line in text.splitlines():
            f = line.split()
            port = int(f[1].split("@")[0].rsplit(":", 1)[1])
            out.append({"id": f[0], "port": port, "flags": f[2].split(","), "master": f[3],
                        "role": "master" if "master" in f[2] else "replica", "slots": f[8:]})
        return out

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def masters(self) -> list[RedisServer]:
        return [self.node(e["port"]) for e in self.cluster_nodes() if e["role"] == "master" and "fail" not in e["flags"]
                and e["slots"]]

    def replica_of(self, master: RedisServer) -> RedisServer:
        nodes = self.cluster_nodes()
        mid = next(e["id"] for e in nodes if e["port"] == master.port)
        return self.node(next(e["port"] for e in nodes if e["master"] == mid))

    def wait_replicated(self, timeout_ms: int = 15000) -> None:
        """Every master's writes so far acknowledged by its replica (WAIT 1 on every master)."""
        for m in self.masters():
            acked = m.cli("WAIT", "1", str(timeout_ms))
            if acked.strip() != "1":
                raise RuntimeError(f"replica of {m.port} acknowledged {acked!r}")

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says cluster_state:ok and all slots are served by live masters."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [n.cli("CLUSTER", "INFO") for n in self._alive()]
            if infos and all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def wait_failover(self, victim: RedisServer, timeout: float = 30) -> RedisServer:
        """After `victim` was killed: until its replica is a master serving slots, and the cluster is ok."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.cluster_nodes()
            vid = next(e["id"] for e in nodes if e["port"] == victim.port)
            dead = any("fail" in e["flags"] for e in nodes if e["id"] == vid)
            heirs = [e for e in nodes if e["role"] == "master" and e["slots"] and e["port"] != victim.port
                     and self.node(e["port"]).proc.poll() is None]
            if dead and not any(e["id"] == vid and e["slots"] for e in nodes) and len(heirs) >= 1:
                self.wait_ok(max(1.0, deadline - time.monotonic()))
                return self.node(max(heirs, key=lambda e: len(e["slots"]))["port"])
            time.sleep(0.1)
        raise RuntimeError(f"no failover of {victim.port} within {timeout} s")

    def key_port(self, key: bytes) -> int:
        """The port of the master serving `key` now (CLUSTER KEYSLOT + the slot table)."""
        from ..protocol.resp import key_slot

        slot = key_slot(key)
        for e in self.cluster_nodes():
            if e["role"] != "master" or "fail" in e["flags"]:
                continue
            for r in e["slots"]:
                if r.startswith("["):
                    continue
                lo, _, hi = r.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return e["port"]
        raise LookupError(slot)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        for n in self.nodes:
            shutil.rmtree(n.dir, ignore_errors=True)
