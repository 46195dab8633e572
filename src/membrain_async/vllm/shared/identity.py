"""What makes KV pages interchangeable: the namespace fingerprint facts, read from vLLM's config.

Both halves compute the same fingerprint from the same VllmConfig (pickled to every process), so the
scheduler's lookups and the workers' loads and saves agree on keys without talking to each other.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ... import keys
from ...config import ConnectorConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from .units import KVUnit


def kv_layout(device_type: str) -> str:
    """The codec layout tag of this platform's KV pages."""
    return "cpu-pages" if device_type == "cpu" else "cuda-pages"


@functools.lru_cache(maxsize=8)
def _files_digest(model: str) -> str:
    return keys.model_files_digest(model)


# ModelConfig's fields (vLLM's hash factors, before vLLM drops those its compile cache may ignore) that
# change what a layer writes into its KV pages. config.json is in the files digest; hf_overrides carries
# rope scaling and every other override of it; quantization covers online quantization of the same
# weight files. tests/unit/test_hybrid_policy.py fails when a vLLM release adds a field neither list names.
KV_MODEL_FACTORS = (
    "model", "revision", "code_revision", "model_weights", "dtype", "quantization", "quantization_config",
    "hf_overrides", "config_format", "model_impl", "model_class_overrides", "convert", "runner",
    "disable_sliding_window", "trust_remote_code", "allow_deprecated_quantization", "is_submodel_config",
    "word_embeddings_untied_by_checkpoint",
)
# The others, and why two instances differing only there may share KV pages.
NOT_KV_MODEL_FACTORS = {
    "hf_config": "config.json is in the files digest, overrides in hf_overrides; model code edits this object "
                 "while loading, so a worker's copy and the scheduler's may differ",
    "hf_text_config": "as hf_config",
    "hf_config_path": "where config.json is read from; its content is in the files digest",
    "max_model_len": "a length limit; positions below it are computed the same",
    "spec_target_max_model_len": "a length limit",
    "max_logprobs": "sampling output only",
    "logprobs_mode": "sampling output only",
    "return_sampling_mask": "sampling output only",
    "use_fp64_gumbel": "sampling only",
    "logits_processors": "sampling output only",
    "generation_config": "sampling defaults only",
    "override_generation_config": "sampling defaults only",
    "pooler_config": "pooling output only, after the last layer",
    "io_processor_plugin": "input and output processing only",
    "seed": "sampling only",
    "enforce_eager": "the same computation, compiled or not",
    "disable_cascade_attn": "an attention kernel choice; the KV written is the same",
    "enable_trace_replay": "tracing only",
    "enable_prompt_embeds": "embeddings are per request, in the block hashes' extra keys",
    "multimodal_config": "inputs are per request, in the block hashes' extra keys",
    "allowed_local_media_path": "input access only",
    "allowed_media_domains": "input access only",
    "tokenizer": "tokens are hashed, not text",
    "tokenizer_mode": "tokens are hashed, not text",
    "tokenizer_revision": "tokens are hashed, not text",
    "skip_tokenizer_init": "tokens are hashed, not text",
    "served_model_name": "a name in the API",
    "hf_token": "a credential",
    "enable_sleep_mode": "memory management",
    "sleep_mode_backend": "memory management",
    "sleep_mode_offload_cudagraph": "memory management",
    "sleep_preserve_parameter_names": "memory management",
    "enable_cumem_allocator": "memory management",
    "enable_nccl_comm_suspend": "communication management",
    "renderer_num_workers": "input processing only",
}


def _model_factors(mc) -> dict:
    from vllm.config.utils import get_hash_factors

    # hf_overrides may be a function (vLLM sets one on draft models): named below, not hashed by vLLM.
    factors = get_hash_factors(mc, {"hf_config", "hf_text_config", "hf_overrides"})
    out = {k: factors.get(k) for k in KV_MODEL_FACTORS if k in factors}
    overrides = mc.hf_overrides
    # A callable override is named by its qualified name: its effect cannot be serialised.
    out["hf_overrides"] = (f"{overrides.__module__}.{overrides.__qualname__}" if callable(overrides)
                           else overrides or {})
    return out


def fingerprint_facts(vllm_config: "VllmConfig", config: ConnectorConfig) -> dict:
    import vllm
    from vllm.platforms import current_platform

    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    return {
        "model": mc.model,
        "revision": mc.revision,
        "files": _files_digest(mc.model),
        "load_format": str(getattr(vllm_config.load_config, "load_format", "auto")),
        "model_factors": _model_factors(mc),
        "dtype": str(mc.dtype),
        "kv_dtype": str(cc.cache_dtype),
        "calculate_kv_scales": bool(getattr(cc, "calculate_kv_scales", False)),
        "block_size": cc.block_size,
        "layout": kv_layout(current_platform.device_type),
        "tp_size": pc.tensor_parallel_size,
        "pp_size": pc.pipeline_parallel_size,
        "layers": mc.get_num_layers(pc),
        "kv_heads": mc.get_num_kv_heads(pc),
        "head_size": mc.get_head_size(),
        "vllm": ".".join(vllm.__version__.split(".")[:2]),
        "namespace": config.namespace,
    }


def draft_facts(vllm_config: "VllmConfig") -> dict:
    """What a draft model's KV pages depend on: its own weights and config (the target's are in the base)."""
    spec = vllm_config.speculative_config
    dmc = getattr(spec, "draft_model_config", None) if spec is not None else None
    if dmc is None:
        return {}
    return {"method": str(spec.method), "model": dmc.model, "files": _files_digest(dmc.model),
            "model_factors": _model_factors(dmc)}


def fingerprint(vllm_config: "VllmConfig", config: ConnectorConfig) -> str:
    """The model's fingerprint: the keys of a plain model's one KV unit, and KV events' ownership label."""
    return keys.namespace_fingerprint(**fingerprint_facts(vllm_config, config))


def unit_fingerprints(vllm_config: "VllmConfig", config: ConnectorConfig, units: "list[KVUnit]") -> list[str]:
    """One fingerprint per KV unit (units.py).

    A model whose target layers form one full-attention unit keys them with the model's fingerprint, so a
    speculative-decoding instance (a draft unit beside it) and a plain one share the target's blocks. Every
    other unit (sliding window, a hybrid model's groups, a draft) adds its own spec and layers, and a
    draft its model's identity.
    """
    facts = fingerprint_facts(vllm_config, config)
    targets = [u for u in units if not u.draft]
    out = []
    for u in units:
        if not u.draft and len(targets) == 1 and u.kind == "full":
            out.append(keys.namespace_fingerprint(**facts))
            continue
        unit_facts = {**facts, "unit": u.facts()}
        if u.draft:
            unit_facts["draft"] = draft_facts(vllm_config)
        out.append(keys.namespace_fingerprint(**unit_facts))
    return out


def rank_label(tp_rank: int, pp_rank: int) -> str:
    return f"{tp_rank}p{pp_rank}"


def payload_bytes(vllm_config: "VllmConfig", layers: int | None = None) -> int:
    """Bytes of one block's payload (`layers` layers' pages, default all, plus the header), from the config alone."""
    from ... import codec

    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    if cc.cache_dtype == "auto":
        itemsize = getattr(mc.dtype, "itemsize", 2)
    else:
        itemsize = 1 if str(cc.cache_dtype).startswith("fp8") else 2
    per_layer = mc.get_num_kv_heads(pc) * cc.block_size * 2 * mc.get_head_size() * itemsize
    return codec.HEADER_SIZE + (mc.get_num_layers(pc) if layers is None else layers) * per_layer
