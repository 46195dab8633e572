"""Namespace fingerprints and block keys.

A block key names the KV of one full block of a prompt prefix, for one model, one KV layout and one
tensor-parallel shard:

    key = "<fingerprint>-r<tp rank>p<pp rank>-<chain hash>"     e.g. 3f9a0c1d2e4b5a69-r0p0-9c1e... (86 chars)

* The fingerprint covers everything that changes the bytes of a KV page: model identity (name or path,
  revision, a digest of its config and weight files), dtype, KV dtype, block size, KV layout, TP size, PP
  rank, KV group, number of layers/heads/head size, the payload format, and the user's namespace.
* The chain hash is SHA-256 over (parent hash, the block's token ids, vLLM's extra keys for the block).
  The extra keys carry LoRA, multimodal inputs, cache_salt and prompt embeddings, so their isolation is
  kept. We chain our own hashes rather than use `request.block_hashes`: vLLM seeds those with
  PYTHONHASHSEED when it is set (and randomly for its xxhash modes), so two instances started differently
  would never share. Ours depend on nothing but content.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from pathlib import Path
from typing import Any, Iterable

from . import codec

CHAIN_SEED = hashlib.sha256(b"membrain-block-chain-v1").digest()
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_EDGE = 1 << 20  # bytes hashed from each end of a weight file


def chain_hash(parent: bytes | None, token_ids: Iterable[int], extra_keys: Any = None) -> bytes:
    h = hashlib.sha256(parent or CHAIN_SEED)
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        # repr of tuples of str/int/bytes is deterministic and independent of PYTHONHASHSEED.
        h.update(repr(extra_keys).encode("utf-8", "backslashreplace"))
    return h.digest()


def block_key(fingerprint: str, rank: str, block_hash_hex: str) -> str:
    return f"{fingerprint}-r{rank}-{block_hash_hex}"


def model_files_digest(model: str) -> str:
    """Digest of a local model directory's config and weight files (content, not timestamps).

    Weight files are identified by name, size and their first and last MiB: cheap at start-up for
    multi-GB checkpoints, and enough to tell two checkpoints apart. For a hub name (no local
    directory) the name and revision in the fingerprint are all we can use.
    """
    path = Path(model)
    if not path.is_dir():
        return "remote"
    h = hashlib.sha256()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        f = path / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_EDGE))
            if size > 2 * _EDGE:
                fh.seek(-_EDGE, os.SEEK_END)
                h.update(fh.read(_EDGE))
    return h.hexdigest()[:16]


def namespace_fingerprint(**facts: Any) -> str:
    """16 hex chars over the sorted facts (model, dtypes, block size, layout, TP size, PP rank, group, ...)."""
    facts = {**facts, "payload_format": codec.VERSION}
    blob = json.dumps(facts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
