"""Frozen configuration objects, read from environment variables, vLLM's extra config or CLI flags.

Every setting is declared once, with its env var, flag, default and help text; the table in
docs/configuration.md, `membrain serve --help` and `membrain config` are all generated from these declarations so the
documentation cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping

__all__ = [
    "ConfigError",
    "ServerConfig",
    "ConnectorConfig",
    "parse_size",
    "parse_bool",
    "settings_table",
    "strict_requested",
]


EVICTION_POLICIES = ("adaptive", "lru", "second-sight")  # server/eviction.py implements them
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the setting. `field`: the setting whose value is
    wrong, where one is, so that a caller that knows where the value came from (a config file) can say so."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# Redis's rule (redis.conf: "1k => 1000 bytes, 1kb => 1024 bytes"), case-insensitive, extended to t/tb,
# plus the IEC names, which can only mean powers of 1024.
_SIZE_SUFFIXES = {
    "": 1,
    "b": 1,
    **{letter: 1000**power for power, letter in enumerate("kmgt", start=1)},
    **{letter + tail: 1024**power for power, letter in enumerate("kmgt", start=1) for tail in ("b", "ib")},
}
SIZE_RULE = ("Every size reads as Redis reads it: 1k = 1000, 1kb = 1024 (m, g, t alike), KiB/MiB/GiB/TiB = powers "
             "of 1024, case-insensitive.")
# Below this a store holds too little to be of use; a bare `--capacity 10` (bytes) is a missing unit.
MIN_CAPACITY = 1 << 20
_MAX_EXPONENT = 30  # 1e30 bytes is past every host; a bigger exponent would only cost time to compute
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([a-z]*)")


def parse_size(text: str | int) -> int:
    """'512MiB', '2gb', '1048576' -> bytes (SIZE_RULE)."""
    if isinstance(text, int):
        return text
    m = _SIZE.fullmatch(str(text).strip().lower().replace("_", ""))
    if m is None or m.group(3) not in _SIZE_SUFFIXES:
        raise ValueError(f"not a size: {text!r} (try 1048576, 64MiB, 2GiB). {SIZE_RULE}")
    number, exponent, unit = m.groups()
    if int(exponent or 0) > _MAX_EXPONENT:
        raise ValueError("larger than any memory or disk")
    # Exact arithmetic: no float rounding of large byte counts, and no overflow to infinity.
    return int(Fraction(number) * 10 ** int(exponent or 0) * _SIZE_SUFFIXES[unit])


def parse_int(text: str | int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError("expected an integer") from None


def parse_float(text: str | float) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1/0, true/false)")


def _setting(default: Any, env: str, help: str, parse: Callable[[Any], Any] | None = None, flag: str | None = None,
             shown: Callable[[Any], Any] | None = None):
    """`shown`: how the value may appear in printouts and error messages (secrets and URLs with a password)."""
    return field(default=default, metadata={"env": env, "help": help, "parse": parse, "flag": flag, "shown": shown})


def _hidden(value: Any) -> str:
    return "***" if value else ""


def _redacted_urls(value: Any) -> str:
    from .urls import redact_all

    return redact_all(_parse_list(value))


def _parse_role(text: str) -> str:
    from .vllm.shared.roles import parse_role  # no vLLM import: roles.py is plain Python

    return parse_role(text)


def _parse_list(text: str | list) -> tuple[str, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(str(t).strip() for t in text if str(t).strip())
    return tuple(p.strip() for p in str(text).split(",") if p.strip())


class _Settings:
    """Mixin: build a frozen dataclass from env vars / a mapping / CLI overrides."""

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("env")]  # type: ignore[arg-type]

    @classmethod
    def from_sources(
        cls,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ):
        """Defaults, then environment variables, then explicit overrides (CLI flags, extra config)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in cls.fields():
            raw: Any = dataclasses.MISSING
            if f.metadata["env"] in env:
                raw = env[f.metadata["env"]]
                source = f.metadata["env"]
            if overrides and overrides.get(f.name) is not None:
                raw = overrides[f.name]
                source = f.name
            if raw is dataclasses.MISSING:
                continue
            parse = f.metadata.get("parse")
            try:
                value = values[f.name] = parse(raw) if parse else type(f.default)(raw)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError("must be a finite number")
            except (TypeError, ValueError) as exc:
                shown = f.metadata.get("shown")
                raise ConfigError(f"{source}={shown(raw) if shown else raw!r}: {exc}") from None
        obj = cls(**values)
        obj.validate()  # type: ignore[attr-defined]
        return obj

    def validate(self) -> None:  # overridden
        pass

    def shown(self) -> dict[str, Any]:
        """Every setting as it may be printed: secrets as ***, passwords in URLs redacted."""
        out = {}
        for f in self.fields():
            v = getattr(self, f.name)
            out[f.name] = f.metadata["shown"](v) if f.metadata.get("shown") else (",".join(v) if isinstance(v, tuple) else v)
        return out


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}", name)


@dataclass(frozen=True)
class ServerConfig(_Settings):
    host: str = _setting("127.0.0.1", "MEMBRAIN_HOST", "Address to listen on. Loopback unless told otherwise.")
    port: int = _setting(9201, "MEMBRAIN_PORT", "Port for the HTTP API and the bulk protocol (sniffed on the same port).", parse_int)
    capacity: int = _setting(
        1 << 30, "MEMBRAIN_CAPACITY", "Bytes of values the store may hold; least recently used values are evicted beyond it. "
        "Bookkeeping comes on top: the start-up line states it per key and at capacity. More than the host's memory "
        f"(or the cgroup's limit) is refused, and so is less than 1MiB. {SIZE_RULE}", parse_size
    )
    eviction: str = _setting(
        "adaptive",
        "MEMBRAIN_EVICTION",
        "Which puts the RAM tier stores (eviction is LRU among them): adaptive (admit new keys on second sight "
        "while miniature simulations of both say that wins, else all), lru (admit all), second-sight (always).",
        str,
    )
    max_value_bytes: int = _setting(
        64 << 20, "MEMBRAIN_MAX_VALUE_BYTES", "Largest single value (HTTP body or bulk item) accepted; larger gets 413.", parse_size
    )
    max_batch_keys: int = _setting(1024, "MEMBRAIN_MAX_BATCH_KEYS", "Most keys in one batch or bulk frame.", parse_int)
    max_connections: int = _setting(512, "MEMBRAIN_MAX_CONNECTIONS", "Concurrent client connections; more are closed at once.", parse_int)
    idle_timeout: float = _setting(
        60.0, "MEMBRAIN_IDLE_TIMEOUT", "Seconds a connection may sit idle (or a sender stall mid-request) before it is closed.", parse_float
    )
    auth_file: str = _setting(
        "", "MEMBRAIN_AUTH_FILE", "JSON file of bearer tokens per namespace with read/write scopes. Empty: no auth.", str
    )
    allow_insecure_bind: bool = _setting(
        False,
        "MEMBRAIN_ALLOW_INSECURE_BIND",
        "Allow listening beyond loopback without an auth file (logs a loud warning).",
        parse_bool,
    )
    tls_cert: str = _setting(
        "", "MEMBRAIN_TLS_CERT", "PEM certificate chain: serve HTTPS and TLS bulk on the port. Empty: plain TCP.", str
    )
    tls_key: str = _setting("", "MEMBRAIN_TLS_KEY", "PEM private key for --tls-cert (empty: the key is in the cert file).", str)
    log_level: str = _setting("info", "MEMBRAIN_LOG_LEVEL", f"Server log level: {', '.join(LOG_LEVELS)}.", str)
    disk_path: str = _setting(
        "",
        "MEMBRAIN_DISK_PATH",
        "Directory of the disk tier: values evicted from RAM are written behind to segment files there and read "
        "back on a get; a restart with the same directory serves them again. Empty: RAM only. A directory that "
        "cannot be created or written stops the start (see --allow-degraded).",
        str,
    )
    disk_capacity: int = _setting(
        0, "MEMBRAIN_DISK_CAPACITY", "Bytes the disk tier may use under --disk-path (needed with it); oldest segments are "
        "reclaimed beyond it. More than the file system's free space (plus Membrain's segments already there) is refused.",
        parse_size,
    )
    allow_degraded: bool = _setting(
        False,
        "MEMBRAIN_ALLOW_DEGRADED",
        "Start even when --disk-path cannot be used, serving from RAM only; GET /readyz then answers 503 "
        "\"degraded\" with the reason (as it does whenever the disk tier fails later).",
        parse_bool,
    )
    disk_flush_seconds: float = _setting(
        5.0, "MEMBRAIN_DISK_FLUSH_SECONDS", "Seconds SIGTERM spends writing what RAM holds (and the disk does not) to the disk tier.", parse_float
    )

    def validate(self) -> None:
        if self.capacity < MIN_CAPACITY:
            raise ConfigError(f"capacity must be at least 1MiB, got {self.capacity} bytes (a bare number is bytes: "
                              "add a unit, e.g. 8GiB)", "capacity")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}", "log_level")
        if self.host.startswith("["):
            raise ConfigError(f"host {self.host!r}: give an IPv6 address without brackets, e.g. --host ::1", "host")
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError(f"eviction must be one of {', '.join(EVICTION_POLICIES)}, got {self.eviction!r}", "eviction")
        if self.disk_path and self.disk_capacity < (1 << 20):
            raise ConfigError(
                f"disk_path needs disk_capacity of at least 1MiB (got {self.disk_capacity} bytes): "
                "say how much of the disk Membrain may use, e.g. --disk-capacity 100GiB", "disk_capacity"
            )
        if self.disk_capacity and not self.disk_path:
            raise ConfigError("disk_capacity given without disk_path: name the directory with --disk-path DIR", "disk_capacity")
        if self.disk_flush_seconds < 0:
            raise ConfigError(f"disk_flush_seconds must be >= 0, got {self.disk_flush_seconds}", "disk_flush_seconds")
        _positive("max_value_bytes", self.max_value_bytes)
        _positive("max_batch_keys", self.max_batch_keys)
        _positive("max_connections", self.max_connections)
        _positive("idle_timeout", self.idle_timeout)
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be 0..65535, got {self.port}", "port")
        if self.tls_key and not self.tls_cert:
            raise ConfigError("tls_key given without tls_cert", "tls_key")


@dataclass(frozen=True)
class ConnectorConfig(_Settings):
    enabled: bool = _setting(
        False, "VLLM_MEMBRAIN_ENABLED", "1 switches the Membrain connector on in vLLM with no other flag.", parse_bool
    )
    strict: bool = _setting(
        False,
        "VLLM_MEMBRAIN_STRICT",
        "1: a Membrain setting vLLM cannot use, or a store that does not answer at start-up, stops vLLM's start with "
        "the reason. 0 (the default): vLLM then runs as plain vLLM and logs the reason in one line.",
        parse_bool,
    )
    endpoint: tuple[str, ...] = _setting(
        ("http://localhost:9201",),
        "VLLM_MEMBRAIN_ENDPOINT",
        "Where blocks are stored, by scheme: http(s)://host:port Membrain node(s) (a comma-separated list names a cluster); redis:// or rediss:// (TLS) one Redis/Valkey server; redis+cluster:// (rediss+cluster://) a Redis Cluster's seed node(s); mooncake://master:port a Mooncake Store.",
        _parse_list,
        shown=_redacted_urls,
    )
    namespace: str = _setting(
        "default", "VLLM_MEMBRAIN_NAMESPACE", "Tenant namespace on the server; blocks are shared only within it.", str
    )
    token: str = _setting(
        "", "VLLM_MEMBRAIN_TOKEN", "Bearer token for the namespace, if the server requires one. Printed as `***`.", str, shown=_hidden
    )
    redis_username: str = _setting(
        "", "VLLM_MEMBRAIN_REDIS_USERNAME", "Redis ACL user for redis:// endpoints (empty: the URL's, else the default user).", str
    )
    redis_password: str = _setting(
        "",
        "VLLM_MEMBRAIN_REDIS_PASSWORD",
        "Redis password (AUTH) for redis:// endpoints (empty: the URL's, else none). Printed as `***`; a password in the URL is redacted from logs, errors and `membrain config`.",
        str,
        shown=_hidden,
    )
    tls_ca_file: str = _setting(
        "",
        "VLLM_MEMBRAIN_TLS_CA_FILE",
        "PEM CA bundle trusted for https:// and rediss:// endpoints (empty: the system trust store).",
        str,
    )
    tls_verify: bool = _setting(
        True,
        "VLLM_MEMBRAIN_TLS_VERIFY",
        "Verify the server certificate and host name of https:// and rediss:// endpoints. 0 is for tests only (logs a warning).",
        parse_bool,
    )
    async_backend: str = _setting(
        "asyncio", "VLLM_MEMBRAIN_ASYNC_BACKEND", "Event loop of the Membrain I/O thread: asyncio or trio.", str
    )
    timeout: float = _setting(2.0, "VLLM_MEMBRAIN_TIMEOUT", "Seconds before any single server call is abandoned.", parse_float)
    load_deadline: float = _setting(
        5.0,
        "VLLM_MEMBRAIN_LOAD_DEADLINE",
        "Seconds a worker waits for a load before reporting its blocks as errors (vLLM recomputes them).",
        parse_float,
    )
    lookup_deadline: float = _setting(
        1.0,
        "VLLM_MEMBRAIN_LOOKUP_DEADLINE",
        "Seconds the scheduler keeps a request waiting for its lookup before treating it as a miss.",
        parse_float,
    )
    write_behind_bytes: int = _setting(
        256 << 20,
        "VLLM_MEMBRAIN_WRITE_BEHIND_BYTES",
        "Bytes of saves a worker holds (copied out, awaiting their step's verdict, queued, uploading); saves beyond it are dropped and counted, never waited for.",
        parse_size,
    )
    prefetch_bytes: int = _setting(
        0,
        "VLLM_MEMBRAIN_PREFETCH_BYTES",
        "Bytes of pages a worker may prefetch into staging memory while a request's lookup is pending. 0 (the default): off. Loads receive straight into their own buffers, so staging only adds an allocation and a copy: in the demo, B's first token took 0.30 s with 256 MiB of prefetch and 0.13-0.15 s without. Worth trying where lookups are slow.",
        parse_size,
    )
    load_mode: str = _setting(
        "async",
        "VLLM_MEMBRAIN_LOAD_MODE",
        "async: a hit waits in vLLM's WAITING_FOR_REMOTE_KVS while its pages load, and the batch runs on. sync: pages load inside the step, before the forward (every running request waits).",
        str,
    )
    step_load_bytes: int = _setting(
        256 << 20,
        "VLLM_MEMBRAIN_STEP_LOAD_BYTES",
        "Bytes of pages one step may load into a worker (its in-flight fetches); hits past it wait a step.",
        parse_size,
    )
    batch_bytes: int = _setting(
        16 << 20, "VLLM_MEMBRAIN_BATCH_BYTES", "Target bytes per bulk frame when batching saves.", parse_size
    )
    save_decode: bool = _setting(
        True, "VLLM_MEMBRAIN_SAVE_DECODE", "Also save blocks filled by generated tokens (helps multi-turn chat).", parse_bool
    )
    role: str = _setting(
        "",
        "VLLM_MEMBRAIN_ROLE",
        "vLLM's KV role for Membrain: kv_both (load and save), kv_producer (a prefill instance: saves, never loads), kv_consumer (a decode instance: loads, never saves). Empty: --kv-transfer-config's kv_role, else kv_both. When set it wins over kv_role, and is written into it.",
        _parse_role,
    )
    handoff_deadline: float = _setting(
        5.0,
        "VLLM_MEMBRAIN_HANDOFF_DEADLINE",
        "Seconds a decode request handed off by a prefill instance (its kv_transfer_params) waits for more of the blocks the prefill announced to reach the store; each block that lands restarts it. Past it, the request loads what is there and computes the rest.",
        parse_float,
    )
    replicas: int = _setting(
        1, "VLLM_MEMBRAIN_REPLICAS", "Copies of each block in a cluster (written to the R top nodes, read from the first up).", parse_int
    )
    local_cache_bytes: int = _setting(
        0,
        "VLLM_MEMBRAIN_LOCAL_CACHE_BYTES",
        "Node-local hot tier: bytes of recently loaded or saved pages kept in each worker, checked before the network.",
        parse_size,
    )
    connections: int = _setting(
        16, "VLLM_MEMBRAIN_CONNECTIONS", "Bulk connections per server for payloads (one transfer each); lookups and exists share up to 4 more, pipelined.", parse_int
    )
    device_path_on_cpu: bool = _setting(
        False,
        "VLLM_MEMBRAIN_DEVICE_PATH_ON_CPU",
        "Tests only: move a CPU KV cache's pages the accelerator way (a device buffer, then one copy to or from host memory), so that path's logic runs without a GPU.",
        parse_bool,
    )
    shutdown_drain: float = _setting(
        5.0, "VLLM_MEMBRAIN_SHUTDOWN_DRAIN", "Seconds shutdown spends uploading queued saves before dropping them.", parse_float
    )
    breaker_threshold: int = _setting(
        3, "VLLM_MEMBRAIN_BREAKER_THRESHOLD", "Consecutive connection failures that open the circuit breaker.", parse_int
    )
    breaker_cooldown: float = _setting(
        1.0, "VLLM_MEMBRAIN_BREAKER_COOLDOWN", "Seconds the breaker stays open before one probe call is let through.", parse_float
    )
    # Mooncake Store (a mooncake://master:port endpoint; see client/mooncake_store.py).
    mooncake_metadata_server: str = _setting(
        "",
        "VLLM_MEMBRAIN_MOONCAKE_METADATA_SERVER",
        "Mooncake's metadata server (`http://host:port/metadata`, or `P2PHANDSHAKE`). Empty: the master's built-in HTTP metadata server, `http://<master host>:8080/metadata`.",
        str,
        shown=_redacted_urls,
    )
    mooncake_local_hostname: str = _setting(
        "",
        "VLLM_MEMBRAIN_MOONCAKE_LOCAL_HOSTNAME",
        "Address Mooncake's transfer engine announces for this process. Empty: the local address that routes to the master (127.0.0.1 for a loopback master).",
        str,
    )
    mooncake_global_segment_size: int = _setting(
        0,
        "VLLM_MEMBRAIN_MOONCAKE_GLOBAL_SEGMENT_SIZE",
        "Bytes of this process's memory lent to the Mooncake Store as a segment (in every vLLM process that opens the store). 0: a pure client; the store's memory comes from its own segment processes.",
        parse_size,
    )
    mooncake_local_buffer_size: int = _setting(
        256 << 20,
        "VLLM_MEMBRAIN_MOONCAKE_LOCAL_BUFFER_SIZE",
        "Bytes of Mooncake's registered transfer buffer per process: every put and get passes through it, so it bounds the bytes in flight.",
        parse_size,
    )
    mooncake_protocol: str = _setting(
        "tcp", "VLLM_MEMBRAIN_MOONCAKE_PROTOCOL", "Mooncake transfer protocol: tcp (rdma needs a CUDA/RDMA build of Mooncake).", str
    )
    mooncake_threads: int = _setting(
        4,
        "VLLM_MEMBRAIN_MOONCAKE_THREADS",
        "Worker threads for Mooncake's blocking calls (the event loop never runs them). Twice as many calls that overran VLLM_MEMBRAIN_TIMEOUT may still be running before new calls fail fast.",
        parse_int,
    )

    def validate(self) -> None:
        if self.async_backend not in ("asyncio", "trio"):
            raise ConfigError(f"VLLM_MEMBRAIN_ASYNC_BACKEND must be asyncio or trio, got {self.async_backend!r}")
        if self.load_mode not in ("async", "sync"):
            raise ConfigError(f"VLLM_MEMBRAIN_LOAD_MODE must be async or sync, got {self.load_mode!r}")
        if not self.endpoint:
            raise ConfigError("VLLM_MEMBRAIN_ENDPOINT is empty")
        from .urls import check_endpoint, redact_all, scheme_of

        for url in self.endpoint:
            try:
                check_endpoint(url)
            except ValueError as exc:
                raise ConfigError(f"VLLM_MEMBRAIN_ENDPOINT: {exc}") from None
        if len(self.endpoint) > 1 and any(scheme_of(u) == "mooncake" for u in self.endpoint):
            raise ConfigError(f"VLLM_MEMBRAIN_ENDPOINT: a mooncake:// endpoint stands alone, got {redact_all(self.endpoint)}")
        families = {"redis" if scheme_of(u).startswith("redis") else scheme_of(u).rstrip("s") for u in self.endpoint}
        if len(families) > 1:
            raise ConfigError(f"VLLM_MEMBRAIN_ENDPOINT mixes stores of different kinds: {redact_all(self.endpoint)}")
        if self.replicas > 1 and not scheme_of(self.endpoint[0]).startswith("http"):
            raise ConfigError("VLLM_MEMBRAIN_REPLICAS is for Membrain nodes; Redis Cluster and Mooncake keep their own replicas")
        _positive("mooncake_threads", self.mooncake_threads)
        _positive("mooncake_local_buffer_size", self.mooncake_local_buffer_size)
        for name in ("timeout", "load_deadline", "lookup_deadline", "handoff_deadline", "shutdown_drain", "breaker_cooldown"):
            _positive(name, getattr(self, name))
        _positive("breaker_threshold", self.breaker_threshold)
        _positive("connections", self.connections)
        _positive("replicas", self.replicas)
        if len(set(self.endpoint)) != len(self.endpoint):
            raise ConfigError(f"VLLM_MEMBRAIN_ENDPOINT lists a node twice: {redact_all(self.endpoint)}")
        from .protocol.names import validate_namespace

        try:
            validate_namespace(self.namespace)
        except ValueError as exc:
            raise ConfigError(f"VLLM_MEMBRAIN_NAMESPACE: {exc}") from None

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "ConnectorConfig":
        """kv_connector_extra_config over VLLM_MEMBRAIN_* env vars over defaults."""
        extra = dict(extra or {})
        known = {f.name for f in cls.fields()}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"unknown Membrain settings in kv_connector_extra_config: {unknown}; known: {sorted(known)}")
        return cls.from_sources(overrides=extra)

    def to_extra_config(self) -> dict[str, Any]:
        """Picklable dict for kv_connector_extra_config (travels to EngineCore and workers)."""
        out = {}
        for f in self.fields():
            v = getattr(self, f.name)
            out[f.name] = ",".join(v) if isinstance(v, tuple) else v
        return out


def strict_requested(extra: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """VLLM_MEMBRAIN_STRICT on its own, for when the other settings fail to parse (unreadable: not strict)."""
    env = os.environ if env is None else env
    raw = (extra or {}).get("strict", env.get("VLLM_MEMBRAIN_STRICT", False))
    try:
        return parse_bool(raw)
    except ValueError:
        return False


def settings_table() -> str:
    """The Markdown table of every setting, as docs/configuration.md carries it."""
    rows = ["| env var | CLI flag | default | meaning |", "| --- | --- | --- | --- |"]
    for cls, prefix in ((ServerConfig, "--"), (ConnectorConfig, None)):
        for f in cls.fields():
            default = f.default
            if isinstance(default, tuple):
                default = ",".join(default)
            if f.metadata.get("parse") is parse_size and isinstance(default, int):
                default = _human_size(default)
            flag = f"`{prefix}{f.name.replace('_', '-')}`" if prefix else "(kv_connector_extra_config key `" + f.name + "`)"
            rows.append(f"| `{f.metadata['env']}` | {flag} | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


def _human_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
