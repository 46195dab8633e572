"""Many Membrain nodes as one cache.

Placement is rendezvous (highest-random-weight) hashing: a key lives on the R nodes with the highest
`score(node, key)`. Adding or removing a node moves only the keys whose top-R set it enters or leaves,
about R/N of them, and needs no coordination: every client computes the same placement from the same
node list.

- put: each value goes to its R top nodes, all nodes in parallel;
- get: each key is read from the first healthy node of its ranking; a replica is tried if that one misses;
- lookup (leading keys present): keys are grouped by the node that would serve them, every group asked in
  parallel, and the answers combined into "how many leading keys can be loaded";
- a node whose circuit breaker is open is skipped, so a dead node costs no timeouts; its breaker
  probe (after the cool-down) or `check_health()` brings it back.

Failover: a node that cannot be reached is routed around (its keys go to their next replica). An operation
raises `MembrainUnavailable` only when no node could answer it at all; when some nodes answered, a key
none of whose replicas could be reached comes back as a miss.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from typing import Sequence

import anyio

from ..protocol import api
from .breaker import CircuitBreaker
from .errors import MembrainUnavailable
from .node import ClientStats, MembrainClient, PutValue


def _score(node_id: bytes, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(node_id + key.encode(), digest_size=8).digest(), "big")


def rank_nodes(node_ids: Sequence[bytes], key: str) -> list[int]:
    """Node indexes in the key's preference order (highest score first)."""
    return sorted(range(len(node_ids)), key=lambda i: _score(node_ids[i], key), reverse=True)


@dataclass
class ClusterStats:
    fanout_calls: int = 0
    replica_reads: int = 0  # keys asked of a further replica because the first choice failed or missed


class MembrainCluster:
    """Same interface as `MembrainClient`, over several nodes."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        namespace: str = "default",
        token: str | None = None,
        replicas: int = 1,
        timeout: float = 2.0,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 1.0,
        bulk_connections: int = 8,
        tls: ssl.SSLContext | None = None,
    ):
        if not urls:
            raise ValueError("a cluster needs at least one node URL")
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.urls = [u.rstrip("/") for u in urls]
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"duplicate node URLs in {urls}")
        self.replicas = min(replicas, len(self.urls))
        self.namespace = namespace
        self.nodes = [
            MembrainClient(
                u, namespace=namespace, token=token, timeout=timeout,
                breaker=CircuitBreaker(breaker_threshold, breaker_cooldown), bulk_connections=bulk_connections,
                tls=tls,
            )
            for u in self.urls
        ]
        # Placement depends on the node's address only, so every client agrees on it.
        self._ids = [u.encode() for u in self.urls]
        self.cluster_stats = ClusterStats()

    # ------------------------------------------------------------------ placement

    def placement(self, key: str) -> list[int]:
        """The R nodes that hold `key`."""
        return rank_nodes(self._ids, key)[: self.replicas]

    def _up(self, i: int) -> bool:
        return self.nodes[i].breaker.ready()

    @property
    def available(self) -> bool:
        return any(n.available for n in self.nodes)

    @property
    def stats(self) -> ClientStats:
        total = ClientStats()
        for n in self.nodes:
            for f in ("calls", "failures", "fast_fails", "retries", "bytes_put", "bytes_got"):
                setattr(total, f, getattr(total, f) + getattr(n.stats, f))
        return total

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "MembrainCluster":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for n in self.nodes:
            await n.aclose()

    async def check_health(self) -> list[bool]:
        """Probe every node now (GET /healthz); a node that answers is marked up."""
        out = [False] * len(self.nodes)

        async def probe(i: int) -> None:
            node = self.nodes[i]
            try:
                r = await node._http_client().get(api.HEALTHZ_PATH, timeout=node.timeout)
                ok = r.status_code == 200
            except Exception:
                ok = False
            (node.breaker.record_success if ok else node.breaker.record_failure)()
            out[i] = ok

        async with anyio.create_task_group() as tg:
            for i in range(len(self.nodes)):
                tg.start_soon(probe, i)
        return out

    async def _fan_out(self, groups: dict[int, list[int]], call) -> dict[int, object]:
        """Run `call(node_index, key_indexes)` for every group in parallel; results by node index."""
        results: dict[int, object] = {}
        self.cluster_stats.fanout_calls += 1

        async def one(i: int, idx: list[int]) -> None:
            results[i] = await call(i, idx)

        async with anyio.create_task_group() as tg:
            for i, idx in groups.items():
                tg.start_soon(one, i, idx)
        return results

    # ------------------------------------------------------------------ operations

    async def put_many(self, keys: Sequence[str], values: Sequence[PutValue], *, ns: str | None = None) -> int:
        """Store each value on its R nodes. Returns how many keys were stored on at least one node."""
        if len(keys) != len(values):
            raise ValueError("put_many needs as many values as keys")
        groups: dict[int, list[int]] = {}
        for k, key in enumerate(keys):
            for i in self.placement(key):
                if self._up(i):
                    groups.setdefault(i, []).append(k)
        stored_on: list[int] = [0] * len(keys)
        answered: list[int] = []
        last: list[MembrainUnavailable] = []

        async def call(i: int, idx: list[int]) -> None:
            try:
                n = await self.nodes[i].put_many([keys[k] for k in idx], [values[k] for k in idx], ns=ns)
            except MembrainUnavailable as exc:
                last.append(exc)
                return
            answered.append(i)
            if n == len(idx):
                for k in idx:
                    stored_on[k] += 1

        if keys:
            await self._fan_out(groups, call)
            if not answered:
                raise _none_answered(last)
        return sum(1 for s in stored_on if s)

    async def put(self, key: str, value: PutValue, *, ns: str | None = None) -> bool:
        return await self.put_many([key], [value], ns=ns) == 1

    def _next_replica(self, key: str, tried: set[int]) -> int | None:
        for i in self.placement(key):
            if i not in tried and self._up(i):
                return i
        return None

    async def _across_replicas(self, keys: Sequence[str], ask, retry) -> None:
        """Ask each key's first up replica, all nodes in parallel; keys for which `retry(k)` holds after
        the answer (the node failed, or the key missed) go to their next replica, up to R rounds.
        MembrainUnavailable if no node answered at all."""
        if not keys:
            return
        answered: list[int] = []
        last: list[MembrainUnavailable] = []
        await self._replica_rounds(keys, ask, retry, answered, last)
        if not answered:
            raise _none_answered(last)

    async def _replica_rounds(self, keys, ask, retry, answered: list[int], last: list) -> None:
        tried: list[set[int]] = [set() for _ in keys]
        todo = list(range(len(keys)))
        for round_ in range(self.replicas):
            groups: dict[int, list[int]] = {}
            for k in todo:
                i = self._next_replica(keys[k], tried[k])
                if i is not None:
                    tried[k].add(i)
                    groups.setdefault(i, []).append(k)
            if not groups:
                return
            failed: list[int] = []

            async def call(i: int, idx: list[int]) -> None:
                try:
                    await ask(i, idx)
                except MembrainUnavailable as exc:
                    last.append(exc)
                    failed.extend(idx)
                else:
                    answered.append(i)

            await self._fan_out(groups, call)
            todo = sorted(set(failed) | {k for k in todo if k not in failed and retry(k)})
            if not todo:
                return
            if round_ + 1 < self.replicas:
                self.cluster_stats.replica_reads += len(todo)

    async def get_many(self, keys: Sequence[str], *, ns: str | None = None) -> list[memoryview | None]:
        """Each key from its first up replica; a miss or a failed node sends it to the next replica."""
        out: list[memoryview | None] = [None] * len(keys)

        async def ask(i: int, idx: list[int]) -> None:
            values = await self.nodes[i].get_many([keys[k] for k in idx], ns=ns)
            for k, v in zip(idx, values):
                out[k] = v

        await self._across_replicas(keys, ask, lambda k: out[k] is None)
        return out

    async def get_many_into(self, keys: Sequence[str], buffers: Sequence[memoryview], *,
                            ns: str | None = None) -> list[int]:
        """As get_many, each value received straight into its buffer: its size, or -1 (a miss everywhere)."""
        out = [-1] * len(keys)

        async def ask(i: int, idx: list[int]) -> None:
            sizes = await self.nodes[i].get_many_into([keys[k] for k in idx], [buffers[k] for k in idx], ns=ns)
            for k, size in zip(idx, sizes):
                out[k] = size

        await self._across_replicas(keys, ask, lambda k: out[k] < 0)
        return out

    async def get(self, key: str, *, ns: str | None = None) -> memoryview | None:
        return (await self.get_many([key], ns=ns))[0]

    async def exists(self, keys: Sequence[str], *, ns: str | None = None) -> list[bool]:
        """Asked of each key's first up replica; a failed node's keys are asked of their next replica."""
        present = [False] * len(keys)

        async def ask(i: int, idx: list[int]) -> None:
            for k, p in zip(idx, await self.nodes[i].exists([keys[k] for k in idx], ns=ns)):
                present[k] = p

        await self._across_replicas(keys, ask, lambda k: False)
        return present

    async def lookup(self, keys: Sequence[str], *, ns: str | None = None) -> int:
        """Leading keys present, asking every node concerned at once (one round trip of latency)."""
        if len(self.nodes) == 1:
            return await self.nodes[0].lookup(keys, ns=ns)
        present = await self.exists(keys, ns=ns)
        n = 0
        while n < len(present) and present[n]:
            n += 1
        return n

    async def delete(self, key: str, *, ns: str | None = None) -> bool:
        """Deleted from every replica that answered; True if any of them held it."""
        last: list[MembrainUnavailable] = []

        async def call(i: int, _) -> bool | None:
            try:
                return await self.nodes[i].delete(key, ns=ns)
            except MembrainUnavailable as exc:
                last.append(exc)
                return None

        results = await self._fan_out({i: [0] for i in self.placement(key)}, call)
        if all(r is None for r in results.values()):
            raise _none_answered(last)
        return any(results.values())


def _none_answered(errors: list[MembrainUnavailable]) -> MembrainUnavailable:
    if errors:
        exc = MembrainUnavailable(f"no Membrain node could answer: {errors[-1]}")
        exc.__cause__ = errors[-1]
        return exc
    return MembrainUnavailable("no Membrain node could answer: every node concerned is marked down")
