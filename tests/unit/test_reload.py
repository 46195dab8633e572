"""SIGHUP: a real `membrain serve` reads its auth file and TLS certificate again and keeps every stored block."""

import json
import os
import signal
import socket
import ssl
import subprocess
import time

import anyio
import httpx
import pytest

from membrain_async.client import MembrainClient, MembrainError
from membrain_async.server.embed import server_command
from membrain_async.testing.certs import make_certs

OLD, NEW = "old-token-0123456789", "new-token-9876543210"


def _replace(path, text: str) -> None:
    """Swap the file in one rename, as kubelet and cert-manager do."""
    tmp = f"{path}.new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _auth(*tokens: str) -> str:
    return json.dumps({"tokens": [{"token": t, "namespaces": ["team"], "scope": "readwrite"} for t in tokens]})


class Served:
    """`membrain serve` with its log in a file, so a test can wait for the line a SIGHUP leads to."""

    def __init__(self, tmp_path, **flags):
        self.log = tmp_path / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(server_command({"port": 0, **flags}), stdout=subprocess.PIPE, stderr=log,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        assert line, f"membrain serve exited: {self.log.read_text()}"
        self.url, self.port = json.loads(line)["url"], json.loads(line)["port"]

    def reload_lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "reload" in line]

    def hup(self) -> str:
        """Send SIGHUP and return the one log line it produced."""
        before = len(self.reload_lines())
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60  # a guard against a hang, not a measurement
        while len(self.reload_lines()) == before:
            assert self.proc.poll() is None, "SIGHUP ended the server"
            assert time.monotonic() < deadline, "no reload line after SIGHUP"
            time.sleep(0.05)
        lines = self.reload_lines()[before:]
        assert len(lines) == 1, lines
        return lines[0]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0
        self.proc.stdout.close()


@pytest.fixture
def auth_server(tmp_path):
    auth = tmp_path / "auth.json"
    auth.write_text(_auth(OLD))
    srv = Served(tmp_path, auth_file=str(auth))
    yield srv
    srv.stop()


@pytest.fixture
def tls_server(tmp_path):
    (tmp_path / "first").mkdir()
    certs = make_certs(tmp_path / "first")
    srv = Served(tmp_path, tls_cert=certs.cert_file, tls_key=certs.key_file)
    yield srv
    srv.stop()


def _status(url: str, token: str, **kw) -> int:
    return httpx.get(f"{url}/memory/team/block", headers={"authorization": f"Bearer {token}"}, **kw).status_code


def test_a_rotated_token_applies_after_sighup_and_the_block_stays(auth_server, tmp_path):
    served = auth_server
    block = os.urandom(200_000)
    put = httpx.put(f"{served.url}/memory/team/block", content=block, headers={"authorization": f"Bearer {OLD}"})
    assert put.status_code == 201

    async def bulk_session():
        async with MembrainClient(served.url, namespace="team", token=OLD, retries=0) as c:
            assert bytes((await c.get_many(["block"]))[0]) == block
            _replace(tmp_path / "auth.json", _auth(NEW))
            assert _status(served.url, NEW) == 401  # the file alone changes nothing: no watching, no surprise
            assert "reloaded: auth" in served.hup()
            with pytest.raises(MembrainError, match="unknown token"):
                await c.get_many(["block"])  # a connection opened with the old token: refused on its next frame

    anyio.run(bulk_session)
    assert _status(served.url, OLD) == 401
    got = httpx.get(f"{served.url}/memory/team/block", headers={"authorization": f"Bearer {NEW}"})
    assert got.status_code == 200 and got.content == block

    # A broken file: one error line, and the server keeps the tokens it had.
    _replace(tmp_path / "auth.json", '{"tokens": [')
    line = served.hup()
    assert "ERROR" in line and "reload failed" in line and "cannot read auth file" in line
    assert _status(served.url, NEW) == 200 and _status(served.url, OLD) == 401


def _served_certificate(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # we compare the certificate itself
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


def _der(pem_file) -> bytes:
    return ssl.PEM_cert_to_DER_cert(open(pem_file).read())


def test_a_rotated_certificate_serves_new_connections_after_sighup_and_the_block_stays(tls_server, tmp_path):
    served = tls_server
    first = tmp_path / "first"
    assert _served_certificate(served.port) == _der(first / "server.pem")
    block = os.urandom(100_000)
    verify = ssl.create_default_context(cafile=str(first / "ca.pem"))
    assert httpx.put(f"{served.url}/memory/default/block", content=block, verify=verify).status_code == 201

    (tmp_path / "second").mkdir()
    second = make_certs(tmp_path / "second")  # a new CA too: nothing of the old certificate is left
    _replace(first / "server.pem", open(second.cert_file).read())
    _replace(first / "server.key", open(second.key_file).read())
    assert "reloaded" in served.hup()
    assert _served_certificate(served.port) == _der(second.cert_file)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{served.url}/healthz", verify=verify)  # the old CA no longer vouches for the server
    got = httpx.get(f"{served.url}/memory/default/block", verify=ssl.create_default_context(cafile=second.ca_file))
    assert got.status_code == 200 and got.content == block

    # A key that does not match the certificate: one error line, the second certificate stays.
    _replace(first / "server.key", open(tmp_path / "first" / "ca.pem").read())
    line = served.hup()
    assert "ERROR" in line and "reload failed" in line and "cannot load TLS certificate" in line
    assert _served_certificate(served.port) == _der(second.cert_file)


def test_a_reloaded_auth_file_replaces_the_quotas(tmp_path):
    from membrain_async.config import ServerConfig
    from membrain_async.server.auth import Authorizer
    from membrain_async.server.service import Service

    def authorizer(quotas: dict[str, str]) -> Authorizer:
        path = tmp_path / "auth.json"
        path.write_text(json.dumps({"tokens": [{"token": f"token-of-{ns}", "namespaces": [ns], "quota": q}
                                               for ns, q in quotas.items()]}))
        return Authorizer.from_file(str(path))

    svc = Service(ServerConfig(capacity=1 << 20), authorizer({"team": "50%", "kept": "50%"}))
    assert svc.store.quotas == {"team": 1 << 19, "kept": 1 << 19}
    svc.use_authorizer(authorizer({"kept": "25%", "other": "25%"}))
    assert svc.store.quotas == {"kept": 1 << 18, "other": 1 << 18}
