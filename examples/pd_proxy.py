"""A prefill/decode router in front of vLLM OpenAI servers that hand KV over through Membrain.

    python examples/pd_proxy.py --port 8000 \
        --prefill http://127.0.0.1:8100 [--prefill ...] --decode http://127.0.0.1:8200 [--decode ...]

Each completion or chat request goes first to a prefill instance (kv_producer) with max_tokens=1 and no
streaming: it computes the prompt's KV and saves its blocks to Membrain. Its response's
`kv_transfer_params` say how many blocks it computed; the request then goes, with those params, to a
decode instance (kv_consumer), which loads the blocks (waiting for uploads still under way) and
generates. The decode instance's response, streamed or not, is the client's. This is the protocol of
vLLM's own P/D proxies (examples/online_serving/disaggregated_serving/): the params are opaque here.

    python examples/pd_proxy.py --port 8000 --instance http://127.0.0.1:8100 --instance http://127.0.0.1:8200

sends each request whole to the next instance instead (no disaggregation): the baseline arms of
bench/pd_bench.py.

Instances are picked round robin. A prefill that fails (the instance is down, or answers an error)
costs time, never the request: the decode instance then computes the prompt itself.

Membrain's side of each instance (see docs/pd.md):
    prefill: VLLM_MEMBRAIN_ENABLED=1 VLLM_MEMBRAIN_ROLE=kv_producer ...
    decode:  VLLM_MEMBRAIN_ENABLED=1 VLLM_MEMBRAIN_ROLE=kv_consumer ...
or the same roles as `kv_role` in an explicit --kv-transfer-config.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

log = logging.getLogger("pd_proxy")

# What a prefill request asks of a KV producer: compute the prompt and hand it off, sample one token.
PREFILL_KV_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False}


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    out = dict(body, max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_KV_PARAMS))
    if "max_completion_tokens" in out:  # chat's newer name for the same limit
        out["max_completion_tokens"] = 1
    out.pop("stream_options", None)
    return out


def decode_body(body: dict[str, Any], handoff: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(body)
    if handoff:
        out["kv_transfer_params"] = handoff
    return out


class Router:
    def __init__(self, prefill: list[str], decode: list[str], timeout: float = 600.0):
        self.prefill = itertools.cycle([u.rstrip("/") for u in prefill]) if prefill else None
        self.decode = itertools.cycle([u.rstrip("/") for u in decode])
        self.decode_urls = [u.rstrip("/") for u in decode]
        self.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None))
        self.prefill_failures = 0

    async def run_prefill(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict | None:
        """The prefill's kv_transfer_params, or None if it failed (the decode instance then computes)."""
        url = next(self.prefill)
        try:
            r = await self.client.post(url + path, json=prefill_body(body), headers=headers)
            if r.status_code == 200:
                return r.json().get("kv_transfer_params")
            log.warning("prefill %s answered %s: decoding without a hand-off", url, r.status_code)
        except httpx.HTTPError as exc:
            log.warning("prefill %s failed (%s): decoding without a hand-off", url, type(exc).__name__)
        self.prefill_failures += 1
        return None

    async def handle(self, path: str, request: Request) -> Response:
        body = await request.json()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-request-id")}
        handoff = await self.run_prefill(path, body, headers) if self.prefill is not None else None
        url = next(self.decode) + path
        payload = decode_body(body, handoff)
        if not body.get("stream"):
            r = await self.client.post(url, json=payload, headers=headers)
            return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))
        upstream = await self.client.send(self.client.build_request("POST", url, json=payload, headers=headers),
                                          stream=True)

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type"))


def build_app(prefill: list[str], decode: list[str]) -> FastAPI:
    router = Router(prefill, decode)
    app = FastAPI()
    app.state.router = router

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.handle("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await router.handle("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models() -> Response:
        r = await router.client.get(router.decode_urls[0] + "/v1/models")
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"prefill_failures": router.prefill_failures})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", action="append", default=[], help="a prefill instance's base URL (repeat)")
    parser.add_argument("--decode", action="append", default=[], help="a decode instance's base URL (repeat)")
    parser.add_argument("--instance", action="append", default=[],
                        help="round robin, no disaggregation: an instance's base URL (repeat; instead of the two above)")
    args = parser.parse_args()
    if args.instance and (args.prefill or args.decode):
        parser.error("--instance (round robin) or --prefill/--decode (disaggregated), not both")
    if not args.instance and not (args.prefill and args.decode):
        parser.error("name --prefill and --decode instances, or --instance ones")
    logging.basicConfig(level=logging.INFO)
    app = build_app([], args.instance) if args.instance else build_app(args.prefill, args.decode)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
