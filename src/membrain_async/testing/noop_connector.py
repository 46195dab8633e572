"""A KV connector that does nothing, for benchmarks: an engine with it configured runs vLLM's own connector
plumbing (per-step metadata, the per-layer hooks around attention) and none of Membrain's work, so a
comparison with plain vLLM and with Membrain splits the one cost from the other (bench/no_reuse_parts.py).

    LLM(..., kv_transfer_config={"kv_connector": "NoopConnector", "kv_role": "kv_both",
                                 "kv_connector_module_path": "membrain_async.testing.noop_connector"})
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata


class NoopConnector(KVConnectorBase_V1):
    def start_load_kv(self, forward_context, **kwargs) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False  # never a hit: vLLM computes every prompt itself

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return KVConnectorMetadata()
