"""The server: one listening socket, each connection sniffed as bulk (magic "MBRN") or HTTP.

Structured concurrency: `MembrainServer.serve()` owns a task group holding the accept loop and every
connection task; cancelling it (SIGTERM, the embedding context manager) closes them all.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import ssl

import anyio

from .. import sockio
from ..config import ConfigError, ServerConfig
from ..protocol import bulk
from ..tls import server_context
from .auth import Authorizer
from .bulk import BulkConnection
from .http import HttpConnection
from .host_fit import check_disk, check_memory
from .service import Service
from .store import memory_line

log = logging.getLogger("membrain.server")

_SNIFF_BYTES = len(bulk.MAGIC)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def limit_malloc_retention() -> None:
    """Make glibc return freed value buffers to the OS at once.

    glibc raises its mmap threshold after large frees, after which big values come from the heap and
    evicted ones stay resident: RSS would drift far above capacity under churn. A fixed threshold keeps
    values >= 64 KiB in their own mappings. Process-wide, so only the standalone server calls it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)
    except OSError:
        pass


def check_bind(config: ServerConfig) -> bool:
    """True where the server would listen beyond loopback without auth; ConfigError unless that is allowed."""
    if _is_loopback(config.host) or config.auth_file:
        return False
    if not config.allow_insecure_bind:
        raise ConfigError(
            f"refusing to listen on {config.host} without --auth-file: KV blocks reveal prompts. "
            "Give an auth file, or pass --allow-insecure-bind if the network is trusted."
        )
    return True


class MembrainServer:
    def __init__(self, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        if check_bind(self.config):
            log.warning(
                "LISTENING ON %s WITHOUT AUTHENTICATION: anyone who can reach this port can read cached prompts",
                self.config.host,
            )
        check_memory(self.config)
        self.service = Service(self.config)
        disk = self.service.disk
        if disk is not None and disk.writable:
            check_disk(self.config)
        elif disk is not None and not self.config.allow_degraded:
            raise ConfigError(f"disk_path {self.config.disk_path}: {disk.reason}. Give a usable directory, or pass "
                              "--allow-degraded to serve from RAM only")
        elif disk is not None:
            log.warning("disk tier: %s; --allow-degraded: serving from RAM only, /readyz says degraded", disk.reason)
        self.port: int | None = None
        self._listener: socket.socket | None = None
        try:
            self.tls = server_context(self.config.tls_cert, self.config.tls_key) if self.config.tls_cert else None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def reload(self) -> bool:
        """SIGHUP: read the auth file and the TLS certificate again, keeping every stored value.

        Both are read before either is used, so a bad new file leaves the server as it was (one error
        line). The new tokens apply to each request from now on (a bulk connection's token is checked on
        every frame), the new certificate to each connection accepted from now on.
        """
        try:
            auth = Authorizer.from_file(self.config.auth_file)
            tls = server_context(self.config.tls_cert, self.config.tls_key) if self.config.tls_cert else None
        except ValueError as exc:
            log.error("reload failed, still serving the previous auth file and certificate: %s", exc)
            return False
        self.service.use_authorizer(auth)
        self.tls = tls
        log.info("reloaded: auth %s, tls %s",
                 f"{self.config.auth_file} ({len(auth.grants or ())} tokens)" if auth.enabled else "off",
                 self.config.tls_cert or "off")
        return True

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def bind(self) -> None:
        """Take the port now, so a port in use or a bad address is an error before anything else starts."""
        if self._listener is None:
            self._listener = self._listen()

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self.config.port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self.service.bound_port = self.port
        return sock

    async def serve(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        self.bind()
        listener, self._listener = self._listener, None
        log.info("membrain serving on %s (capacity %d bytes, auth %s, tls %s)", self.url, self.config.capacity,
                 "on" if self.service.auth.enabled else "off", "on" if self.tls else "off")
        log.info("%s", memory_line(self.config.capacity, self.config.eviction))
        disk = self.service.disk
        if disk is not None:
            log.info("disk tier at %s: %s, capacity %d bytes, %d values reopened", disk.directory, disk.state,
                     disk.capacity, len(disk.index))
        try:
            async with anyio.create_task_group() as tg:
                if disk is not None:
                    tg.start_soon(disk.run, name="membrain-disk-writer")
                task_status.started(self.port)
                while True:
                    await anyio.wait_readable(listener)
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:  # EMFILE and friends: back off instead of spinning
                        log.warning("accept failed: %s", exc)
                        await anyio.sleep(0.05)
                        continue
                    sockio.configure(conn)
                    counters = self.service.counters
                    if counters.connections_open >= self.config.max_connections:
                        counters.connections_refused += 1
                        conn.close()
                        continue
                    tg.start_soon(self._handle, conn)
        finally:
            sockio.close(listener)
            if disk is not None:
                await self._flush_disk(disk)

    async def _flush_disk(self, disk) -> None:
        """Shutdown: write what RAM holds to disk, bounded by --disk-flush-seconds, so a restart serves it."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.config.disk_flush_seconds) as scope:
                written = await disk.flush()
            left = sum(1 for e in self.service.store.entries_lru() if not e.on_disk)
            log.info("disk tier: flushed %d values at shutdown%s", written,
                     f"; {left} values left RAM-only (the flush took its {self.config.disk_flush_seconds} s)"
                     if scope.cancelled_caught else "")
            await disk.close()

    async def _handle(self, conn: socket.socket) -> None:
        counters = self.service.counters
        counters.connections_total += 1
        counters.connections_open += 1
        try:
            if self.tls is not None:
                # TLS first, then the sniff on the decrypted stream: one certificate for both protocols.
                with anyio.move_on_after(self.config.idle_timeout):
                    conn = await sockio.start_tls(conn, self.tls, server_side=True)
                if not isinstance(conn, ssl.SSLSocket):
                    counters.tls_handshake_failures += 1
                    return
            first = bytearray(_SNIFF_BYTES)
            got = 0
            with anyio.move_on_after(self.config.idle_timeout):
                # Read just enough to tell the protocols apart; HTTP methods never start with "MBRN".
                while got < _SNIFF_BYTES:
                    n = await sockio.recv_into(conn, memoryview(first)[got:])
                    if n == 0:
                        break
                    got += n
                    if not bulk.looks_like_bulk(bytes(first[:got])):
                        break
            initial = bytes(first[:got])
            if not initial:
                return
            if bulk.looks_like_bulk(initial) and got == _SNIFF_BYTES:
                await BulkConnection(self.service, conn, initial).run()
            else:
                await HttpConnection(self.service, conn, initial).run()
        except ssl.SSLError:
            counters.tls_handshake_failures += 1  # plain HTTP to a TLS port, an untrusted client, garbage
        except OSError:
            pass  # reset by peer and the like: the connection is simply gone
        except Exception:  # never let one connection take the server down
            log.exception("connection handler failed")
        finally:
            counters.connections_open -= 1
            sockio.close(conn)


async def serve(config: ServerConfig, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    await MembrainServer(config).serve(task_status=task_status)
