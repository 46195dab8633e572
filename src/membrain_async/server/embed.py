"""Start a Membrain server from Python: in this process (own thread and loop) or as a subprocess.

    with embedded_server(capacity="256MiB") as srv:        # thread mode
        print(srv.url)
    with embedded_server(mode="subprocess") as srv:        # own process: no GIL shared with the caller
        ...

Port 0 (the default here) picks a free port; `srv.url` says which.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import orjson

from ..config import ServerConfig


@dataclass
class ServerHandle:
    url: str
    port: int
    host: str
    process: subprocess.Popen | None = None
    server: Any = None  # MembrainServer in thread mode (tests read its store)
    _stop: Any = None

    def stop(self) -> None:
        if self._stop is not None:
            stop, self._stop = self._stop, None
            stop()

    def kill(self) -> None:
        """Subprocess mode: SIGKILL, as a crash would. Thread mode: same as stop()."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self._stop = None
        else:
            self.stop()


def _config(overrides: dict[str, Any]) -> ServerConfig:
    overrides = {"port": 0, **overrides}
    return ServerConfig.from_sources(env={}, overrides=overrides)


@contextlib.contextmanager
def embedded_server(mode: str = "thread", backend: str = "asyncio", **overrides: Any) -> Iterator[ServerHandle]:
    if mode == "thread":
        with _thread_server(backend, overrides) as handle:
            yield handle
    elif mode == "subprocess":
        with _subprocess_server(overrides) as handle:
            yield handle
    else:
        raise ValueError("mode must be 'thread' or 'subprocess'")


@contextlib.contextmanager
def _thread_server(backend: str, overrides: dict[str, Any]) -> Iterator[ServerHandle]:
    from anyio.from_thread import start_blocking_portal

    from .app import MembrainServer

    server = MembrainServer(_config(overrides))
    with start_blocking_portal(backend) as portal:
        future, port = portal.start_task(server.serve, name="membrain-server")
        lock = threading.Lock()

        def stop() -> None:
            with lock:
                if not future.done():
                    portal.call(_cancel, future)

        handle = ServerHandle(server.url, port, server.config.host, server=server, _stop=stop)
        try:
            yield handle
        finally:
            handle.stop()


async def _cancel(future) -> None:
    future.cancel()


def server_command(overrides: dict[str, Any]) -> list[str]:
    cmd = [sys.executable, "-m", "membrain_async.cli", "serve", "--announce"]
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                cmd.append(flag)
        else:
            cmd += [flag, str(value)]
    return cmd


@contextlib.contextmanager
def _subprocess_server(overrides: dict[str, Any]) -> Iterator[ServerHandle]:
    overrides = {"port": 0, **overrides}
    handle = start_subprocess_server(overrides)
    try:
        yield handle
    finally:
        handle.stop()


def start_subprocess_server(overrides: dict[str, Any], log_path: str | None = None) -> ServerHandle:
    """Start `membrain serve` and wait for its announcement line (the bound port)."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        server_command(overrides),
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"membrain serve exited with {proc.returncode} before announcing its port")
    info = orjson.loads(line)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()

    return ServerHandle(info["url"], info["port"], info["host"], process=proc, _stop=stop)
