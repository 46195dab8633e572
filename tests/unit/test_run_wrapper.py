"""run_with_membrain.sh and `membrain run` set the seed's defaults, keep what is already set, run the command."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULTS = {
    "VLLM_MEMBRAIN_ENABLED": "1",
    "VLLM_MEMBRAIN_ENDPOINT": "http://localhost:9201",
    "VLLM_MEMBRAIN_NAMESPACE": "default",
}
SHOW = [sys.executable, "-c", "import os, json; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('VLLM_')}))"]


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update(extra)
    return env


@pytest.mark.parametrize("launcher", [[os.path.join(ROOT, "run_with_membrain.sh")], [sys.executable, "-m", "membrain_async.cli", "run", "--"]])
def test_defaults_and_respect_for_existing(launcher):
    import json

    out = subprocess.run(launcher + SHOW, env=_clean_env(), capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == DEFAULTS
    out = subprocess.run(launcher + SHOW, env=_clean_env(VLLM_MEMBRAIN_NAMESPACE="tenant-a", VLLM_MEMBRAIN_ENDPOINT="http://10.0.0.5:9201"),
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {**DEFAULTS, "VLLM_MEMBRAIN_NAMESPACE": "tenant-a", "VLLM_MEMBRAIN_ENDPOINT": "http://10.0.0.5:9201"}


def test_exit_status_is_the_commands():
    r = subprocess.run([os.path.join(ROOT, "run_with_membrain.sh"), sys.executable, "-c", "raise SystemExit(7)"])
    assert r.returncode == 7
    r = subprocess.run([sys.executable, "-m", "membrain_async.cli", "run"], capture_output=True, text=True)
    assert r.returncode == 2 and "give a command" in r.stderr
