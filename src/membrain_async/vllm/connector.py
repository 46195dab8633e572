"""`MembrainConnector`: vLLM's KV connector for Membrain (vLLM 0.32, `KVConnectorBase_V1`).

A thin facade: in the EngineCore process it forwards to `MembrainScheduler`, in each worker to
`MembrainWorker`. The two share nothing but `MembrainConnectorMetadata`.

It supports vLLM's hybrid KV cache manager (`SupportsHMA`): every KV cache group of full or sliding-window
attention is shared, each as its own KV unit (shared/units.py). A model with a group Membrain cannot restore
(recurrent state, for one) keeps HMA on and runs without Membrain: one warning, then plain vLLM.

This module is imported in every vLLM process, the API server included (for the stats classmethods),
so it imports neither torch-heavy code nor the runtime until a half is built.

Enable with VLLM_MEMBRAIN_ENABLED=1 (see plugin.py), or explicitly:
    --kv-transfer-config '{"kv_connector":"MembrainConnector","kv_role":"kv_both",
                           "kv_load_failure_policy":"recompute",
                           "kv_connector_extra_config":{"endpoint":"http://localhost:9201"}}'
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .. import telemetry
from ..config import ConfigError, ConnectorConfig, strict_requested

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("membrain.connector")


class MembrainConnector(KVConnectorBase_V1, SupportsHMA):
    # Membrain is a remote memory tier reached over the network.
    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        from .shared.units import UnsupportedKVCache, describe, unit_by_unit, units_of

        self._scheduler = self._worker = None
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        try:
            self.config = ConnectorConfig.from_extra_config(extra)
        except ConfigError as exc:
            # Reached with an explicit --kv-transfer-config (the plugin checks its own before vLLM starts).
            if strict_requested(extra):
                raise
            if role == KVConnectorRole.SCHEDULER:
                log.error("Membrain: not active, vLLM runs without it: %s", exc)
            return  # every hook below is then a no-op
        # The processes that do Membrain I/O (engine core, workers) export its spans where OTEL_* says.
        telemetry.configure_from_env("vllm")
        try:
            units = units_of(kv_cache_config, vllm_config.cache_config.block_size)
        except UnsupportedKVCache as exc:
            if role == KVConnectorRole.SCHEDULER:
                log.warning("Membrain is off for this model: %s. vLLM runs as without it.", exc)
            return  # every hook below is then a no-op
        if role == KVConnectorRole.SCHEDULER:
            log.info("Membrain KV units: %s", describe(units))
            if unit_by_unit(units) and self.config.load_mode == "sync":
                log.warning("Membrain: VLLM_MEMBRAIN_LOAD_MODE=sync is not possible with several KV cache "
                            "groups or a sliding window (failures go per request there); loading async")
            from .scheduler.scheduler import MembrainScheduler

            from .scheduler import arrival
            from .scheduler.kv_events import MembrainKVEvents

            from .shared.roles import effective_role

            role = effective_role(vllm_config.kv_transfer_config.kv_role, self.config.role)
            if role.name != "kv_both":
                log.info("Membrain role %s: %s", role.name,
                         "saves, never loads" if role.saves else "loads, never saves")
            self._scheduler = MembrainScheduler.from_vllm_config(vllm_config, self.config, units, role)
            # None unless vLLM's KV events are on: then nothing is built for them.
            self._scheduler.events = MembrainKVEvents.for_vllm(
                vllm_config, kv_cache_config, self._scheduler.fingerprint)
            arrival.install()  # lookups sent from the engine core's input thread (arrival.py)
        else:
            from .worker.worker import MembrainWorker

            self._worker = MembrainWorker(vllm_config, self.config, kv_cache_config.num_blocks, units)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss, never a reason to recompute

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._scheduler is None:
            return 0, False
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        if self._scheduler is not None:
            self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        from .shared.metadata import MembrainConnectorMetadata

        if self._scheduler is None:
            return MembrainConnectorMetadata()
        return self._scheduler.build_connector_meta(scheduler_output)

    def on_request_arriving(self, request: "Request") -> None:
        """Not vLLM's API: called from the engine core's input thread by arrival.py's hook."""
        if self._scheduler is not None:
            self._scheduler.on_request_arriving(request)

    def on_new_request(self, request: "Request") -> None:
        if self._scheduler is not None:
            self._scheduler.on_new_request(request)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is None:
            return False, None
        return self._scheduler.request_finished(request, block_ids)

    def request_finished_all_groups(
        self, request: "Request", block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's hook under HMA: the request's blocks of every group are about to be freed. Saves copy
        pages out in the step that plans them, so nothing is held: the same as request_finished."""
        if self._scheduler is None:
            return False, None
        return self._scheduler.request_finished(request, list(block_ids[0]) if block_ids else [])

    def bind_kv_cache_manager(self, kv_cache_manager: "KVCacheManager") -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.bind_kv_cache_manager(kv_cache_manager)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        if self._scheduler is not None:
            self._scheduler.update_connector_output(connector_output)

    def take_events(self):
        """Membrain's BlockStored/BlockRemoved (medium MEMBRAIN), merged by vLLM into its KV event stream."""
        events = self._scheduler.events if self._scheduler is not None else None
        return events.take() if events is not None else ()

    def has_pending_push_work(self) -> bool:
        return self._scheduler is not None and self._scheduler.has_pending_push_work()

    def reset_cache(self) -> bool | None:
        if self._scheduler is not None:
            self._scheduler.reset_cache()
        return True

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        if self._worker is not None:
            self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # pages are in place before any forward reads them (see worker/worker.py)

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any) -> None:
        return  # saves copy whole pages of every layer once, in wait_for_save

    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.wait_for_save(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # Saves never hold blocks past their step (nothing is "sending"); async loads report here.
        return None, (self._worker.get_finished() if self._worker is not None else None)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """As vLLM's default, plus the requests whose load failed (hybrid models, where vLLM cannot take
        failed block ids: it recomputes these requests whole)."""
        _, recving = self.get_finished(finished_req_ids)
        failed = self._worker.take_failed_recving() if self._worker is not None else set()
        return KVConnectorTransferResults(finished_recving=set(recving or ()) | failed, failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self):
        # Tells the scheduler half which step's invalid blocks this output carries (see SaveLedger).
        return self._worker.worker_meta(self._get_connector_metadata()) if self._worker is not None else None

    # ------------------------------------------------------------------ both

    def get_kv_connector_stats(self):
        from .shared.stats import MembrainConnectorStats

        half = self._scheduler or self._worker
        data = half.take_stats() if half is not None else {}
        return MembrainConnectorStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        from .shared.stats import MembrainConnectorStats

        return MembrainConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from .shared.stats import MembrainPromMetrics

        return MembrainPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        half = self._scheduler or self._worker
        if half is not None:
            half.shutdown()
