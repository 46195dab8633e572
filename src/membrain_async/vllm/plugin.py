"""vLLM general plugin: registers `MembrainConnector` in every vLLM process and, with
VLLM_MEMBRAIN_ENABLED=1, switches it on with no flag.

Entry point (pyproject): [project.entry-points."vllm.general_plugins"] membrain = "membrain_async.vllm.plugin:register"

vLLM runs `register()` once per process (API server, EngineCore, workers). Activation wraps
`EngineArgs.create_engine_config`, which runs in the first process on both the `LLM(...)` and the
OpenAI-server paths, before the config is pickled to the others. An explicit `--kv-transfer-config`
naming MembrainConnector gets the same set-up (start-up line, server check, CPU cores, memory room) with
or without the variable. Otherwise, with the variable unset or 0, this module registers a connector name
and does nothing else: no thread, no connection.
"""

from __future__ import annotations

import logging
import os

from ..config import ConfigError, ConnectorConfig

CONNECTOR_NAME = "MembrainConnector"
CONNECTOR_MODULE = "membrain_async.vllm.connector"

log = logging.getLogger("membrain.plugin")


class _ForwardToVllm(logging.Handler):
    """Hands our records to vLLM's logger at emit time (vLLM configures its handlers after plugins load)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)


def _route_logs_through_vllm() -> None:
    """Our loggers ('membrain.*') print with vLLM's handler, format and stream."""
    ours = logging.getLogger("membrain")
    if not any(isinstance(h, _ForwardToVllm) for h in ours.handlers):
        ours.addHandler(_ForwardToVllm())
        ours.setLevel(logging.INFO)
        ours.propagate = False


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from . import environ

    _route_logs_through_vllm()
    environ.register()  # no "Unknown vLLM environment variable" for ours; strict mode starts
    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    # Always: activate() also sets up an explicit --kv-transfer-config naming Membrain, and does nothing
    # for an engine that neither names it nor has VLLM_MEMBRAIN_ENABLED=1.
    _install_activation()


def _install_activation() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_membrain", False):
        return

    def create_engine_config(self, *args, **kwargs):
        activate(self)
        return original(self, *args, **kwargs)

    create_engine_config._membrain = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def activate(engine_args) -> bool:
    """Fill in Membrain's kv_transfer_config unless the user chose another, or set up the one the user
    gave; log one line saying what happened."""
    from vllm.config import KVTransferConfig

    explicit = engine_args.kv_transfer_config
    if explicit is not None and explicit.kv_connector == CONNECTOR_NAME:
        return _set_up_explicit(engine_args, explicit)
    if "VLLM_MEMBRAIN_ENABLED" not in os.environ:
        return False
    try:
        config = ConnectorConfig.from_sources()
    except ConfigError as exc:
        log.warning("Membrain: not active: %s", exc)
        return False
    if not config.enabled:
        return False
    if explicit is not None:
        log.warning("Membrain: not active: --kv-transfer-config names %s", explicit.kv_connector)
        return False
    if getattr(engine_args, "kv_offloading_size", None):
        log.warning("Membrain: not active: --kv-offloading-size configures vLLM's own offloading connector")
        return False
    engine_args.kv_transfer_config = KVTransferConfig(
        kv_connector=CONNECTOR_NAME,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role=config.role or "kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config=config.to_extra_config(),
    )
    keep_cpu_cores(engine_args)
    where, infos = self_check(config)
    log.info("Membrain: active%s. %s; %s", _role_note(config.role), where, leave_memory_room(engine_args, config, infos))
    return True


def _set_up_explicit(engine_args, explicit) -> bool:
    """--kv-transfer-config names MembrainConnector: the same set-up as env activation, with the settings
    that engine will read (its kv_connector_extra_config over VLLM_MEMBRAIN_* variables)."""
    try:
        config = ConnectorConfig.from_sources(overrides=dict(explicit.kv_connector_extra_config or {}))
    except ConfigError as exc:
        log.warning("Membrain: --kv-transfer-config names it, but: %s", exc)
        return False
    if explicit.kv_load_failure_policy != "recompute":
        log.warning("Membrain: kv_load_failure_policy=%s: a failed load will fail its request", explicit.kv_load_failure_policy)
    if config.role and config.role != explicit.kv_role:
        # vLLM reads kv_role for its own producer/consumer behaviour: both must say the same.
        log.info("Membrain: VLLM_MEMBRAIN_ROLE=%s replaces kv_role=%s", config.role, explicit.kv_role)
        explicit.kv_role = config.role
    keep_cpu_cores(engine_args)
    where, infos = self_check(config)
    log.info("Membrain: active (explicit --kv-transfer-config%s). %s; %s", _role_note(explicit.kv_role), where,
             leave_memory_room(engine_args, config, infos))
    return True


def _role_note(role: str) -> str:
    return f", role {role}" if role and role != "kv_both" else ""


def _ranks(engine_args) -> int:
    return max(1, int(getattr(engine_args, "tensor_parallel_size", 1) or 1)) * max(
        1, int(getattr(engine_args, "pipeline_parallel_size", 1) or 1))


def leave_memory_room(engine_args, config: ConnectorConfig, infos: dict[str, dict]) -> str:
    """Announce the worker buffers' bound; on CPU with an auto-sized KV cache, leave room for them and a
    local server's capacity (see memory_budget). Returns the start-up line's memory part."""
    from . import memory_budget as mb

    buffers = sum(mb.worker_buffers(config).values())
    line = mb.describe_buffers(config)
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return line
    if getattr(engine_args, "kv_cache_memory_bytes", None) or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return f"{line}; KV cache size set explicitly: leave room for Membrain yourself"
    local = sum(int(info.get("limits", {}).get("capacity", 0)) for url, info in infos.items() if mb.is_local_endpoint(url))
    room = mb.plan_kv_room(engine_args.gpu_memory_utilization, _cpu_worker_memory(), local, buffers, _ranks(engine_args))
    if not room.fits:
        log.warning("Membrain: %s", room.message)
    engine_args.gpu_memory_utilization = room.fraction
    return f"{line}; {room.message}"


def _cpu_worker_memory() -> int:
    """The total vLLM's CPU worker takes its memory fraction of: its memory node's (cgroup-aware), not the host's."""
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        return get_memory_node_info(get_allowed_cpu_list()[0].numa_node).total_memory
    except Exception:  # an older or newer vLLM: the host's memory is the closest figure
        import psutil

        return psutil.virtual_memory().total


def keep_cpu_cores(engine_args) -> None:
    """Keep vLLM-on-CPU's compute cores as they are without a connector.

    vLLM's CPU executor reserves one more core per rank when any kv_transfer_config is set (for NIXL's
    transfer threads in disaggregated prefill). Membrain's I/O thread sleeps in its event loop and needs
    no core of its own, so the reservation would only take compute away: measured on 2 cores, plain vLLM
    was bound to 1 core and vLLM with the connector to 2, which made "plain" look 2x slower. An explicit
    VLLM_CPU_NUM_OF_RESERVED_CPU wins.
    """
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        return
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(_ranks(engine_args))


def self_check(config: ConnectorConfig) -> tuple[str, dict[str, dict]]:
    """One probe of each endpoint, so the start-up log says whether the servers answer.

    Returns the log text and each answering endpoint's /v1/info (capacity, for the memory room).
    """
    import httpx

    from ..tls import connector_context

    from ..client.backends import backend_of, probe
    from ..protocol import api
    from ..urls import redact_all

    where = f"endpoint {redact_all(config.endpoint)}, namespace {config.namespace!r}"
    infos: dict[str, dict] = {}
    if backend_of(config) != "membrain":
        return f"{where}; {probe(config)}", infos
    status = ""
    verify = connector_context(config) or True
    for url in config.endpoint:
        try:
            r = httpx.get(url.rstrip("/") + api.INFO_PATH, timeout=1.0, verify=verify)
            if r.status_code == 200:
                infos[url] = info = r.json()
                status = status or f"server {info.get('server', '?')} {info.get('version', '?')} reachable"
                continue
            r = httpx.get(url.rstrip("/") + api.HEALTHZ_PATH, timeout=1.0, verify=verify)
            status = status or f"server answered {r.status_code}"
        except httpx.HTTPError as exc:
            status = status or (f"server unreachable now ({type(exc).__name__}): requests compute as plain vLLM "
                                "until it answers")
    return f"{where}; {status}", infos
