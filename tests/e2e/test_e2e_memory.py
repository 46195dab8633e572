"""Memory accounted for: vLLM's own benchmark client against an OpenAI server whose KV cache vLLM sizes
itself (no VLLM_CPU_KVCACHE_SPACE), loading through a Membrain server on the same host.

Without Membrain's room, vLLM's CPU auto-size gave the worker 21.7 of 23.5 GiB and the host ran out of
memory once the server filled up (23 of 24 requests failed, the worker OOM-killed). Now the start-up
line announces the worker buffers' bound and the room left for the local server; every request must
complete, the server stay within its capacity, and the worker grow by no more than its announced buffers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from membrain_async.server.embed import start_subprocess_server

from ..harness import engine_env, proc_status
from .test_e2e_vllm import free_port

pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.vllm

CAPACITY = 2 << 30
BENCH = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
if __name__ == "__main__":
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
"""


def test_vllms_benchmark_client_with_default_kv_sizing_and_a_local_server(model, logs, tmp_path):
    srv = start_subprocess_server({"port": 0, "capacity": str(CAPACITY)})
    port = free_port()
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=srv.url)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM's default: size the KV cache from the host's memory
    log_path = os.path.join(logs, "bench-client-server.log")
    log = open(log_path, "w")
    api = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
         "--dtype", "bfloat16", "--enforce-eager", "--block-size", "32", "--max-model-len", "4096",
         "--no-enable-log-requests"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 600
        while True:
            assert api.poll() is None, open(log_path).read()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "the OpenAI server did not start"
            time.sleep(2)
        text = open(log_path).read()
        (line,) = [ln for ln in text.splitlines() if "Membrain: active" in ln]
        buffers = float(re.search(r"worker buffers at most (\d+) MiB", line).group(1)) * (1 << 20)
        assert re.search(r"memory fraction [\d.]+ -> [\d.]+", line), line
        assert "local server capacity 2.0 GiB" in line, line
        worker = max(psutil.Process(api.pid).children(recursive=True), key=lambda p: p.memory_info().rss)
        worker_start = worker.memory_info().rss

        result_dir = str(tmp_path)
        bench = subprocess.run(
            [sys.executable, "-c", BENCH, "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
             "--model", model, "--tokenizer", model, "--dataset-name", "prefix_repetition",
             "--prefix-repetition-prefix-len", "2048", "--prefix-repetition-suffix-len", "128",
             "--prefix-repetition-num-prefixes", "12", "--prefix-repetition-output-len", "16",
             "--num-prompts", "24", "--request-rate", "2", "--seed", "0", "--save-result",
             "--result-dir", result_dir, "--result-filename", "bench.json"],
            env=env, capture_output=True, text=True, timeout=900)
        assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
        result = json.load(open(os.path.join(result_dir, "bench.json")))
        assert result["completed"] == 24 and result.get("failed", 0) == 0, result
        assert api.poll() is None, "the OpenAI server died"
        # The local server within its own bound, the worker within its announced buffers.
        assert proc_status(srv.process.pid, "VmHWM") <= CAPACITY * 1.1 + (64 << 20)
        grown = proc_status(worker.pid, "VmHWM") - worker_start
        assert grown <= buffers, f"the worker grew {grown >> 20} MiB, more than its announced {buffers / (1 << 20):.0f} MiB"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        # One instance: the repeats hit vLLM's own prefix cache; what it computed filled the Membrain server.
        assert re.search(r"vllm:membrain_uploaded_blocks_total\{[^}]*\} [1-9]", metrics), "nothing was saved to Membrain"
    finally:
        api.terminate()
        try:
            api.wait(60)
        except subprocess.TimeoutExpired:
            api.kill()
        log.close()
        srv.stop()
