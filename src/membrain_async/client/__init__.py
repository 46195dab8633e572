"""Async Membrain client (anyio: asyncio or trio)."""

from .breaker import CircuitBreaker
from .errors import MembrainError, MembrainRequestError, MembrainUnavailable
from .node import ClientStats, MembrainClient, StoreClient

__all__ = [
    "CircuitBreaker",
    "ClientStats",
    "MembrainClient",
    "MembrainError",
    "MembrainRequestError",
    "MembrainUnavailable",
    "StoreClient",
]
