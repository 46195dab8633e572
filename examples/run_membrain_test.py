"""The seed's test script, reworked: run vLLM with Membrain on a prompt twice, in two engine processes.

    python examples/run_membrain_test.py                           # embedded server, generated model
    python examples/run_membrain_test.py --endpoint http://localhost:9201 --model /path/to/model

The first engine computes the prompt and saves its KV blocks; the second, a fresh process, loads them.
It prints each engine's cached-token count and output, and exits non-zero if the outputs differ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing import tinymodel


def engine(model: str, prompt: str, endpoint: str, workdir: str, name: str) -> dict:
    spec = {"model": model, "engine": {"enforce_eager": True, "max_model_len": 4096},
            "phases": [{"name": name, "prompts": [{"text": prompt}], "max_tokens": 16}]}
    path = os.path.join(workdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": endpoint}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out = subprocess.run([sys.executable, "-m", "membrain_async.testing.engine", path], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True).stdout
    return next(json.loads(line) for line in out.splitlines() if line.startswith('{"phase"'))["results"][0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", default=None, help="a running Membrain server (default: start one)")
    ap.add_argument("--model", default=None, help="model path (default: generate a small random one)")
    ap.add_argument("--prompt-words", type=int, default=600)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="membrain-test-")
    model = args.model or str(tinymodel.generate(os.path.join(workdir, "model")))
    prompt = tinymodel.prompt_words(args.prompt_words)
    srv = None if args.endpoint else start_subprocess_server({"port": 0})
    endpoint = args.endpoint or srv.url
    try:
        first = engine(model, prompt, endpoint, workdir, "first")
        second = engine(model, prompt, endpoint, workdir, "second")
    finally:
        if srv:
            srv.stop()
    for name, r in (("first", first), ("second", second)):
        print(f"{name:>6}: {r['num_cached_tokens']:>5} of {r['prompt_tokens']} prompt tokens from Membrain; output {r['tokens']}")
    ok = first["tokens"] == second["tokens"] and second["num_cached_tokens"] > 0
    print("OK: the second engine reused the first one's KV, identical output" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
