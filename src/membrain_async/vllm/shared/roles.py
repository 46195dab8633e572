"""vLLM's KV roles, as Membrain honours them.

`kv_both` (a cache shared by peers) loads hits and saves what it computes. In prefill/decode
disaggregation, a `kv_producer` (prefill instance) computes prompts and saves them: loading would only
move bytes it then never needs, since its output is one token. A `kv_consumer` (decode instance) loads
what the producers saved and generates: its saves would duplicate what its producer already stored.
"""

from __future__ import annotations

from dataclasses import dataclass

BOTH, PRODUCER, CONSUMER = "kv_both", "kv_producer", "kv_consumer"
ROLES = (BOTH, PRODUCER, CONSUMER)
_SHORT = {"both": BOTH, "producer": PRODUCER, "consumer": CONSUMER}


def parse_role(text: str) -> str:
    """'' (unset), one of vLLM's kv_role names, or its short form (both, producer, consumer)."""
    s = str(text).strip().lower()
    if s == "" or s in ROLES:
        return s
    if s in _SHORT:
        return _SHORT[s]
    raise ValueError(f"not a KV role: {text!r} (use kv_both, kv_producer or kv_consumer)")


@dataclass(frozen=True)
class Role:
    name: str

    @property
    def loads(self) -> bool:
        return self.name != PRODUCER

    @property
    def saves(self) -> bool:
        return self.name != CONSUMER

    @property
    def hands_off(self) -> bool:
        """A producer's finished requests tell their decode instance what to wait for (kv_transfer_params)."""
        return self.name == PRODUCER


def effective_role(kv_role: str | None, membrain_role: str) -> Role:
    """Membrain's own setting (VLLM_MEMBRAIN_ROLE, extra-config key `role`) when set, else vLLM's kv_role.

    The plugin writes the effective role back into kv_role, so vLLM (which reads kv_role for its own
    producer/consumer behaviour) and Membrain agree; this covers engines started without the plugin.
    """
    return Role(membrain_role or parse_role(kv_role or "") or BOTH)
