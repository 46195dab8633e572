"""End to end: how a real engine starts when a Membrain setting is unusable.

Without VLLM_MEMBRAIN_STRICT, vLLM runs as plain vLLM (the same tokens as the baseline) and says why in
one ERROR line; with it, vLLM does not start, and the reason is in its output. tests/unit/test_plugin.py
checks the same rules on the engine configuration alone; here the whole engine runs.
"""

from __future__ import annotations

import pytest

from ..harness import Engine, P, engine_env, tokens

pytest.importorskip("vllm")

BAD_ENDPOINT = "http://[::1"  # an IPv6 address without its closing bracket
REASON = f"VLLM_MEMBRAIN_ENDPOINT: '{BAD_ENDPOINT}' is not a valid URL"


def test_a_bad_setting_leaves_vllm_plain_with_one_error_line(model, baseline, logs):
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=BAD_ENDPOINT)
    engine = Engine(model, [{"name": "one", "prompts": [P("x")], "max_tokens": 12}], env, logs, "bad-setting")
    report = engine.phase()
    assert engine.finish() == 0, engine.tail()
    assert tokens(report) == [baseline["x"]]
    said = [line for line in engine.output().splitlines() if "Membrain: not active" in line]
    assert len(said) == 1, said
    assert "ERROR" in said[0] and "vLLM runs as plain vLLM" in said[0] and REASON in said[0], said[0]
    assert "Membrain: active" not in engine.output()


def test_a_bad_setting_with_strict_stops_the_start_and_says_why(model, logs):
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=BAD_ENDPOINT, VLLM_MEMBRAIN_STRICT="1")
    engine = Engine(model, [{"name": "one", "prompts": [P("x")], "max_tokens": 12}], env, logs, "bad-setting-strict")
    with pytest.raises(AssertionError, match="exited"):  # no phase report: the engine never started
        engine.phase()
    assert engine.finish() != 0
    assert f"Membrain: VLLM_MEMBRAIN_STRICT=1, vLLM does not start: {REASON}" in engine.output()
    assert "Membrain: not active" not in engine.output()
