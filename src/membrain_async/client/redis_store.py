"""Redis / Valkey (standalone or Redis Cluster) as a transport behind the store protocol (store.py).

Why our own RESP over anyio sockets, and not redis-py's asyncio client: the runtime's event loop may be
trio (`VLLM_MEMBRAIN_ASYNC_BACKEND=trio`), and redis-py's asyncio client does not run on trio. The
alternatives were two code paths (redis-py on asyncio, plus a private asyncio loop thread for trio, with
a thread hop on every call and a second set of timeouts and cancellation rules), or one: RESP encoding
sans-IO (protocol/resp.py), hiredis's C parser for replies, and the same raw non-blocking sockets the
Membrain bulk path uses (sockio.py: scatter-gather sends of payload views, TLS). One path, tested under
both loops, with the project's deadlines and cancel scopes. The price is that the cluster logic is ours;
it is the small part of redis-py's that a cache needs:

- slot map from `CLUSTER SLOTS`, asked of any known node (the seeds first time), refreshed when a reply
  says MOVED, a cluster is reshaping (TRYAGAIN, CLUSTERDOWN, READONLY...) or a node cannot be reached;
- MOVED updates the slot at once and re-sends; ASK sends `ASKING` + the command to the named node once;
- a node that cannot be reached has a breaker of its own; its keys are *unreachable* for this call, and
  while other nodes answer they are served as misses (a lookup stops there, a get misses, a put is not
  stored), exactly as `MembrainCluster` treats a dead Membrain node. Only when no node answers does the
  call raise (OSError), so `MembrainClient`'s retries and breaker see a dead store;
- during a failover (master killed, replica not promoted yet) its slots are unreachable, i.e. misses;
  once `CLUSTER SLOTS` names the promoted replica, its keys hit again. Nothing waits for the cluster.

Keys are `mb:<namespace>:<key>`. Namespaces and keys never contain braces (protocol/names.py), so no
Redis hash tag is formed: the whole key is hashed and one namespace's blocks spread over every slot
(a tag on the namespace would put a tenant's whole cache on one master).

A prefix lookup is one pipeline of EXISTS per node concerned, all nodes at once: one round trip.
Values are the payload bytes as the cache layer made them (header with checksum and key tag), so
every check the cache layer does on a Membrain load applies unchanged.

A write the store refuses because it is full (`-OOM`, maxmemory with `noeviction`) is not stored: the
put reports fewer stored (the cache layer counts them as failed uploads), `refused_full` counts them here,
one warning is logged per minute, and serving goes on.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import anyio

from .. import sockio
from ..protocol import resp
from .breaker import CircuitBreaker
from .errors import MembrainRequestError
from .store import Buffer, Limits, PutValue, copy_into, value_parts

log = logging.getLogger("membrain.client.redis")

Addr = tuple[str, int]

# A key whose node could not be reached in this call (distinct from a miss, None).
UNREACHABLE = object()

RECV_CHUNK = 1 << 20
MAX_ROUNDS = 5  # redirects / refreshes one call follows before giving up on the keys left
WARN_EVERY_S = 60.0
REFRESH_EVERY_S = 0.1  # at most this often is the slot map read again while it looks stale


def redis_key(ns: str, key: str) -> bytes:
    """`mb:<ns>:<key>`: no braces, so no hash tag; one namespace spans every slot."""
    return f"mb:{ns}:{key}".encode()


@dataclass(frozen=True)
class RedisEndpoint:
    """What the endpoint URLs say: seeds, cluster or not, TLS, database, credentials (never printed)."""

    seeds: tuple[Addr, ...]
    cluster: bool
    tls: bool
    db: int = 0
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)


def parse_endpoint(urls: Sequence[str], username: str = "", password: str = "") -> RedisEndpoint:
    """`redis://[user:pass@]host:port[/db]`, `rediss://...` (TLS), `redis+cluster://seed[,seed...]`.

    Credentials come from the settings (`username`, `password`) or, failing those, from the URL's userinfo.
    A cluster may list several seeds (each a full URL); a standalone endpoint is one server.
    """
    from urllib.parse import unquote, urlsplit

    from ..urls import redact_url

    seeds: list[Addr] = []
    schemes = set()
    db = 0
    for url in urls:
        p = urlsplit(url)
        schemes.add(p.scheme)
        if p.scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster") or not p.hostname:
            raise ValueError(f"not a Redis endpoint: {redact_url(url)!r} (expected redis://host:port)")
        seeds.append((p.hostname, p.port or 6379))
        if p.username and not username:
            username = unquote(p.username)
        if p.password and not password:
            password = unquote(p.password)
        if p.path.strip("/"):
            try:
                db = int(p.path.strip("/"))
            except ValueError:
                raise ValueError(f"{redact_url(url)!r}: the path must be a database number") from None
    if len(schemes) != 1:
        raise ValueError("all Redis endpoints must use the same scheme")
    scheme = schemes.pop()
    cluster = scheme.endswith("+cluster")
    if not cluster and len(seeds) != 1:
        raise ValueError("a redis:// endpoint is one server; list a Redis Cluster's seeds as redis+cluster://")
    if cluster and db:
        raise ValueError("Redis Cluster has only database 0")
    return RedisEndpoint(tuple(seeds), cluster, scheme.startswith("rediss"), db, username, password)


class RedisConnection:
    """One socket; one pipeline at a time (its owner, NodePool, sees to that)."""

    def __init__(self, sock, addr: Addr):
        self.sock = sock
        self.addr = addr
        self._replies = resp.Replies()
        self._buf = bytearray(RECV_CHUNK)

    @classmethod
    async def open(cls, addr: Addr, tls: ssl.SSLContext | None, endpoint: RedisEndpoint) -> "RedisConnection":
        conn = cls(await sockio.connect(addr[0], addr[1], tls), addr)
        try:
            hello: list[list[Buffer]] = []
            if endpoint.password:
                auth = ("AUTH", endpoint.username, endpoint.password) if endpoint.username else ("AUTH", endpoint.password)
                hello.append(resp.encode(*auth))
            if endpoint.db:
                hello.append(resp.encode("SELECT", endpoint.db))
            for reply in await conn.pipeline(hello) if hello else []:
                if isinstance(reply, resp.ReplyError):
                    # The reply names no secret, but keep to its code: the message may echo arguments.
                    raise _refusal(reply, during="authentication" if endpoint.password else "SELECT")
        except BaseException:
            conn.close()
            raise
        return conn

    async def pipeline(self, commands: list[list[Buffer]]) -> list:
        """Send every command, then read as many replies (one round trip)."""
        await sockio.send_all(self.sock, [b for c in commands for b in c])
        out = []
        view = memoryview(self._buf)
        while len(out) < len(commands):
            reply = self._replies.next()
            if reply is resp.INCOMPLETE:
                n = await sockio.recv_into(self.sock, view)
                if n == 0:
                    raise sockio.PeerClosed(f"redis {self.addr[0]}:{self.addr[1]} closed the connection")
                self._replies.feed(self._buf, n)
                continue
            out.append(reply)
        return out

    def close(self) -> None:
        sockio.close(self.sock)


class NodePool:
    """Connections to one Redis node: at most `size` at once, each carrying one pipeline at a time."""

    def __init__(self, addr: Addr, endpoint: RedisEndpoint, tls: ssl.SSLContext | None, size: int,
                 breaker: CircuitBreaker):
        self.addr = addr
        self.endpoint = endpoint
        self.tls = tls
        self.breaker = breaker
        self._idle: list[RedisConnection] = []
        self._slots = anyio.Semaphore(max(1, size))
        self._closed = False

    async def pipeline(self, commands: list[list[Buffer]]) -> list:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await RedisConnection.open(self.addr, self.tls, self.endpoint)
            try:
                replies = await conn.pipeline(commands)
            except BaseException:
                conn.close()  # mid-pipeline state is unknown: never reuse it
                raise
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)
            return replies

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


@dataclass
class RedisStats:
    refused_full: int = 0  # writes the store refused (OOM): not stored
    redirects: int = 0  # MOVED / ASK followed
    refreshes: int = 0  # slot maps read
    unreachable_keys: int = 0  # keys whose node could not be reached (served as misses)


class RedisTransport:
    """The store protocol over one Redis server or a Redis Cluster (see the module docstring)."""

    def __init__(self, endpoint: RedisEndpoint, *, tls: ssl.SSLContext | None = None, connections: int = 8,
                 timeout: float = 2.0, breaker_threshold: int = 3, breaker_cooldown: float = 1.0,
                 limits: Limits = Limits(1024, 64 << 20)):
        if endpoint.tls and tls is None:
            tls = ssl.create_default_context()
        self.endpoint = endpoint
        self.name = "redis-cluster" if endpoint.cluster else "redis"
        self.limits = limits
        self.timeout = timeout
        self.stats = RedisStats()
        self._tls = tls if endpoint.tls else None
        self._connections = connections
        self._breaker_args = (breaker_threshold, breaker_cooldown)
        self._pools: dict[Addr, NodePool] = {}
        self._slot_addr: list[Addr | None] = [None] * resp.SLOTS
        self._stale = endpoint.cluster
        self._refreshed_at = float("-inf")
        self._refresh_lock = anyio.Lock()
        self._warned_at = float("-inf")

    # ------------------------------------------------------------------ nodes and the slot map

    def _pool(self, addr: Addr) -> NodePool:
        pool = self._pools.get(addr)
        if pool is None:
            pool = self._pools[addr] = NodePool(addr, self.endpoint, self._tls, self._connections,
                                                CircuitBreaker(*self._breaker_args))
        return pool

    async def _node_call(self, addr: Addr, commands: list[list[Buffer]]) -> list:
        pool = self._pool(addr)
        try:
            replies = await pool.pipeline(commands)
        except (OSError, resp.ProtocolError, sockio.PeerClosed):
            pool.breaker.record_failure()
            raise
        pool.breaker.record_success()
        return replies

    async def _refresh(self) -> None:
        """Read the slot map from the first node that answers: known masters, then the seeds."""
        async with self._refresh_lock:
            if not self._stale or time.monotonic() - self._refreshed_at < REFRESH_EVERY_S:
                return
            self._refreshed_at = time.monotonic()
            known = list(dict.fromkeys(a for a in self._slot_addr if a is not None))
            random.shuffle(known)
            for addr in known + [s for s in self.endpoint.seeds if s not in known]:
                if not self._pool(addr).breaker.ready():
                    continue
                with anyio.move_on_after(max(0.05, self.timeout / 4)):
                    try:
                        (reply,) = await self._node_call(addr, [resp.encode("CLUSTER", "SLOTS")])
                    except (OSError, resp.ProtocolError):
                        continue
                    if isinstance(reply, resp.ReplyError):
                        raise _refusal(reply, during="CLUSTER SLOTS (is this a Redis Cluster?)")
                    table: list[Addr | None] = [None] * resp.SLOTS
                    for (first, last), master in resp.parse_cluster_slots(reply, addr).items():
                        table[first : last + 1] = [master] * (last + 1 - first)
                    self._slot_addr = table
                    self._stale = False
                    self.stats.refreshes += 1
                    return

    # ------------------------------------------------------------------ one batch of per-key commands

    async def _execute(self, keys: list[bytes], command: Callable[[int], list[Buffer]]) -> list:
        """Each key's reply (a value, a ReplyError) or UNREACHABLE; OSError if no node answered at all."""
        if not self.endpoint.cluster:
            replies = await self._node_call(self.endpoint.seeds[0], [command(i) for i in range(len(keys))])
            for r in replies:
                if isinstance(r, resp.ReplyError) and resp.redirect(r) is not None:
                    raise MembrainRequestError(400, "the redis:// endpoint is a Redis Cluster node: use redis+cluster://")
            return replies
        out: list = [UNREACHABLE] * len(keys)
        pending = list(range(len(keys)))
        asking: dict[int, Addr] = {}
        answered = False
        with anyio.move_on_after(self.timeout * 0.75):  # leave the caller's deadline room for the answer
            for round_ in range(MAX_ROUNDS):
                if self._stale:
                    await self._refresh()
                groups: dict[Addr, list[int]] = {}
                for i in pending:
                    addr = asking.get(i) or self._slot_addr[resp.key_slot(keys[i])]
                    if addr is not None and self._pool(addr).breaker.ready():
                        groups.setdefault(addr, []).append(i)
                    else:
                        self._stale = True  # its slot has no live master we know of: ask again soon
                if not groups:
                    break
                retry: list[int] = []
                refused: list[MembrainRequestError] = []

                async def one(addr: Addr, idx: list[int]) -> None:
                    nonlocal answered
                    cmds = []
                    for i in idx:
                        if i in asking:
                            cmds.append(resp.encode("ASKING"))
                        cmds.append(command(i))
                    try:
                        replies = await self._node_call(addr, cmds)
                    except (OSError, resp.ProtocolError):
                        self._stale = True
                        retry.extend(idx)
                        return
                    except MembrainRequestError as exc:  # raised below, not wrapped in the task group's group
                        refused.append(exc)
                        return
                    answered = True
                    it = iter(replies)
                    for i in idx:
                        if i in asking:
                            next(it)  # ASKING's +OK
                            del asking[i]
                        r = next(it)
                        red = resp.redirect(r) if isinstance(r, resp.ReplyError) else None
                        if red is not None:
                            self.stats.redirects += 1
                            if red.ask:
                                asking[i] = red.addr
                            else:
                                self._slot_addr[red.slot] = red.addr
                                self._stale = True
                            retry.append(i)
                        elif isinstance(r, resp.ReplyError) and r.code in resp.TRANSIENT_CODES:
                            self._stale = True
                            retry.append(i)
                        else:
                            out[i] = r

                async with anyio.create_task_group() as tg:
                    for addr, idx in groups.items():
                        tg.start_soon(one, addr, idx)
                if refused:
                    raise refused[0]
                pending = sorted(retry)
                if not pending:
                    break
                if not asking:
                    await anyio.sleep(min(0.2, 0.02 * 2**round_))
        if not answered and any(r is UNREACHABLE for r in out):
            raise OSError(f"no node of the Redis Cluster {_seeds(self.endpoint)} answered")
        self.stats.unreachable_keys += sum(1 for r in out if r is UNREACHABLE)
        return out

    # ------------------------------------------------------------------ the store protocol

    async def exists(self, ns: str, keys: list[str]) -> list[bool]:
        rkeys = [redis_key(ns, k) for k in keys]
        replies = await self._execute(rkeys, lambda i: resp.encode("EXISTS", rkeys[i]))
        return [r is not UNREACHABLE and _checked(r) == 1 for r in replies]

    async def lookup(self, ns: str, keys: list[str]) -> int:
        n = 0
        for present in await self.exists(ns, keys):
            if not present:
                break
            n += 1
        return n

    async def get(self, ns: str, keys: list[str]) -> list[memoryview | None]:
        rkeys = [redis_key(ns, k) for k in keys]
        replies = await self._execute(rkeys, lambda i: resp.encode("GET", rkeys[i]))
        out: list[memoryview | None] = []
        for r in replies:
            r = None if r is UNREACHABLE else _checked(r)
            out.append(memoryview(r) if r is not None else None)
        return out

    async def get_into(self, ns: str, keys: list[str], buffers: Sequence[memoryview]) -> list[int]:
        return [copy_into(v, b) for v, b in zip(await self.get(ns, keys), buffers)]

    async def put(self, ns: str, keys: list[str], values: Sequence[PutValue]) -> int:
        rkeys = [redis_key(ns, k) for k in keys]
        replies = await self._execute(rkeys, lambda i: resp.encode_value_command(("SET", rkeys[i]), value_parts(values[i])))
        stored = 0
        full = 0
        for r in replies:
            if isinstance(r, resp.ReplyError) and r.code in resp.FULL_CODES:
                full += 1
            elif r is not UNREACHABLE:
                _checked(r)
                stored += 1
        if full:
            self.stats.refused_full += full
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                log.warning("Redis refused %d write(s): it is full (OOM; maxmemory with noeviction?). Those saves are "
                            "dropped and counted; loads and lookups go on. Set maxmemory-policy allkeys-lru for a cache.",
                            full)
        return stored

    async def delete(self, ns: str, keys: list[str]) -> int:
        rkeys = [redis_key(ns, k) for k in keys]
        replies = await self._execute(rkeys, lambda i: resp.encode("DEL", rkeys[i]))
        return sum(_checked(r) for r in replies if r is not UNREACHABLE)

    async def ping(self) -> bool:
        """Does the store answer (any node, for a cluster)?"""
        addrs = list(self.endpoint.seeds)
        for addr in addrs:
            try:
                (r,) = await self._node_call(addr, [resp.encode("PING")])
            except OSError:
                continue
            if isinstance(r, resp.ReplyError):
                raise _refusal(r, during="PING")
            return True
        return False

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


def _checked(reply):
    if isinstance(reply, resp.ReplyError):
        raise _refusal(reply)
    return reply


def _refusal(err: resp.ReplyError, during: str = "") -> MembrainRequestError:
    """A live server's refusal. Only the error code and Redis's own text: no argument of ours is echoed."""
    code = err.code
    status = 401 if code in ("WRONGPASS", "NOAUTH") else 403 if code == "NOPERM" else 400
    what = f" during {during}" if during else ""
    text = str(err) if code not in ("WRONGPASS", "NOAUTH") else f"{code} (check VLLM_MEMBRAIN_REDIS_USERNAME/PASSWORD)"
    return MembrainRequestError(status, f"redis refused{what}: {text[:200]}")


def _seeds(endpoint: RedisEndpoint) -> str:
    return ",".join(f"{h}:{p}" for h, p in endpoint.seeds)
