"""TLS on the HTTP API and the bulk path: one certificate for the port, clients verify by default."""

import socket
import ssl

import httpx
import pytest

from membrain_async.client import MembrainClient, MembrainUnavailable
from membrain_async.config import ConnectorConfig
from membrain_async.cache import BlockStore
from membrain_async.server import embedded_server
from membrain_async.testing.certs import make_certs
from membrain_async.tls import client_context


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_server(certs):
    with embedded_server(tls_cert=certs.cert_file, tls_key=certs.key_file) as srv:
        yield srv


@pytest.mark.anyio
async def test_bulk_and_http_over_tls_with_a_verified_certificate(tls_server, certs):
    assert tls_server.url.startswith("https://127.0.0.1:")
    payload = bytes(range(256)) * 4096  # 1 MiB: many TLS records per frame
    async with MembrainClient(tls_server.url, tls=client_context(certs.ca_file)) as c:
        assert (await c.info())["capabilities"]  # HTTP over TLS
        assert await c.put_many(["a", "b"], [payload, payload[::-1]]) == 2  # bulk over TLS
        got = await c.get_many(["a", "b", "nope"])
        assert bytes(got[0]) == payload and bytes(got[1]) == payload[::-1] and got[2] is None
        assert await c.lookup(["a", "b", "nope"]) == 2
        assert c._mode == "bulk" and c.stats.failures == 0


@pytest.mark.anyio
async def test_client_refuses_an_unverified_certificate(tls_server):
    # The system trust store does not know the test CA: every call fails closed, as unavailable.
    async with MembrainClient(tls_server.url, retries=0) as c:
        with pytest.raises(MembrainUnavailable, match="CERTIFICATE_VERIFY_FAILED|SSLCertVerificationError"):
            await c.info()
        with pytest.raises(MembrainUnavailable):
            await c.get_many(["a"])
    stats = httpx.get(f"{tls_server.url}/v1/stats", verify=False).json()
    assert stats["server"]["tls_handshake_failures"] >= 1


def test_plaintext_to_a_tls_port_gets_nothing(tls_server):
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=5) as s:
        s.sendall(b"GET /v1/stats HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except OSError:
            pass
    assert b"namespaces" not in data and not data.startswith(b"HTTP/1.1 200")


def test_wrong_host_name_is_refused(tls_server, certs):
    url = tls_server.url.replace("127.0.0.1", "127.0.0.2")  # not in the certificate's names
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", verify=client_context(certs.ca_file))


def test_runtime_with_connector_settings_over_tls(tls_server, certs):
    config = ConnectorConfig.from_sources(env={}, overrides={
        "endpoint": tls_server.url, "tls_ca_file": certs.ca_file, "namespace": "tls-test",
    })
    rt = BlockStore(config)
    try:
        value = b"k" * 300_000
        assert rt.save("k1", [value]) and rt.save("k2", [value])
        assert rt.flush(timeout=10)
        lookup = rt.lookup(["k1", "k2", "k3"])
        assert lookup.wait(10) and lookup.result() == 2
        fetch = rt.fetch(["k1", "k2"])
        assert fetch.wait(10) and [bytes(v) for v in fetch.result()] == [value, value]
    finally:
        rt.close()


def test_bad_certificate_paths_are_config_errors(tmp_path):
    from membrain_async.config import ConfigError
    from membrain_async.server.app import MembrainServer
    from membrain_async.config import ServerConfig

    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        MembrainServer(ServerConfig(tls_cert=str(tmp_path / "missing.pem")))
    with pytest.raises(ValueError, match="cannot load TLS CA file"):
        client_context(str(tmp_path / "missing-ca.pem"))
    assert isinstance(client_context(verify=False), ssl.SSLContext)
