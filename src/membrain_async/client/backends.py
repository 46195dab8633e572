"""The store behind an endpoint, chosen by its URL's scheme; every backend has the same calls.

    http://, https://                      Membrain nodes (one: MembrainClient; a list: MembrainCluster)
    redis://, rediss://                    one Redis / Valkey server (rediss: TLS)
    redis+cluster://, rediss+cluster://    a Redis Cluster, discovered from any listed seed
    mooncake://master:port                 a Mooncake Store (client/mooncake_store.py, extra `mooncake`)

Redis goes through `StoreClient` with a `RedisTransport` under it, so timeouts, retries, the circuit
breaker and batch splitting are the very code Membrain nodes use; the cache layer above (checksums, key
tags, write-behind bounds, "unavailable is a miss") does not know which store it talks to.
"""

from __future__ import annotations

from ..config import ConfigError, ConnectorConfig
from ..urls import MOONCAKE_SCHEMES, REDIS_SCHEMES, scheme_of


def backend_of(config: ConnectorConfig) -> str:
    """"membrain" | "redis" | "mooncake" (config validation has checked the schemes agree)."""
    scheme = scheme_of(config.endpoint[0])
    if scheme in REDIS_SCHEMES:
        return "redis"
    if scheme in MOONCAKE_SCHEMES:
        return "mooncake"
    return "membrain"


def open_client(config: ConnectorConfig):
    """The client for the config's endpoint; made on the loop thread that will use it."""
    kind = backend_of(config)
    if kind == "redis":
        return open_redis_client(config)
    if kind == "mooncake":
        try:
            from .mooncake_store import open_mooncake_client
        except ImportError as exc:
            raise ConfigError(
                f"VLLM_MEMBRAIN_ENDPOINT is mooncake:// but the Mooncake backend cannot load ({exc}): "
                "pip install 'membrain-async[mooncake]'"
            ) from None
        return open_mooncake_client(config)
    return open_membrain_client(config)


def open_membrain_client(config: ConnectorConfig):
    from ..tls import connector_context
    from . import CircuitBreaker, MembrainClient
    from .cluster import MembrainCluster

    if len(config.endpoint) > 1 or config.replicas > 1:
        return MembrainCluster(
            config.endpoint,
            namespace=config.namespace,
            token=config.token or None,
            replicas=config.replicas,
            timeout=config.timeout,
            breaker_threshold=config.breaker_threshold,
            breaker_cooldown=config.breaker_cooldown,
            bulk_connections=config.connections,
            tls=connector_context(config),
        )
    return MembrainClient(
        config.endpoint[0],
        namespace=config.namespace,
        token=config.token or None,
        timeout=config.timeout,
        breaker=CircuitBreaker(config.breaker_threshold, config.breaker_cooldown),
        bulk_connections=config.connections,
        tls=connector_context(config),
    )


def redis_transport(config: ConnectorConfig):
    from ..tls import connector_context
    from .redis_store import RedisTransport, parse_endpoint

    try:
        import hiredis  # noqa: F401
    except ImportError:
        raise ConfigError("VLLM_MEMBRAIN_ENDPOINT is a Redis URL but hiredis is not installed: "
                          "pip install 'membrain-async[redis]'") from None
    try:
        endpoint = parse_endpoint(config.endpoint, config.redis_username, config.redis_password)
    except ValueError as exc:
        raise ConfigError(f"VLLM_MEMBRAIN_ENDPOINT: {exc}") from None
    return RedisTransport(endpoint, tls=connector_context(config), connections=config.connections,
                          timeout=config.timeout, breaker_threshold=config.breaker_threshold,
                          breaker_cooldown=config.breaker_cooldown)


def open_redis_client(config: ConnectorConfig):
    from ..urls import redact_all
    from . import CircuitBreaker
    from .node import StoreClient

    return StoreClient(
        redact_all(config.endpoint),
        namespace=config.namespace,
        timeout=config.timeout,
        breaker=CircuitBreaker(config.breaker_threshold, config.breaker_cooldown),
        transport=redis_transport(config),
    )


def probe(config: ConnectorConfig, timeout: float = 1.0) -> tuple[str, bool]:
    """For the start-up line: does a non-Membrain store answer now? (Membrain nodes: plugin.self_check.)
    Returns what to say and whether it answered."""
    import anyio

    if backend_of(config) == "mooncake":
        from urllib.parse import urlsplit

        from .mooncake_store import DEFAULT_MASTER_PORT, accepts

        p = urlsplit(config.endpoint[0])
        if accepts(f"{p.hostname}:{p.port or DEFAULT_MASTER_PORT}", DEFAULT_MASTER_PORT, timeout):
            return "Mooncake master accepts connections", True
        return "Mooncake master unreachable now", False

    async def go() -> bool:
        t = redis_transport(config)
        try:
            with anyio.fail_after(timeout):
                return await t.ping()
        finally:
            t.close()

    # In a thread of its own: vLLM may build its engine config inside a running event loop (the OpenAI server).
    result: list = []

    def run() -> None:
        try:
            result.append(anyio.run(go))
        except Exception as exc:
            result.append(exc)

    import threading

    th = threading.Thread(target=run, name="membrain-probe", daemon=True)
    th.start()
    th.join(timeout + 1.0)
    ok = result[0] if result else TimeoutError("no answer")
    if isinstance(ok, ConfigError):
        raise ok  # a setting, not an outage: hiredis missing, say
    if isinstance(ok, Exception):
        exc = ok  # refusals (auth) and timeouts: say which, never the secret
        return f"Redis unreachable or refusing now ({type(exc).__name__}: {str(exc)[:120]})", False
    if ok:
        return "Redis reachable", True
    return "Redis unreachable now", False
