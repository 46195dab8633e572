"""Chain hashes of a vLLM request's full blocks, grown as tokens arrive.

Content only: token ids, the parent block's hash, and vLLM's own extra keys for the block (LoRA name and
path, multimodal identifiers and offsets, cache_salt on the first block, prompt-embedding digests), so
every isolation vLLM's prefix cache has, Membrain has too, while nothing depends on PYTHONHASHSEED.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ... import keys

if TYPE_CHECKING:
    from vllm.v1.request import Request


@dataclass
class BlockHashes:
    block_size: int
    hashes: list[str] = field(default_factory=list)  # hex, one per full block so far
    _mm_idx: int = 0

    def extend(self, request: "Request", upto_blocks: int) -> list[str]:
        """Hashes of the first `upto_blocks` blocks (fewer if the request has fewer full blocks)."""
        from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

        bs = self.block_size
        limit = min(upto_blocks, request.num_tokens // bs)
        tokens = request.all_token_ids
        while len(self.hashes) < limit:
            start = len(self.hashes) * bs
            extra, self._mm_idx = generate_block_hash_extra_keys(request, start, start + bs, self._mm_idx)
            parent = bytes.fromhex(self.hashes[-1]) if self.hashes else None
            self.hashes.append(keys.chain_hash(parent, tokens[start : start + bs], extra).hex())
        return self.hashes[:limit]
