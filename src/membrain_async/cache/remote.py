"""The remote tier: the Membrain client (one node, or a cluster for an endpoint list), made on the loop.

The client reports and never guesses: a server that cannot be reached raises `MembrainUnavailable`, a
refusal `MembrainRequestError`, and only a key the server does not hold is a miss. What unavailable
means for each operation is decided above, in `BlockStore`; this tier only owns the client's life.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..config import ConnectorConfig

ClientFactory = Callable[[], Any]


class RemoteTier:
    def __init__(self, factory: ClientFactory):
        self._factory = factory
        self.client: Any = None

    def open(self) -> None:
        """On the loop thread: the client's connections and locks belong to this loop."""
        self.client = self._factory()

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def lookup(self, keys: Sequence[str]) -> int:
        return await self.client.lookup(list(keys))

    async def get_many(self, keys: Sequence[str]) -> list:
        return await self.client.get_many(list(keys))

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        return await self.client.exists(list(keys))

    async def put_many(self, keys: Sequence[str], values: Sequence[Any]) -> int:
        return await self.client.put_many(list(keys), list(values))

    async def delete(self, key: str) -> bool:
        return await self.client.delete(key)


def make_client(config: ConnectorConfig):
    """One node: a MembrainClient. Several (a comma-separated endpoint list): a MembrainCluster.
    `mooncake://master:port`: Mooncake Store (client/mooncake_store.py)."""
    from ..client import CircuitBreaker, MembrainClient
    from ..client.cluster import MembrainCluster
    from ..tls import connector_context

    if config.endpoint[0].startswith("mooncake://"):
        from ..client.mooncake_store import open_mooncake_client

        return open_mooncake_client(config)
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
