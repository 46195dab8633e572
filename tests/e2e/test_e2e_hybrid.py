"""End to end on a hybrid model: vLLM's hybrid KV cache manager stays on with Membrain active.

A Gemma-3-shaped model (5 sliding-window layers : 1 full-attention layer, a 64-token window, so a
300-token prompt really slides) with random weights. Instance A computes and saves every KV unit;
instance B, another process, loads the shared prefix: every block of the full-attention unit, and of each
sliding-window unit only the blocks inside the window before the hit. Tokens equal plain vLLM's, with
HMA on there too. Then stored blocks of every unit are corrupted: vLLM takes a hybrid model's failed loads
per request only (block ids are per group), so the request is recomputed whole, its tokens stay equal,
and what the server holds afterwards equals what the clean instance stored.

What a hit needs of each unit (and that a partial hit is never counted) is unit-tested without an
engine in tests/unit/test_hybrid_policy.py.
"""

from __future__ import annotations

import re

import pytest

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing import tinymodel

from ..harness import BLOCK, PROMPTS, Engine, P, engine_env, tokens
from .test_e2e_never_poison import Live, assert_matches_clean, block_hashes, corrupt, keys_of, payloads, poison_env
from .test_e2e_faults import stored_keys

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

WINDOW = 64
HMA_OFF = "Turning off hybrid kv cache manager"
NAMES = ["a1", "b1"]


def generate_gemma3(out):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=WINDOW, sliding_window_pattern=6,
        max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    Gemma3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tinymodel.build_tokenizer(out, 1024)
    return out


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return str(generate_gemma3(tmp_path_factory.mktemp("gemma3")))


def run(model, phases, env, logs, name):
    engine = Engine(model, phases, env, logs, name)
    reports = [engine.phase() for _ in phases]
    assert engine.finish() == 0, engine.tail()
    reports[-1]["_output"] = engine.output()
    return reports


@pytest.fixture(scope="module")
def server():
    srv = start_subprocess_server({"port": 0, "capacity": "256MiB"})
    yield srv
    srv.stop()


def units_line(output: str) -> str:
    m = re.search(r"Membrain KV units: (.*)", output)
    assert m, "the connector did not log its KV units"
    return m.group(1)


@pytest.fixture(scope="module")
def plain(gemma, logs):
    (report,) = run(gemma, [{"name": "all", "prompts": [P(n) for n in NAMES], "max_tokens": 12}],
                    engine_env(), logs, "gemma-plain")
    return report


@pytest.fixture(scope="module")
def shared(gemma, server, logs):
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=server.url)
    (a,) = run(gemma, [{"name": "a", "prompts": [P("a1")], "max_tokens": 12}], env, logs, "gemma-a")
    (b,) = run(gemma, [{"name": "b", "prompts": [P("b1")], "max_tokens": 12}], env, logs, "gemma-b")
    return a, b


def test_hma_stays_on_with_membrain_active_on_a_sliding_window_model(plain, shared):
    a, b = shared
    for report in (plain, a, b):
        assert HMA_OFF not in report["_output"]
    line = units_line(a["_output"])
    # One full-attention unit and sliding-window units of their own: the hybrid manager's groups.
    assert "full" in line and f"sliding_window(keeps {WINDOW - 1})" in line, line
    assert len(line.split(", ")) > 1


def test_b_loads_the_shared_prefix_with_plain_vllms_tokens(plain, shared):
    a, b = shared
    base = tokens(plain)
    assert tokens(a) == [base[0]]
    assert tokens(b) == [base[1]]
    hit = b["results"][0]["num_cached_tokens"]
    assert hit >= (256 // BLOCK - 1) * BLOCK, hit
    m = b["metrics"]
    assert m["vllm:membrain_hit_tokens"] >= hit
    assert m["vllm:membrain_load_error_blocks"] == 0


def test_sliding_window_units_load_only_the_window_before_the_hit(shared):
    a, b = shared
    units = units_line(b["_output"]).split(", ")
    full_units = sum(1 for u in units if " full " in f" {u} ")
    sliding_units = len(units) - full_units
    hit_blocks = b["results"][0]["num_cached_tokens"] // BLOCK
    loaded = b["metrics"]["vllm:membrain_loaded_blocks"]
    # The window keeps 63 tokens before the next: at most 3 blocks of 32 (2 when the hit is aligned).
    window_blocks = -(-(WINDOW - 1) // BLOCK) + 1
    assert loaded <= full_units * hit_blocks + sliding_units * window_blocks, (loaded, units, hit_blocks)
    assert loaded >= full_units * hit_blocks + sliding_units * 1
    # A saved every unit's blocks (a later hit may end at any block).
    assert a["metrics"]["vllm:membrain_saved_blocks"] >= len(units) * (hit_blocks - 1)


def test_a_failed_load_recomputes_the_request_whole_and_never_poisons_the_store(gemma, plain, logs):
    srv = start_subprocess_server({"port": 0, "capacity": "256MiB"})
    try:
        live = Live(gemma, poison_env(srv.url), logs, "gemma-poison")
        try:
            live.run({"name": "fill", "prompts": [P("a1")], "max_tokens": 12, "settle_s": 1.5})
            clean = payloads(srv.url)
            # The last block of the shared prefix, in every unit: inside every window a hit on it needs.
            shared = block_hashes(gemma, PROMPTS["b1"])
            broken = keys_of(set(stored_keys(srv.url)), shared[7:8])
            assert len(broken) > 1, broken  # one key per KV unit
            corrupt(srv.url, broken)
            r = live.run({"name": "b", "prompts": [P("b1")], "max_tokens": 12, "reset_prefix_cache": True,
                          "settle_s": 3.0})
            assert tokens(r) == [tokens(plain)[1]]
            assert r["delta"]["vllm:membrain_load_errors_corrupt"] >= 1
            assert r["results"][0]["num_cached_tokens"] == 0  # recomputed whole: nothing of the failed load kept
            # The recompute saved the broken blocks again, with the clean instance's bytes; nothing else changed.
            assert_matches_clean(clean, srv.url, must_have=broken)
        finally:
            live.finish()
    finally:
        srv.stop()
