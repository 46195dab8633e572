import os

import pytest

from membrain_async.server import embedded_server

from .e2e_fixtures import baseline, e2e_server, logs, model, other_model, reliability  # noqa: F401  (session fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    """Tests live in folders by tier: tests/unit starts no vLLM engine (nox -s unit), tests/e2e does (marker
    `vllm`, given here to every test there). The full model matrix (marker `matrix`) is long: only `-m`
    naming it, or MEMBRAIN_MATRIX=1, runs it."""
    for item in items:
        tier = os.path.basename(os.path.dirname(str(item.path)))
        if tier == "e2e":
            item.add_marker("vllm")
        elif tier == "unit" and item.get_closest_marker("vllm") is not None:
            raise pytest.UsageError(f"{item.nodeid} starts an engine: it belongs in tests/e2e")
    markexpr = config.option.markexpr or ""
    skipped = set()
    if not (os.environ.get("MEMBRAIN_MATRIX") == "1" or "matrix" in markexpr):
        skipped.add("matrix")
    drop = [item for item in items if any(item.get_closest_marker(m) for m in skipped)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item not in drop]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture
def server():
    """A real Membrain server on a free loopback port, in this process (its own thread and loop)."""
    with embedded_server(capacity="64MiB", max_value_bytes="8MiB", max_batch_keys=256) as srv:
        yield srv


@pytest.fixture
def server_proc():
    """A real `membrain serve` subprocess."""
    with embedded_server(mode="subprocess", capacity="64MiB") as srv:
        yield srv
from .redis_cluster import redis_cluster, redis_server  # noqa: E402,F401  (session fixtures)
