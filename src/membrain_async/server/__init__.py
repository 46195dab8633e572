"""The Membrain server: a bounded store behind an HTTP API and a bulk binary protocol on one port."""

from .app import MembrainServer, serve
from .embed import embedded_server

__all__ = ["MembrainServer", "serve", "embedded_server"]
