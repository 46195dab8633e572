"""Membrain residency in vLLM's KV event stream, for routers that place requests by KV residency.

vLLM publishes its own prefix cache as `BlockStored` / `BlockRemoved` events (medium "GPU", or "CPU" for
its offloading tiers); the scheduler half adds Membrain's, through the connector's `take_events()`, which
vLLM's scheduler merges into the same `KVEventBatch` each step. They differ from vLLM's in:

- `medium="MEMBRAIN"`, `locality="REMOTE"` (the blocks are on the Membrain server, not in this instance),
- `ownership="membrain:<fingerprint>"`: instances whose events carry the same value load each other's
  blocks (the fingerprint covers the model, dtypes, layout, parallelism and namespace, see keys.py).

Block hashes, parent hash, token ids, block size, LoRA, extra keys and session id are built exactly as
vLLM's block pool builds them for its own `BlockStored` (from `request.block_hashes`, converted by
`maybe_convert_block_hash`, so `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` applies), so a router matches them
against vLLM's own events and its own hashing of a prompt.

When "stored" is announced: once the scheduler half *settles* the step that staged the save as valid
(`SaveLedger.settle`: every rank's invalid blocks for that step were seen, and the request's KV was not
computed over an unfilled block); that verdict is what tells the workers to upload. A save discarded as
unfilled is never announced. It is not a server acknowledgement: upload outcomes are known only to the
workers (and counted there), and the server evicts without telling anyone. Both surface as `BlockRemoved`
when this instance next finds the block gone:

- a lookup sent after the block was planned answers that the leading blocks stop before it (a lookup
  counts leading blocks present, so only the first missing block is known gone; the ledger then re-saves,
  and the re-save is announced again), or
- a load finds it missing on the server (workers report the hashes in `MembrainWorkerMetadata.missing`).

Only blocks this instance announced are removed. Nothing here runs unless vLLM's KV events are on
(`kv_events_config.enable_kv_cache_events`): the scheduler half then holds no `MembrainKVEvents` at all.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..shared.metadata import kv_events_enabled
from .save_ledger import AWAIT_STEPS_MAX, PlannedSave

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import BlockStored, KVCacheEvent
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

MEDIUM = "MEMBRAIN"
LOCALITY = "REMOTE"


def ownership(fingerprint: str) -> str:
    return f"membrain:{fingerprint}"


class MembrainKVEvents:
    """Snapshots planned saves while their request is alive; emits them once settled; removes what is found gone."""

    def __init__(self, *, block_size: int, fingerprint: str, hash_block_size: int | None = None,
                 kv_cache_spec: Any = None, announced_limit: int = 1 << 16):
        self.block_size = block_size
        self.hash_block_size = hash_block_size or block_size
        self.ownership = ownership(fingerprint)
        self._spec_kind, self._spec_window = _spec_fields(kv_cache_spec)
        # step -> (planned save, its events); settled (or expired) with the ledger's steps.
        self._pending: dict[int, list[tuple[PlannedSave, list[tuple["BlockStored", list[str]]]]]] = {}
        # Membrain chain hash -> (vLLM's external hash, the ledger stamp of the save that announced it).
        self._announced: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._announced_limit = announced_limit
        self._events: list["KVCacheEvent"] = []

    @classmethod
    def for_vllm(cls, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None",
                 fingerprint: str) -> "MembrainKVEvents | None":
        if not kv_events_enabled(vllm_config):
            return None
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        return cls(block_size=vllm_config.cache_config.block_size, fingerprint=fingerprint,
                   hash_block_size=getattr(kv_cache_config, "hash_block_size", None),
                   kv_cache_spec=groups[0].kv_cache_spec if groups else None)

    # ------------------------------------------------------------------ hooks of the scheduler half

    def planned(self, planned: PlannedSave, request: "Request", chain: list[str]) -> None:
        """A save was planned for `planned.step`: snapshot its events now (the request may finish first)."""
        wanted = set(planned.hashes)
        indices = [b for b in range(planned.first_block, len(chain)) if chain[b] in wanted]
        self._pending.setdefault(planned.step, []).append((planned, self._stored_events(request, chain, indices)))
        self._expire(planned.step)

    def settled(self, step: int, discarded: list[PlannedSave]) -> None:
        """`step`'s verdict was issued: announce its saves but the discarded ones."""
        for planned, events in self._pending.pop(step, ()):
            if any(planned is d for d in discarded):
                continue
            for event, hashes in events:
                self._events.append(event)
                for h, external in zip(hashes, event.block_hashes):
                    self._announce(h, external, planned.stamp)
        self._expire(step)

    def _expire(self, step: int) -> None:
        """The ledger's rule (SaveLedger._expire, at the same calls): steps it stopped waiting for get no
        verdict, so their saves are never uploaded, and never announced."""
        for stale in [s for s in self._pending if s < step - AWAIT_STEPS_MAX]:
            del self._pending[stale]

    def lookup_missing(self, chain: list[str], found: int, covered: int, lookup_seq: int) -> None:
        """A lookup stamped `lookup_seq` found only `found` of the `covered` leading blocks."""
        if found >= covered or found >= len(chain):
            return
        announced = self._announced.get(chain[found])
        # Planned after the lookup was sent: "missing" may only mean our upload had not landed yet.
        if announced is not None and announced[1] < lookup_seq:
            self._remove([chain[found]])

    def load_missing(self, hashes: list[str]) -> None:
        """Loads found these blocks missing on the server."""
        self._remove([h for h in hashes if h in self._announced])

    def take(self) -> list["KVCacheEvent"]:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ building events

    def _announce(self, chain_hash: str, external: Any, stamp: int) -> None:
        self._announced[chain_hash] = (external, stamp)
        self._announced.move_to_end(chain_hash)
        while len(self._announced) > self._announced_limit:
            self._announced.popitem(last=False)

    def _remove(self, chain_hashes: list[str]) -> None:
        from vllm.distributed.kv_events import BlockRemoved

        external = [self._announced.pop(h)[0] for h in chain_hashes if h in self._announced]
        if external:
            self._events.append(BlockRemoved(block_hashes=external, medium=MEDIUM, group_idx=0,
                                             locality=LOCALITY, ownership=self.ownership))

    def _stored_events(self, request: "Request", chain: list[str],
                       indices: list[int]) -> list[tuple["BlockStored", list[str]]]:
        """One BlockStored per run of consecutive blocks, the way vLLM's block pool builds its own.

        Returns each event with the Membrain chain hashes of its blocks (`chain[b]`), to announce them.
        """
        from vllm.distributed.kv_events import BlockStored
        from vllm.v1.core.kv_cache_utils import (
            generate_block_hash_extra_keys,
            maybe_convert_block_hash,
            resolve_block_hashes,
            to_event_extra_keys,
        )

        bs = self.block_size
        vllm_hashes = request.block_hashes
        if self.hash_block_size != bs:
            vllm_hashes = resolve_block_hashes(vllm_hashes, self.hash_block_size, bs)
        # Without vLLM's prefix caching a request has no block hashes: nothing a router could match.
        indices = [b for b in indices if b < len(vllm_hashes)]
        runs: list[list[int]] = []
        for b in indices:
            if runs and runs[-1][-1] == b - 1:
                runs[-1].append(b)
            else:
                runs.append([b])
        lora = request.lora_request
        out = []
        for run in runs:
            first, last = run[0], run[-1]
            extra, mm_idx = [], 0
            for b in run:
                keys, mm_idx = generate_block_hash_extra_keys(request, b * bs, (b + 1) * bs, mm_idx)
                extra.append(keys)
            event = BlockStored(
                block_hashes=[maybe_convert_block_hash(vllm_hashes[b]) for b in run],
                parent_block_hash=maybe_convert_block_hash(vllm_hashes[first - 1]) if first else None,
                token_ids=list(request.all_token_ids[first * bs : (last + 1) * bs]),
                block_size=bs,
                lora_id=lora.adapter_id if lora else None,
                medium=MEDIUM,
                lora_name=lora.name if lora else None,
                extra_keys=to_event_extra_keys(extra),
                group_idx=0,
                kv_cache_spec_kind=self._spec_kind,
                kv_cache_spec_sliding_window=self._spec_window,
                locality=LOCALITY,
                ownership=self.ownership,
                session_id=getattr(request, "session_id", None),
            )
            out.append((event, [chain[b] for b in run]))
        return out


def _spec_fields(spec: Any) -> tuple[str | None, int | None]:
    if spec is None:
        return None, None
    from vllm.v1.kv_cache_interface import get_kv_cache_spec_kind, get_kv_cache_spec_sliding_window

    return get_kv_cache_spec_kind(spec).value, get_kv_cache_spec_sliding_window(spec)
