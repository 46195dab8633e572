"""The remote tier: the store client (Membrain node(s), Redis, Mooncake: by the endpoint's scheme), made on the loop.

The client reports and never guesses: a server that cannot be reached raises `MembrainUnavailable`, a
refusal `MembrainRequestError`, and only a key the server does not hold is a miss. What unavailable
means for each operation is decided above, in `BlockStore`; this tier only owns the client's life.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..config import ConnectorConfig
from ..scatter import Target

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

    async def get_many_into(self, keys: Sequence[str], buffers: Sequence[Target]) -> list[int]:
        return await self.client.get_many_into(list(keys), list(buffers))

    async def exists(self, keys: Sequence[str]) -> list[bool]:
        return await self.client.exists(list(keys))

    async def put_many(self, keys: Sequence[str], values: Sequence[Any]) -> int:
        return await self.client.put_many(list(keys), list(values))

    async def delete(self, key: str) -> bool:
        return await self.client.delete(key)


def make_client(config: ConnectorConfig):
    """The client for the endpoint's scheme (client/backends.py): Membrain node(s), Redis, Mooncake."""
    from ..client.backends import open_client

    return open_client(config)
