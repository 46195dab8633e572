"""KV units: the layers saved and loaded under one key per block, read from vLLM's KV cache groups.

vLLM's hybrid KV cache manager (HMA) gives each group of layers with one attention kind its own block
table: a Gemma-3-style model has full-attention groups and sliding-window groups, and a sliding-window
group holds real blocks only inside the window before the next token (vLLM frees the rest, and allocates
the null block for them when a prefix is loaded). A unit is one group's layers, or a part of them:

- a group's target-model layers and a draft model's layers (speculative decoding by a draft model,
  `draft_model.*` layer names, or an EAGLE/MTP group) are separate units, so the target's KV is shared with
  plain instances of the same model, and the draft's KV (other weights) never meets theirs;
- every unit has its own fingerprint (its group's spec and its layer names on top of the model's), so
  keys differ whenever the bytes of a page could.

What a hit needs, per unit kind (see `cache.prefix_query`): a full-attention unit every block before the
hit point; a sliding-window unit only the blocks vLLM keeps for the window before it. Both halves build
the same units from the same KVCacheConfig (pickled to every process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import KVCacheConfig

DRAFT_PREFIX = "draft_model."


class UnsupportedKVCache(Exception):
    """A KV cache group Membrain cannot share (recurrent state, other block sizes): Membrain stays off."""


@dataclass(frozen=True)
class KVUnit:
    index: int  # position in the unit list: BlockTransfer.units refers to it
    group: int  # vLLM's KV cache group id: whose block table the unit's blocks are in
    kind: str  # "full" | "sliding_window"
    layer_names: tuple[str, ...]
    # sliding_window: how many tokens before the next one vLLM keeps (sliding_window - 1 + retained);
    # None: every earlier token.
    window_tokens: int | None
    draft: bool  # a draft model's layers (speculative decoding)
    spec: str  # vLLM's group spec, as text, for the fingerprint

    def facts(self) -> dict[str, Any]:
        """What this unit adds to the model's fingerprint facts."""
        return {"kind": self.kind, "window": self.window_tokens, "layers": list(self.layer_names),
                "draft": self.draft, "spec": self.spec}

    def first_needed_block(self, hit_tokens: int, block_size: int) -> int:
        """The first block a load up to `hit_tokens` must restore for this unit."""
        if self.window_tokens is None:
            return 0
        return max(0, hit_tokens - self.window_tokens) // block_size


def _kind(spec: Any) -> tuple[str, int | None]:
    # By exact class: a subclass (chunked local, sink, ring-buffer attention) keeps other blocks.
    name = type(spec).__name__
    if name in ("SlidingWindowSpec", "SlidingWindowMLASpec"):
        return "sliding_window", spec.sliding_window - 1 + getattr(spec, "extra_retained_tokens", 0)
    if name in ("FullAttentionSpec", "MLAAttentionSpec"):
        return "full", None
    raise UnsupportedKVCache(f"KV cache group spec {name} is not shared by Membrain (full attention and "
                             "sliding window are)")


def _spec_text(spec: Any) -> str:
    # The dataclass repr names the class and every field (block size, heads, head size, dtype, window,...).
    return repr(spec)


def units_of(kv_cache_config: "KVCacheConfig | None", block_size: int) -> list[KVUnit]:
    """The units of a KV cache config, in group order (targets before drafts within a group).

    Raises UnsupportedKVCache for a group Membrain cannot restore correctly; the connector then stays off,
    and vLLM runs as without it.
    """
    if kv_cache_config is None:
        raise UnsupportedKVCache("vLLM gave the connector no KV cache config")
    units: list[KVUnit] = []
    for gid, group in enumerate(kv_cache_config.kv_cache_groups):
        if not getattr(group, "enable_kv_transfer", True):
            continue  # an ephemeral replica vLLM rebuilds from its source group after a load
        spec = group.kv_cache_spec
        kind, window = _kind(spec)
        if spec.block_size != block_size:
            raise UnsupportedKVCache(f"KV cache group {gid} has block size {spec.block_size}, not {block_size}")
        eagle = bool(getattr(group, "is_eagle_group", False))
        target = tuple(n for n in group.layer_names if not (eagle or n.startswith(DRAFT_PREFIX)))
        draft = tuple(n for n in group.layer_names if eagle or n.startswith(DRAFT_PREFIX))
        for names, is_draft in ((target, False), (draft, True)):
            if names:
                units.append(KVUnit(len(units), gid, kind, names, window, is_draft, _spec_text(spec)))
    if not units:
        raise UnsupportedKVCache("no KV cache group to share")
    return units


def plain_unit() -> KVUnit:
    """A plain model's one unit, for a scheduler half built without units (tests): full attention, unit 0 of
    group 0. The connector always passes the units of vLLM's KV cache config."""
    return KVUnit(0, 0, "full", (), None, False, "")


def unit_by_unit(units: "list[KVUnit]") -> bool:
    """Several units, or a sliding-window one: hits, loads and saves go unit by unit (a window's blocks below
    a hit are vLLM's null block), and load failures go per request (vLLM takes block ids of one group only)."""
    return len(units) > 1 or any(u.window_tokens is not None for u in units)


def describe(units: list[KVUnit]) -> str:
    """One line for logs and reports: e.g. 'g0 full x1, g1 sliding_window(63) x1, ...'."""
    parts = []
    for u in units:
        kind = u.kind if u.window_tokens is None else f"{u.kind}(keeps {u.window_tokens})"
        parts.append(f"g{u.group}{' draft' if u.draft else ''} {kind} x{len(u.layer_names)}")
    return ", ".join(parts)


# vLLM's block pool hands out block 0 as the null block (BlockPool.null_block, the first block popped): a
# table entry holding it has no KV (a sliding window's freed or skipped blocks).
NULL_BLOCK_ID = 0
