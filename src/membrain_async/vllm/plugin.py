"""vLLM general plugin: registers `MembrainConnector` in every vLLM process and, with
VLLM_MEMBRAIN_ENABLED=1, switches it on with no flag; an explicit --kv-transfer-config naming it gets the
same set-up (start-up line, server check, memory room, CPU cores).

Entry point (pyproject): [project.entry-points."vllm.general_plugins"] membrain = "membrain_async.vllm.plugin:register"

vLLM runs `register()` once per process (API server, EngineCore, workers). Activation wraps
`EngineArgs.create_engine_config`, which runs in the first process on both the `LLM(...)` and the
OpenAI-server paths, before the config is pickled to the others. With the variable unset or 0 and no
explicit config naming Membrain, this module registers a connector name and does nothing else: no
thread, no connection.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..config import ConfigError, ConnectorConfig, parse_bool, strict_requested
from .. import thread_cpus

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

    # The CPUs vLLM was given, which Membrain's threads run on (thread_cpus.py: OpenMP pins a worker's main thread).
    thread_cpus.remember_process_cpus()
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


class MembrainStartError(RuntimeError):
    """VLLM_MEMBRAIN_STRICT=1 and Membrain cannot be used: vLLM does not start."""


def _enabled_by_env() -> bool:
    """VLLM_MEMBRAIN_ENABLED asks for Membrain; a value that is not a boolean counts as asking, so that
    activation reports the mistake (once, in the process that builds the config)."""
    raw = os.environ.get("VLLM_MEMBRAIN_ENABLED")
    if raw is None:
        return False
    try:
        return parse_bool(raw)
    except ValueError:
        return True


def activate(engine_args) -> bool:
    """Fill in Membrain's kv_transfer_config unless the user chose another, or set up the one the user
    gave (the same set-up as env activation); log one line saying what happened.

    Nothing Membrain gets wrong stops vLLM: a bad setting, an unreachable store or a failure of this code
    leaves the engine arguments as they were, and vLLM runs as plain vLLM after one ERROR line saying
    why, unless VLLM_MEMBRAIN_STRICT=1 asks for the start to stop instead.
    """
    explicit = engine_args.kv_transfer_config
    if explicit is not None and explicit.kv_connector != CONNECTOR_NAME:
        if _enabled_by_env():
            log.warning("Membrain: not active: --kv-transfer-config names %s", explicit.kv_connector)
        return False
    if explicit is None:
        if not _enabled_by_env():
            return False
        if getattr(engine_args, "kv_offloading_size", None):
            log.warning("Membrain: not active: --kv-offloading-size configures vLLM's own offloading connector")
            return False
    extra = explicit.kv_connector_extra_config if explicit is not None else None
    saved = (engine_args.gpu_memory_utilization, os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"))
    try:
        return _activate(engine_args, ConnectorConfig.from_extra_config(extra))
    except Exception as exc:
        reason = str(exc) if isinstance(exc, (ConfigError, MembrainStartError)) else f"{type(exc).__name__}: {exc}"
        _restore(engine_args, *saved)
        if strict_requested(extra):
            log.error("Membrain: VLLM_MEMBRAIN_STRICT=1, vLLM does not start: %s", reason)
            raise MembrainStartError(f"Membrain (VLLM_MEMBRAIN_STRICT=1): {reason}") from None
        log.error("Membrain: not active, vLLM runs as plain vLLM: %s", reason, exc_info=log.isEnabledFor(logging.DEBUG))
        return False


def _restore(engine_args, memory_fraction, reserved_cpus) -> None:
    """Undo what a failed activation changed. An explicit Membrain config whose settings are unusable goes
    too: plain vLLM is the promise, and its connector would only fail in the engine core."""
    engine_args.kv_transfer_config = None
    engine_args.gpu_memory_utilization = memory_fraction
    if reserved_cpus is None:
        os.environ.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
    else:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved_cpus


def _activate(engine_args, config: ConnectorConfig) -> bool:
    from vllm.config import KVTransferConfig

    check = self_check(config)
    if config.strict and not check.reachable:
        raise MembrainStartError(f"the store does not answer at start-up: {check.where}; {check.status}")
    explicit = engine_args.kv_transfer_config
    if explicit is not None:
        if explicit.kv_load_failure_policy != "recompute":
            log.warning("Membrain: kv_load_failure_policy=%s: a failed load will fail its request", explicit.kv_load_failure_policy)
        if config.role and config.role != explicit.kv_role:
            # vLLM reads kv_role for its own producer/consumer behaviour: both must say the same.
            log.info("Membrain: VLLM_MEMBRAIN_ROLE=%s replaces kv_role=%s", config.role, explicit.kv_role)
            explicit.kv_role = config.role
        keep_cpu_cores(engine_args)
        log.info("Membrain: active (explicit --kv-transfer-config%s). %s; %s", _role_note(explicit.kv_role),
                 check.line, leave_memory_room(engine_args, config, check.infos))
        return True
    engine_args.kv_transfer_config = KVTransferConfig(
        kv_connector=CONNECTOR_NAME,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role=config.role or "kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config=config.to_extra_config(),
    )
    keep_cpu_cores(engine_args)
    log.info("Membrain: active%s. %s; %s", _role_note(config.role), check.line,
             leave_memory_room(engine_args, config, check.infos))
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


@dataclass
class StoreCheck:
    """What the start-up probe found: `line` for the log, `infos` each answering node's /v1/info."""

    where: str
    status: str
    reachable: bool
    infos: dict[str, dict] = field(default_factory=dict)

    @property
    def line(self) -> str:
        if self.reachable:
            return f"{self.where}; {self.status}"
        return f"{self.where}; {self.status}: requests compute as plain vLLM until it answers"


def self_check(config: ConnectorConfig) -> StoreCheck:
    """One probe of each endpoint, so the start-up log says whether the store answers (and a strict start
    can refuse one that does not)."""
    import httpx

    from ..tls import connector_context

    from ..client.backends import backend_of, probe
    from ..protocol import api
    from ..urls import redact_all

    where = f"endpoint {redact_all(config.endpoint)}, namespace {config.namespace!r}"
    if backend_of(config) != "membrain":
        return StoreCheck(where, *probe(config))
    check = StoreCheck(where, "", False)
    verify = connector_context(config) or True
    for url in config.endpoint:
        try:
            r = httpx.get(url.rstrip("/") + api.INFO_PATH, timeout=1.0, verify=verify)
            if r.status_code == 200:
                check.infos[url] = info = r.json()
                if not check.reachable:
                    check.status = f"server {info.get('server', '?')} {info.get('version', '?')} reachable"
                check.reachable = True
                continue
            r = httpx.get(url.rstrip("/") + api.HEALTHZ_PATH, timeout=1.0, verify=verify)
            check.status = check.status or f"server answered {r.status_code}"
        except httpx.HTTPError as exc:
            check.status = check.status or f"server unreachable now ({type(exc).__name__})"
    return check
