"""What the connector's scheduler half and worker half share: vLLM's per-step metadata objects.

`MembrainConnectorMetadata` is built by the scheduler half in `build_connector_meta`, pickled by vLLM into
the SchedulerOutput and read by every worker. `MembrainWorkerMetadata` goes the other way: each worker
says which step it ran, vLLM aggregates the ranks' copies and hands the result to the scheduler half
(`update_connector_output`) in the same output as that step's invalid block ids. Plain lists of ints and
strings: cheap to pickle, nothing process-local.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def kv_events_enabled(vllm_config: "VllmConfig") -> bool:
    """vLLM's own switch for KV events. The worker reports blocks it found missing only when it is on,
    because only then does the scheduler half turn them into BlockRemoved events (its kv_events.py)."""
    cfg = getattr(vllm_config, "kv_events_config", None)
    return bool(cfg is not None and cfg.enable_kv_cache_events)


@dataclass
class BlockTransfer:
    """Move the pages of `block_ids` to or from the blocks named by `hashes` (hex chain hashes).

    Workers turn a hash into a key with their own TP rank, so one plan serves every shard. `units[i]` is
    the KV unit (vllm/shared/units.py) of entry i, whose layers and block table it is in; empty: all unit 0.
    """

    req_id: str
    block_ids: list[int]
    hashes: list[str]
    units: list[int] = field(default_factory=list)

    def unit(self, i: int) -> int:
        return self.units[i] if self.units else 0


@dataclass
class SaveVerdict:
    """The scheduler's word on the saves workers staged in `step`: upload all but `discard`'s requests.

    A staged save is uploaded only after this arrives, i.e. after the scheduler has seen every rank's
    invalid block ids for that step: a request whose blocks included one computed over unfilled KV.
    """

    step: int
    discard: list[str] = field(default_factory=list)


@dataclass
class MembrainConnectorMetadata(KVConnectorMetadata):
    step: int = 0
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)
    # Requests seen for the first time, with the blocks they may load: workers start fetching early.
    prefetch: list[BlockTransfer] = field(default_factory=list)
    # Requests that finished or were aborted: drop what workers staged for them.
    finished: list[str] = field(default_factory=list)
    verdicts: list[SaveVerdict] = field(default_factory=list)
    # The step schedules no tokens: workers may rest briefly while loads are in flight (never spin).
    idle: bool = False

    def is_empty(self) -> bool:
        return not (self.loads or self.saves or self.prefetch or self.finished or self.verdicts)


@dataclass
class MembrainWorkerMetadata(KVConnectorWorkerMetadata):
    """The steps whose metadata a worker ran (merged across ranks: every rank runs every step).

    `missing`: chain hashes of blocks a load found missing on the server, on any rank (only while vLLM's
    KV events are on; the scheduler half announces them removed, see kv_events.py).
    """

    steps: list[int] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "MembrainWorkerMetadata":
        steps = set(self.steps) | set(getattr(other, "steps", ()))
        missing = list(dict.fromkeys([*self.missing, *getattr(other, "missing", ())]))
        return MembrainWorkerMetadata(sorted(steps), missing)
