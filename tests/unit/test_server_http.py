"""Every HTTP endpoint of a real server on loopback, and every bad input we promise to refuse cleanly."""

import os
import socket

import httpx
import orjson
import pytest

from membrain_async.protocol import api
from membrain_async.server import embedded_server


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=5) as c:
        yield c


def test_put_get_head_delete(http):
    data = os.urandom(100_000)
    assert http.put("/memory/default/k1", content=data).status_code == 201
    assert http.put("/memory/default/k1", content=data).status_code == 200  # overwrite
    r = http.get("/memory/default/k1")
    assert r.status_code == 200 and r.content == data
    r = http.head("/memory/default/k1")
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(data)
    assert http.delete("/memory/default/k1").status_code == 204
    assert http.get("/memory/default/k1").status_code == 404
    assert http.head("/memory/default/k1").status_code == 404
    assert http.delete("/memory/default/k1").status_code == 404


def test_empty_value(http):
    assert http.put("/memory/default/empty", content=b"").status_code == 201
    r = http.get("/memory/default/empty")
    assert r.status_code == 200 and r.content == b""


def test_batch_lookup_exists(http):
    body = b"".join(api.encode_batch(["a", "b", "c"], [b"1", b"22", b"333"]))
    r = http.post("/v1/batch/put/ns1", content=body)
    assert r.json() == {"stored": 3}
    r = http.post("/v1/batch/get/ns1", content=orjson.dumps({"keys": ["a", "x", "c"]}))
    keys, values = api.decode_batch(r.content)
    assert [None if v is None else bytes(v) for v in values] == [b"1", None, b"333"]
    assert http.post("/v1/lookup/ns1", content=orjson.dumps({"keys": ["a", "b", "x", "c"]})).json() == {"count": 2}
    assert http.post("/v1/exists/ns1", content=orjson.dumps({"keys": ["c", "x"]})).json() == {"present": [1, 0]}
    http.put("/memory/ns2/other", content=b"x")
    assert http.get("/v1/keys/ns1").json() == {"keys": ["b", "a", "c"], "truncated": False}  # most recently used first
    assert http.get("/v1/keys/ns1?limit=2").json() == {"keys": ["b", "a"], "truncated": True}
    assert http.get("/v1/keys/ns2").json()["keys"] == ["other"]


def test_info_stats_metrics_health(http, server):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ok"})
    info = http.get("/v1/info").json()
    assert info["bulk"]["port"] == server.port and "lookup" in info["capabilities"]
    assert info["put_existing"] == "overwrite"
    http.put("/memory/tenant/k", content=b"abc")
    http.get("/memory/tenant/k")
    http.get("/memory/tenant/missing")
    ns = http.get("/v1/stats").json()["namespaces"]["tenant"]
    assert (ns["keys"], ns["bytes"], ns["hits"], ns["misses"]) == (1, 3, 1, 1)
    text = http.get("/metrics").text
    assert 'membrain_namespace_hits_total{namespace="tenant"} 1' in text
    assert 'membrain_tier_bytes{tier="ram"} 3.0' in text


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("GET", "/nowhere", None, 404),
        ("PATCH", "/memory/a/b", b"x", 405),
        ("PUT", "/memory/bad ns/k", b"x", 400),
        ("PUT", "/memory/ns/" + "k" * 600, b"x", 400),
        ("PUT", "/memory/ns/a%2Fb", b"x", 400),
        ("POST", "/v1/lookup/ns", b"not json", 400),
        ("GET", "/v1/keys/ns?limit=0", None, 400),
        ("GET", "/v1/keys/ns?limit=many", None, 400),
        ("POST", "/v1/keys/ns", None, 405),
        ("POST", "/v1/lookup/ns", b'{"keys": "a"}', 400),
        ("POST", "/v1/batch/put/ns", b"\x01", 400),
        ("POST", "/v1/lookup/ns", orjson.dumps({"keys": [f"k{i}" for i in range(300)]}), 413),
        ("PUT", "/memory/ns/big", b"x" * (9 << 20), 413),
    ],
)
def test_bad_input_gets_4xx_with_message(http, method, path, body, status):
    r = http.request(method, path, content=body)
    assert r.status_code == status
    assert r.json()["error"]
    assert http.get("/healthz").status_code == 200  # and the server lives on


def test_garbage_http_and_slow_sender(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"PUT /memory/a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        assert b"413" in s.recv(1000).split(b"\r\n")[0]
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/healthz").status_code == 200


def test_idle_connection_is_closed():
    with embedded_server(idle_timeout=0.3) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"PUT /memory/a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")  # stalls mid-body
            s.settimeout(5)
            assert s.recv(100) == b""  # closed by the server


def test_connection_limit():
    with embedded_server(max_connections=2) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(100).startswith(b"HTTP/1.1 200")
        extra = socket.create_connection(("127.0.0.1", srv.port))
        extra.settimeout(5)
        assert extra.recv(100) == b""
        for s in held + [extra]:
            s.close()


def test_refuses_public_bind_without_auth():
    from membrain_async.config import ConfigError

    with pytest.raises(ConfigError, match="auth-file"):
        with embedded_server(host="0.0.0.0"):
            pass
