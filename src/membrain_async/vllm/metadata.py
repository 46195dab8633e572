"""The only thing the connector's scheduler half and worker half share: vLLM's per-step metadata object.

Built by the scheduler half in `build_connector_meta`, pickled by vLLM into the SchedulerOutput,
read by every worker. Plain lists of ints and strings: cheap to pickle, nothing process-local.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class BlockTransfer:
    """Move the pages of `block_ids` to or from the blocks named by `hashes` (hex chain hashes).

    Workers turn a hash into a key with their own TP rank, so one plan serves every shard.
    """

    req_id: str
    block_ids: list[int]
    hashes: list[str]


@dataclass
class MembrainConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)
    # Requests seen for the first time, with the blocks they may load: workers start fetching early.
    prefetch: list[BlockTransfer] = field(default_factory=list)
    # Requests that finished or were aborted: drop what workers staged for them.
    finished: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.loads or self.saves or self.prefetch or self.finished)
