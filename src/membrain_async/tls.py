"""TLS contexts for the server and the client; both protocols (HTTP and bulk) share them.

The server terminates TLS itself, before it sniffs HTTP from bulk, so one certificate covers the port.
Clients verify the server's certificate and host name by default (system trust store, or the CA file
given); turning verification off is an explicit, logged choice.
"""

from __future__ import annotations

import logging
import ssl

log = logging.getLogger("membrain.tls")


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS certificate {cert_file!r} / key {key_file!r}: {exc}") from None
    return ctx


def client_context(ca_file: str = "", verify: bool = True) -> ssl.SSLContext:
    """Verifying context (CA file, else the system store); `verify=False` accepts any certificate."""
    if not verify:
        log.warning("TLS CERTIFICATE VERIFICATION IS OFF: a man in the middle can read and change cached KV blocks")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS CA file {ca_file!r}: {exc}") from None


def connector_context(config) -> ssl.SSLContext | None:
    """The client context a ConnectorConfig asks for; None when no endpoint is https:// or rediss://."""
    if not any(url.startswith(("https://", "rediss://", "rediss+cluster://")) for url in config.endpoint):
        return None
    return client_context(config.tls_ca_file, config.tls_verify)
