"""What makes KV pages interchangeable: the namespace fingerprint facts, read from vLLM's config.

Both halves compute the same fingerprint from the same VllmConfig (pickled to every process), so the
scheduler's lookups and the workers' loads and saves agree on keys without talking to each other.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .. import keys
from ..config import ConnectorConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def kv_layout(device_type: str) -> str:
    """The codec layout tag of this platform's KV pages."""
    return "cpu-pages" if device_type == "cpu" else "cuda-pages"


@functools.lru_cache(maxsize=8)
def _files_digest(model: str) -> str:
    return keys.model_files_digest(model)


def fingerprint_facts(vllm_config: "VllmConfig", config: ConnectorConfig) -> dict:
    import vllm
    from vllm.platforms import current_platform

    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    return {
        "model": mc.model,
        "revision": mc.revision,
        "files": _files_digest(mc.model),
        "load_format": str(getattr(vllm_config.load_config, "load_format", "auto")),
        "dtype": str(mc.dtype),
        "kv_dtype": str(cc.cache_dtype),
        "block_size": cc.block_size,
        "layout": kv_layout(current_platform.device_type),
        "tp_size": pc.tensor_parallel_size,
        "pp_size": pc.pipeline_parallel_size,
        "kv_group": 0,
        "layers": mc.get_num_layers(pc),
        "kv_heads": mc.get_num_kv_heads(pc),
        "head_size": mc.get_head_size(),
        "vllm": ".".join(vllm.__version__.split(".")[:2]),
        "namespace": config.namespace,
    }


def fingerprint(vllm_config: "VllmConfig", config: ConnectorConfig) -> str:
    return keys.namespace_fingerprint(**fingerprint_facts(vllm_config, config))


def rank_label(tp_rank: int, pp_rank: int) -> str:
    return f"{tp_rank}p{pp_rank}"


def payload_bytes(vllm_config: "VllmConfig") -> int:
    """Bytes of one block's payload (all layers' pages plus the header), from the config alone."""
    from .. import codec

    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    if cc.cache_dtype == "auto":
        itemsize = getattr(mc.dtype, "itemsize", 2)
    else:
        itemsize = 1 if str(cc.cache_dtype).startswith("fp8") else 2
    per_layer = mc.get_num_kv_heads(pc) * cc.block_size * 2 * mc.get_head_size() * itemsize
    return codec.HEADER_SIZE + mc.get_num_layers(pc) * per_layer
