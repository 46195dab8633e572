"""Per-namespace bearer tokens with scopes, over HTTP and the bulk path."""

import httpx
import orjson
import pytest

from membrain_async.client import MembrainClient, MembrainRequestError
from membrain_async.server import embedded_server

TOKENS = {
    "tokens": [
        {"token": "alpha-secret-1", "namespaces": ["alpha"], "scope": "readwrite"},
        {"token": "beta-secret-22", "namespaces": ["beta"], "scope": "readwrite"},
        {"token": "alpha-reader-3", "namespaces": ["alpha"], "scope": "read"},
        {"token": "ops-secret-444", "namespaces": ["*"], "scope": "read"},
    ]
}


@pytest.fixture
def auth_server(tmp_path):
    path = tmp_path / "auth.json"
    path.write_bytes(orjson.dumps(TOKENS))
    with embedded_server(auth_file=str(path)) as srv:
        yield srv


def _h(token):
    return {"authorization": f"Bearer {token}"}


def test_http_tokens_and_scopes(auth_server):
    with httpx.Client(base_url=auth_server.url) as c:
        assert c.put("/memory/alpha/k", content=b"secret", headers=_h("alpha-secret-1")).status_code == 201
        assert c.get("/memory/alpha/k").status_code == 401
        assert c.get("/memory/alpha/k", headers=_h("wrong-token-x")).status_code == 401
        r = c.get("/memory/alpha/k", headers=_h("beta-secret-22"))
        assert r.status_code == 403 and b"secret" not in r.content
        assert c.head("/memory/alpha/k", headers=_h("beta-secret-22")).status_code == 403
        assert c.post("/v1/lookup/alpha", content=b'{"keys":["k"]}', headers=_h("beta-secret-22")).status_code == 403
        r = c.get("/v1/keys/alpha", headers=_h("beta-secret-22"))
        assert r.status_code == 403 and b'"k"' not in r.content
        assert c.get("/v1/keys/alpha", headers=_h("alpha-reader-3")).json()["keys"] == ["k"]
        assert c.get("/memory/alpha/k", headers=_h("alpha-reader-3")).content == b"secret"
        assert c.put("/memory/alpha/k2", content=b"x", headers=_h("alpha-reader-3")).status_code == 403
        # Stats: a tenant sees its own namespace only; server-wide metrics need a "*" token.
        stats = c.get("/v1/stats", headers=_h("beta-secret-22")).json()
        assert "alpha" not in stats["namespaces"] and "used" not in stats
        assert c.get("/metrics", headers=_h("beta-secret-22")).status_code == 403
        assert c.get("/metrics", headers=_h("ops-secret-444")).status_code == 200
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200  # probes carry no token


@pytest.mark.anyio
async def test_bulk_path_enforces_tokens(auth_server):
    async with MembrainClient(auth_server.url, namespace="alpha", token="alpha-secret-1") as owner:
        assert await owner.put("k", b"v" * 1000)
        assert bytes(await owner.get("k")) == b"v" * 1000
    async with MembrainClient(auth_server.url, namespace="alpha", token="beta-secret-22") as other:
        with pytest.raises(MembrainRequestError) as exc:
            await other.get("k")
        assert exc.value.status == 403
        with pytest.raises(MembrainRequestError):
            await other.lookup(["k"])
    async with MembrainClient(auth_server.url, namespace="alpha", token="not-a-token") as stranger:
        with pytest.raises(MembrainRequestError) as exc:
            await stranger.get("k")
        assert exc.value.status == 401
