"""A round-robin proxy in front of OpenAI servers, for the fleet benchmark: requests go to the backends in
turn, responses stream through unchanged (so the client's TTFT is the backend's plus a hop).

    python bench/rr_proxy.py --port P --backend http://127.0.0.1:A --backend http://127.0.0.1:B --log reqs.jsonl

For each completion it appends one JSON line to --log: the request's order, the backend it went to, a
digest of the prompt's first 512 characters (which names the shared prefix in vLLM's prefix_repetition
dataset) and the time from receiving the request to the backend's first chunk. The benchmark classifies
requests from it (first sight of a prefix, a hit on the same instance, a hit on the other) without parsing
the dataset again.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

PREFIX_CHARS = 512


def build(backends: list[str], log_path: str) -> Starlette:
    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=256))
    turn = itertools.count()
    log = open(log_path, "a", buffering=1)

    async def completions(request: Request):
        body = await request.body()
        t0 = time.perf_counter()
        order = next(turn)
        backend = order % len(backends)
        prompt = json.loads(body).get("prompt", "")
        prefix = hashlib.blake2b(str(prompt)[:PREFIX_CHARS].encode(), digest_size=8).hexdigest()
        upstream = client.build_request("POST", backends[backend] + request.url.path, content=body,
                                        headers={"content-type": "application/json"})
        response = await client.send(upstream, stream=True)

        async def relay():
            first = None
            try:
                async for chunk in response.aiter_raw():
                    if first is None:
                        first = time.perf_counter() - t0
                    yield chunk
            finally:
                await response.aclose()
                log.write(json.dumps({"order": order, "backend": backend, "prefix": prefix,
                                      "proxy_ttft_s": first, "status": response.status_code}) + "\n")

        return StreamingResponse(relay(), status_code=response.status_code,
                                 media_type=response.headers.get("content-type"))

    async def passthrough_get(request: Request):
        r = await client.get(backends[0] + request.url.path)
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", passthrough_get), Route("/health", passthrough_get),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", action="append", required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    uvicorn.run(build(a.backend, a.log), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
