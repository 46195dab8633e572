"""examples/pd_proxy.py's routing, with stand-in instances (httpx's MockTransport): what each instance is
sent, in which order, and what happens when a prefill fails. tests/e2e/test_e2e_pd.py runs it in front of real
vLLM servers."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os

import httpx
import pytest

pytest.importorskip("fastapi")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_proxy():
    spec = importlib.util.spec_from_file_location("pd_proxy", os.path.join(ROOT, "examples", "pd_proxy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pd_proxy = load_proxy()
HANDOFF = {"membrain_handoff": {"blocks": 3, "fingerprint": "fp"}}


class Instances:
    """Stand-in vLLM servers: record every request; prefill instances answer with a hand-off."""

    def __init__(self, prefill_fails: bool = False):
        self.seen: list[tuple[str, dict]] = []
        self.prefill_fails = prefill_fails

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        host = request.url.host
        self.seen.append((host, body))
        if host.startswith("prefill"):
            if self.prefill_fails:
                raise httpx.ConnectError("instance down", request=request)
            return httpx.Response(200, json={"choices": [{"text": "x"}], "kv_transfer_params": HANDOFF})
        return httpx.Response(200, json={"choices": [{"text": f"from {host}"}]})


def ask(app, instances: Instances, body: dict) -> httpx.Response:
    app.state.router.client = httpx.AsyncClient(transport=httpx.MockTransport(instances))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
            return await client.post("/v1/completions", json=body)

    return asyncio.run(go())


def test_a_request_is_prefilled_with_one_token_then_decoded_with_the_prefills_params():
    app = pd_proxy.build_app(["http://prefill-0"], ["http://decode-0"])
    instances = Instances()
    body = {"model": "m", "prompt": "hi", "max_tokens": 12, "stream": False, "stream_options": {"include_usage": True}}
    r = ask(app, instances, body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "from decode-0"
    (p_host, p_body), (d_host, d_body) = instances.seen
    assert p_host == "prefill-0" and p_body["max_tokens"] == 1 and p_body["stream"] is False
    assert "stream_options" not in p_body and p_body["kv_transfer_params"]["do_remote_decode"] is True
    assert d_host == "decode-0" and d_body["kv_transfer_params"] == HANDOFF and d_body["max_tokens"] == 12


def test_a_failed_prefill_costs_time_not_the_request():
    app = pd_proxy.build_app(["http://prefill-0"], ["http://decode-0"])
    instances = Instances(prefill_fails=True)
    r = ask(app, instances, {"model": "m", "prompt": "hi", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "from decode-0"
    assert "kv_transfer_params" not in instances.seen[-1][1]  # the decode instance computes the prompt itself
    assert app.state.router.prefill_failures == 1


def test_round_robin_mode_sends_each_request_whole_to_the_next_instance():
    app = pd_proxy.build_app([], ["http://decode-0", "http://decode-1"])
    instances = Instances()
    texts = [ask(app, instances, {"model": "m", "prompt": "hi", "max_tokens": 4}).json()["choices"][0]["text"]
             for _ in range(3)]
    assert texts == ["from decode-0", "from decode-1", "from decode-0"]
    assert all("kv_transfer_params" not in body for _, body in instances.seen)
