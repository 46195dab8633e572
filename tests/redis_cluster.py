"""Session fixtures: a real standalone redis-server and a real 3-master + 3-replica Redis Cluster on loopback.

Skipped, with the reason, where Debian's redis-server (or hiredis) is missing; `nox -s tests` installs
redis-server with apt-get when it runs as root.
"""

from __future__ import annotations

import shutil

import pytest

from membrain_async.testing.redis_servers import RedisCluster, RedisServer, unavailable_reason


def _skip_without_redis() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server as a KV cache should run: no persistence, maxmemory with allkeys-lru."""
    _skip_without_redis()
    srv = RedisServer("--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru")
    yield srv
    srv.stop()
    shutil.rmtree(srv.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster():
    """3 masters + 3 replicas, cluster-node-timeout 1000 ms (a killed master's replica takes over in ~2 s)."""
    _skip_without_redis()
    cluster = RedisCluster(3, 1, 1000, "--maxmemory", "128mb", "--maxmemory-policy", "allkeys-lru")
    yield cluster
    cluster.stop()
