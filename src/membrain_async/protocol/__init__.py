"""Wire formats only, sans-IO: bytes in, events out. Shared by the client and the server; no sockets here."""
