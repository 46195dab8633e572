"""Run one real vLLM engine in this process and report what it did, as JSON lines on stdout.

Used by the end-to-end tests, the demo and the benchmarks: each vLLM instance is its own process
(as in production), started with whatever VLLM_MEMBRAIN_* environment the caller chose.

    python -m membrain_async.testing.engine spec.json

spec: {"model": path, "engine": {LLM kwargs}, "phases": [{"name", "prompts": [{"text", "cache_salt"?, "lora"?}],
       "max_tokens", "wait_for_go"?}, ...]}
"lora": {"name", "id", "path"} runs that prompt with the LoRA adapter (the engine needs enable_lora).
"reset_prefix_cache": true empties vLLM's local prefix cache before the phase.
Each phase prints {"phase", "results": [{"tokens", "text", "num_cached_tokens", "ttft_s"}], "metrics"}.
With "wait_for_go", the engine prints {"ready": phase} and waits for a line on stdin before running it,
so a test can act (kill a server, add a node) between phases. "batch": true generates all prompts of the
phase in one call (throughput); the report's "wall_s" is the phase's generation time.
"n": k asks for k sequences per prompt (vLLM wants "temperature" > 0 then; "seed" makes them repeatable). "abort_after_failed_load":
true needs an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): it adds the phase's prompts, steps the
engine until Membrain's scheduler half has seen a failed load, aborts every request, and reports
{"aborted": n, "steps": k} instead of results.
With "interactive": true in the spec, after the listed phases the engine prints {"ready": "interactive"}
and runs each JSON phase it reads from stdin, until "quit" or end of input.
"abort_while_loading_s": s (in-process engine too) adds the prompts, waits until every request waits in
WAITING_FOR_REMOTE_KVS, steps s seconds more, aborts them all and steps until vLLM let their blocks go;
it reports {"aborted", "steps", "still_held", "free_blocks_before", "free_blocks_after"}.
"""

from __future__ import annotations

import json
import sys
import time


_STEP_HISTOGRAMS = ("vllm:iteration_tokens_total", "vllm:time_to_first_token_seconds")


def _metrics(llm) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        for m in llm.get_metrics():
            name = m.name
            if name in _STEP_HISTOGRAMS and hasattr(m, "count"):
                # Count and sum only: steps that ran tokens (and their tokens), first tokens (and their time).
                out[f"{name}_count"] = out.get(f"{name}_count", 0) + m.count
                out[f"{name}_sum"] = out.get(f"{name}_sum", 0) + m.sum
                continue
            if not (name.startswith("vllm:membrain") or "prefix_cache" in name or "cached" in name
                    or "preemption" in name):
                continue
            value = getattr(m, "value", None)
            if value is None:
                continue
            key = name
            labels = getattr(m, "labels", {}) or {}
            if "source" in labels:
                key = f"{name}{{source={labels['source']}}}"
            out[key] = out.get(key, 0) + value
        # The connector's timers are histograms: their total seconds (the `_sum`), as vLLM's reader skips them.
        from prometheus_client import REGISTRY

        for family in REGISTRY.collect():
            if family.name.startswith("vllm:membrain_") and family.type == "histogram":
                out[family.name] = sum(s.value for s in family.samples if s.name.endswith("_sum"))
    except Exception as exc:  # metrics are a report, not a requirement
        out["error"] = str(exc)  # type: ignore[assignment]
    return out


def kv_cache_layout(llm) -> dict:
    """Whether the hybrid KV cache manager is on, and the KV cache groups vLLM made (kind, window, layers).

    The groups live in the engine core: readable here only with VLLM_ENABLE_V1_MULTIPROCESSING=0."""
    vc = llm.llm_engine.vllm_config
    out: dict = {"hma": not vc.scheduler_config.disable_hybrid_kv_cache_manager,
                 "block_size": vc.cache_config.block_size, "dtype": str(vc.model_config.dtype),
                 "prefix_caching": bool(vc.cache_config.enable_prefix_caching)}
    try:
        core = llm.llm_engine.engine_core.engine_core  # in-process engine core only
        config = core.scheduler.kv_cache_config
    except AttributeError:
        out["groups"] = None
        return out
    groups = []
    for g in config.kv_cache_groups:
        spec = g.kv_cache_spec
        kind = type(spec).__name__
        group = {"kind": kind, "layers": len(g.layer_names), "layer_names": list(g.layer_names),
                 "block_size": getattr(spec, "block_size", None)}
        if getattr(spec, "sliding_window", None):
            group["sliding_window"] = spec.sliding_window
        groups.append(group)
    out["groups"] = groups
    out["num_blocks"] = config.num_blocks
    return out


def run(spec: dict) -> None:
    from vllm import LLM

    t0 = time.perf_counter()
    # Stats on: per-request first-token latency and the Prometheus counters we report.
    llm = LLM(model=spec["model"], disable_log_stats=False, **spec.get("engine", {}))
    print(json.dumps({"started_s": time.perf_counter() - t0, "kv_cache": kv_cache_layout(llm)}), flush=True)
    for phase in spec["phases"]:
        if phase.get("wait_for_go"):
            print(json.dumps({"ready": phase["name"]}), flush=True)
            sys.stdin.readline()
        run_phase(llm, phase)
    if spec.get("interactive"):
        # Phases decided on the fly (a chat whose next prompt holds the last answer): one JSON line each.
        print(json.dumps({"ready": "interactive"}), flush=True)
        for line in sys.stdin:
            if not line.strip() or line.strip() == "quit":
                break
            run_phase(llm, json.loads(line))


def run_phase(llm, phase: dict) -> None:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    if phase.get("reset_prefix_cache"):
        # Forget local prefix-cache blocks, so a repeat can only hit through Membrain.
        llm.reset_prefix_cache()
    params = SamplingParams(temperature=phase.get("temperature", 0.0), seed=phase.get("seed"),
                            max_tokens=phase.get("max_tokens", 8), ignore_eos=True, n=phase.get("n", 1))
    prompts = []
    for p in phase["prompts"]:
        prompt = {"prompt": p["text"]}
        if p.get("cache_salt"):
            prompt["cache_salt"] = p["cache_salt"]
        lora = p.get("lora")
        prompts.append((prompt, LoRARequest(lora["name"], lora["id"], lora["path"]) if lora else None))
    results = []
    t_phase = time.perf_counter()
    if phase.get("abort_after_failed_load"):
        print(json.dumps({"phase": phase["name"], **_abort_after_failed_load(llm, prompts, params),
                          "metrics": _metrics(llm)}), flush=True)
        return
    if phase.get("abort_while_loading_s") is not None:
        print(json.dumps({"phase": phase["name"], **_abort_while_loading(llm, prompts, params,
                                                                         phase["abort_while_loading_s"]),
                          "metrics": _metrics(llm)}), flush=True)
        return
    if phase.get("batch"):
        # All prompts at once, as a server under load sees them: for throughput, not per-request latency.
        outs = llm.generate([p for p, _ in prompts], params, use_tqdm=False,
                            lora_request=[lr for _, lr in prompts] if any(lr for _, lr in prompts) else None)
        results = [_result(out, None) for out in outs]
    else:
        for prompt, lora_request in prompts:
            # One prompt at a time: time to first token per request, and a clean order of saves.
            t = time.perf_counter()
            out = llm.generate([prompt], params, use_tqdm=False, lora_request=lora_request)[0]
            results.append(_result(out, time.perf_counter() - t))
    wall = time.perf_counter() - t_phase
    time.sleep(phase.get("settle_s", 0.5))  # let the write-behind queue upload before reporting
    print(json.dumps({"phase": phase["name"], "results": results, "wall_s": wall, "metrics": _metrics(llm)}), flush=True)


def _abort_after_failed_load(llm, prompts, params) -> dict:
    """Abort every request right after the step in which a load failed, before vLLM recomputes it."""
    engine = llm.llm_engine
    connector = engine.engine_core.engine_core.scheduler.connector  # in-process engine only
    ids = [f"abort-{i}" for i in range(len(prompts))]
    for rid, (prompt, lora_request) in zip(ids, prompts):
        engine.add_request(rid, prompt, params, lora_request=lora_request)
    for step in range(1, 500):
        engine.step()
        if connector._scheduler.load_failures:
            engine.abort_request(ids)
            return {"aborted": len(ids), "steps": step}
        time.sleep(0.01)  # the lookup is answered on the runtime thread
    raise RuntimeError("no load failed within 500 steps")


def _abort_while_loading(llm, prompts, params, hold_s: float) -> dict:
    """Abort every request `hold_s` seconds after all of them wait for their async loads, then step until
    vLLM has given their blocks back (a load is reported finished once nothing can write into them)."""
    from vllm.v1.request import RequestStatus

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler  # in-process engine only
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    ids = [f"abort-load-{i}" for i in range(len(prompts))]
    for rid, (prompt, lora_request) in zip(ids, prompts):
        engine.add_request(rid, prompt, params, lora_request=lora_request)
    parked_at, steps = None, 0
    while parked_at is None or time.monotonic() - parked_at < hold_s:
        engine.step()
        steps += 1
        if steps > 5000:
            raise RuntimeError("the requests never waited for remote KV")
        # (vLLM keys its requests by internal ids; this engine runs nothing else meanwhile)
        held = list(scheduler.requests.values())
        if parked_at is None and len(held) == len(ids) and all(
            r.status == RequestStatus.WAITING_FOR_REMOTE_KVS for r in held
        ):
            parked_at = time.monotonic()
        time.sleep(0.01)
    engine.abort_request(ids)
    for _ in range(5000):
        if not scheduler.requests:
            break
        engine.step()
        time.sleep(0.01)
    return {"aborted": len(ids), "steps": steps, "still_held": len(scheduler.requests),
            "free_blocks_before": free_before, "free_blocks_after": pool.get_num_free_blocks()}


def _result(out, latency: float | None) -> dict:
    ttft = getattr(out.metrics, "first_token_latency", None) if out.metrics is not None else None
    return {
        "tokens": list(out.outputs[0].token_ids),
        "all_tokens": [list(o.token_ids) for o in out.outputs],
        "text": out.outputs[0].text,
        "num_cached_tokens": out.num_cached_tokens,
        "prompt_tokens": len(out.prompt_token_ids),
        "ttft_s": ttft,
        "latency_s": latency,
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
