"""Operations shared by the HTTP and bulk front ends: validation, auth, store calls, counters.

Every check happens here once, so both protocols refuse the same bad input with the same message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio

from .. import __version__
from ..config import ServerConfig
from ..protocol.bodies import BulkEndpoint, KeysListing, Readiness, ServerInfo, ServerLimits
from ..protocol.names import validate_key, validate_namespace
from .auth import AuthError, Authorizer
from .arena import Slot
from .disk import SPILL_WAIT, DiskTier
from .metrics import RequestObservation, ServerMetrics
from .store import Entry, Store


class RequestError(Exception):
    """Bad input from a client: answered with `status` and `message`, connection kept where framing allows."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServerCounters:
    started_at: float = field(default_factory=time.time)
    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0
    tls_handshake_failures: int = 0


class Service:
    def __init__(self, config: ServerConfig, authorizer: Authorizer | None = None):
        self.config = config
        self.store = Store(config.capacity, policy=config.eviction)
        self.disk: DiskTier | None = None
        if config.disk_path:
            self.disk = DiskTier(config.disk_path, config.disk_capacity, self.store)
            self.store.spill = self.disk.spill
        self.auth = Authorizer(None)
        self.use_authorizer(authorizer or Authorizer.from_file(config.auth_file))
        self.counters = ServerCounters()
        self.metrics = ServerMetrics(self, disk=self.disk is not None)
        if self.disk is not None:
            self.disk.observe_io = self.metrics.observe_disk_io
        self.bound_port: int | None = None

    def use_authorizer(self, auth: Authorizer) -> None:
        """Take these tokens and quotas from now on (start-up, SIGHUP); stored values stay."""
        for ns in set(self.auth.quotas) - set(auth.quotas):
            self.store.clear_quota(ns)
        for ns, share in auth.quotas.items():
            self.store.set_quota(ns, max(1, int(share * self.config.capacity)))
        self.auth = auth

    def readiness(self) -> Readiness:
        """Degraded while the disk tier is off (unusable at start with --allow-degraded, or failed since)."""
        if self.disk is not None and not self.disk.writable:
            return Readiness("degraded", f"disk tier off, serving from RAM only: {self.disk.reason}")
        return Readiness()

    # --- validation -------------------------------------------------------------------------------

    def _ns(self, ns: str | None) -> str:
        try:
            return validate_namespace(ns)  # type: ignore[arg-type]
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None

    def _keys(self, keys: list[str]) -> list[str]:
        if len(keys) > self.config.max_batch_keys:
            raise RequestError(413, f"{len(keys)} keys in one request; the limit is {self.config.max_batch_keys}")
        try:
            for k in keys:
                validate_key(k)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
        return keys

    def _authorize(self, token: str | None, ns: str | None, need: str) -> None:
        try:
            self.auth.check(token, ns, need)
        except AuthError as exc:
            raise RequestError(exc.status, str(exc)) from None

    def check_value_size(self, size: int) -> None:
        if size < 0:
            raise RequestError(400, "negative value size")
        if size > self.config.max_value_bytes:
            raise RequestError(413, f"value of {size} bytes exceeds the limit of {self.config.max_value_bytes}")

    # --- operations -------------------------------------------------------------------------------

    def begin_put(self, token: str | None, ns: str, keys: list[str], sizes: list[int]) -> str:
        """Validate a put before its body is read."""
        ns = self._ns(ns)
        self._keys(keys)
        if len(sizes) != len(keys):
            raise RequestError(400, f"{len(keys)} keys but {len(sizes)} sizes")
        for s in sizes:
            self.check_value_size(s)
        self._authorize(token, ns, "write")
        return ns

    async def alloc_put(self, ns: str, keys: list[str], sizes: list[int]) -> list[Slot | None]:
        """Arena slots for a put's values, evicting for them; None where a value is not stored (refused by
        the admission policy, or no room now): its bytes are then read and dropped. The caller commits or
        aborts every slot."""
        slots: list[Slot | None] = []
        deadline = None if self.disk is None else anyio.current_time() + SPILL_WAIT  # one wait per request
        store = self.store
        pending = 0  # this request's bytes not committed yet: its namespace's quota counts them
        try:
            for key, size in zip(keys, sizes):
                if store.fits(size) and not store.admit(ns, key, size):
                    slots.append(None)
                    continue
                if self.disk is None:
                    slot = store.alloc(size, ns, pending)
                else:
                    slot = await self.disk.alloc(size, deadline, ns, pending)
                if slot is not None:
                    pending += size
                else:
                    if self.store.fits(size):
                        self.store.totals.no_room += 1
                    else:
                        self.store.totals.rejected += 1
                slots.append(slot)
        except BaseException:
            self.abort_put(slots)
            raise
        return slots

    def abort_put(self, slots: list[Slot | None]) -> None:
        for slot in slots:
            if slot is not None:
                self.store.release(slot)

    def commit_put(self, ns: str, keys: list[str], slots: list[Slot | None], sizes: list[int]) -> int:
        stored = 0
        for key, slot, size in zip(keys, slots, sizes):
            if slot is not None:
                self._committed(self.store.commit(ns, key, slot, size)[0])
                stored += 1
        return stored

    def _committed(self, entry: Entry) -> None:
        if self.disk is not None:
            self.disk.queue(entry)

    async def put_values(self, ns: str, keys: list[str], values: list) -> list[bool | None]:
        """Copy values in (the HTTP paths, whose bodies arrive in h11's buffers): created / replaced / not stored."""
        slots = await self.alloc_put(ns, keys, [len(v) for v in values])
        out: list[bool | None] = []
        for key, slot, value in zip(keys, slots, values):
            if slot is None:
                out.append(None)
                continue
            slot.view[: len(value)] = value
            entry, old = self.store.commit(ns, key, slot, len(value))
            self._committed(entry)
            out.append(old is None)
        return out

    async def get_entries(self, token: str | None, ns: str, keys: list[str],
                          obs: RequestObservation | None = None) -> list[Entry | None]:
        """The stored entries (None for a miss), each pinned: its slot cannot be reused until `unpin_all`,
        so a reply can be sent straight from the arena while other requests evict and overwrite."""
        ns = self._ns(ns)
        self._keys(keys)
        self._authorize(token, ns, "read")
        store, disk = self.store, self.disk
        out: list[Entry | None] = [None] * len(keys)
        from_disk: list[int] = []
        for i, k in enumerate(keys):
            entry = store.entry(ns, k)
            if entry is None and disk is not None and (entry := disk.spilled(ns, k)) is not None:
                store.count_hit(entry)
            if entry is not None:
                store.pin(entry)
                out[i] = entry
            elif disk is not None and disk.contains(ns, k):
                from_disk.append(i)
        if from_disk:
            if obs is not None:
                obs.tier = "disk"
            # Neighbouring records in one read each, several reads at once; pinned like the RAM hits.
            try:
                promoted = await disk.promote_many(ns, [keys[i] for i in from_disk])
            except BaseException:
                self.unpin_all(out)
                raise
            for i, entry in zip(from_disk, promoted):
                out[i] = entry
        misses = sum(1 for e in out if e is None)
        if misses:
            store._ns(ns).misses += misses
        self.metrics.count_keys("get", len(keys) - misses, misses)
        return out

    def unpin_all(self, entries: list[Entry | None]) -> None:
        for entry in entries:
            if entry is not None:
                self.store.unpin(entry)

    def lookup(self, token: str | None, ns: str, keys: list[str], obs: RequestObservation | None = None) -> int:
        ns = self._ns(ns)
        self._keys(keys)
        self._authorize(token, ns, "read")
        if self.disk is None:
            n = self.store.prefix_count(ns, keys)
        else:
            n = self.store.prefix_count(ns, keys, also=self.disk.contains)
            # The loads usually follow: start reading the disk-only part of the prefix back into RAM now.
            disk_only = [k for k in keys[:n] if not self.store.contains(ns, k)]
            self.disk.prefetch(ns, disk_only)
            if disk_only and obs is not None:
                obs.tier = "disk"
        self.metrics.count_keys("lookup", n, len(keys) - n)
        return n

    def exists(self, token: str | None, ns: str, keys: list[str], obs: RequestObservation | None = None) -> list[int]:
        ns = self._ns(ns)
        self._keys(keys)
        self._authorize(token, ns, "read")
        store, disk = self.store, self.disk
        present, on_disk_only = [], False
        for k in keys:
            if store.contains(ns, k):
                present.append(1)
            elif disk is not None and disk.contains(ns, k):
                present.append(1)
                on_disk_only = True
            else:
                present.append(0)
        if on_disk_only and obs is not None:
            obs.tier = "disk"
        hits = sum(present)
        self.metrics.count_keys("exists", hits, len(keys) - hits)
        return present

    def list_keys(self, token: str | None, ns: str, limit: int) -> KeysListing:
        """Keys of one namespace, for operators and tests; needs read access to that namespace only."""
        ns = self._ns(ns)
        self._authorize(token, ns, "read")
        keys, truncated = self.store.keys(ns, limit)
        if self.disk is not None and not truncated:  # then what only the disk holds, in no particular order
            held = set(keys)
            for k in self.disk.keys(ns):
                if k not in held:
                    if len(keys) == limit:
                        truncated = True
                        break
                    keys.append(k)
        return KeysListing(keys, truncated)

    def head(self, token: str | None, ns: str, key: str, obs: RequestObservation | None = None) -> int | None:
        ns = self._ns(ns)
        self._keys([key])
        self._authorize(token, ns, "read")
        size = self.store.peek_size(ns, key)
        if size is None and self.disk is not None:
            size = self.disk.size(ns, key)
            if size is not None and obs is not None:
                obs.tier = "disk"
        self.metrics.count_keys("head", int(size is not None), int(size is None))
        return size

    def delete(self, token: str | None, ns: str, keys: list[str]) -> int:
        ns = self._ns(ns)
        self._keys(keys)
        self._authorize(token, ns, "write")
        deleted = 0
        for k in keys:
            here = self.store.delete(ns, k)
            there = self.disk is not None and self.disk.contains(ns, k)
            if self.disk is not None:
                self.disk.delete(ns, k)
            deleted += int(here or there)
        return deleted

    def stats(self, token: str | None) -> dict:
        try:
            visible = self.auth.readable_namespaces(token)
        except AuthError as exc:
            raise RequestError(exc.status, str(exc)) from None
        out = self.store.stats(visible)
        if visible is None:
            out["tiers"] = self.tier_stats()
            c = self.counters
            out["server"] = {
                "uptime_s": round(time.time() - c.started_at, 3),
                "connections_open": c.connections_open,
                "connections_total": c.connections_total,
                "connections_refused": c.connections_refused,
                "tls_handshake_failures": c.tls_handshake_failures,
                **self.metrics.request_totals(),
            }
        return out

    def tier_stats(self) -> dict:
        st = self.store
        ram = {"capacity": st.capacity, "bytes": st.used, "keys": len(st), "hits": st.totals.hits,
               "evictions": st.totals.evictions, "mapped": st.arena.mapped}
        out: dict = {"ram": ram}
        if self.disk is not None:
            d = self.disk.stats_dict()
            out["disk"] = {"bytes": d["used"], **d}
        return out

    def require_server_read(self, token: str | None) -> None:
        self._authorize(token, None, "read")

    def info(self) -> ServerInfo:
        cfg = self.config
        return ServerInfo(
            server="membrain",
            version=__version__,
            capabilities=["memory", "batch", "lookup", "exists", "keys", "bulk", "stats", "metrics"]
            + (["auth"] if self.auth.enabled else []) + (["disk"] if self.disk is not None else []),
            put_existing="overwrite",
            limits=ServerLimits(cfg.capacity, cfg.disk_capacity, cfg.max_value_bytes, cfg.max_batch_keys,
                                cfg.max_connections),
            bulk=BulkEndpoint(self.bound_port, same_port=True),
            auth=self.auth.enabled,
        )
