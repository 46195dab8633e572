"""The prefill-to-decode hand-off, carried in vLLM's `kv_transfer_params`.

vLLM sends a finished request's output in the step it stops, whatever `request_finished` answers
(delayed freeing holds blocks, not the response). So a prefill instance's response can reach the
proxy, and the decode instance, before the prefill's uploads are in the store. The prefill therefore
announces in its response's `kv_transfer_params` how many of the prompt's blocks it computed; a proxy
passes them on with the decode request (as for vLLM's own P/D connectors), and the decode instance
looks up again until the store holds them all. It stops waiting when the store's count has not grown for
VLLM_MEMBRAIN_HANDOFF_DEADLINE (a prefill still uploading under load keeps its decode waiting; one that
died, or dropped saves, does not), then loads what is there and computes the rest: a late or failed
hand-off costs time, never tokens.

Looks up again with back-off, not at every engine pass: an otherwise idle engine passes every
millisecond or so, and a lookup per pass (thousands in one wait) loads the store and the host for
nothing, since uploads land at the rate the prefill sends them. The first re-poll comes soon (uploads
usually land within milliseconds of the prefill's response), then the interval doubles to a cap, so a
wait costs a few dozen lookups, and the last one is sent at the deadline itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("membrain.connector")

PARAM = "membrain_handoff"  # the key inside kv_transfer_params
# Re-poll intervals (seconds): the first after an answer that fell short, doubling up to the cap.
FIRST_POLL_S = 0.004
MAX_POLL_S = 0.128


def handoff_params(request: "Request", block_size: int, fingerprint: str) -> dict[str, Any]:
    """What a prefill instance's finished request tells its decode instance: the prompt's blocks it
    computed, all of which it saves (the store may hold some already), and whose KV they are."""
    computed = min(request.num_computed_tokens, request.num_prompt_tokens)
    return {PARAM: {"blocks": computed // block_size, "fingerprint": fingerprint}}


@dataclass(frozen=True)
class Handoff:
    blocks: int  # leading prompt blocks the prefill instance computed and saves
    wait_s: float  # how long the store's count may stand still before the decode stops waiting
    deadline: float  # on the scheduler's clock: stop waiting then, unless more blocks land first
    seen: int = 0  # the most leading blocks the store has answered so far
    interval: float = FIRST_POLL_S  # until the next re-poll after the next answer that falls short

    @classmethod
    def of(cls, request: "Request", fingerprint: str, now: float, wait_s: float) -> "Handoff | None":
        """The hand-off a decode request carries, if any and if it is for this instance's KV."""
        params = request.kv_transfer_params or {}
        announced = params.get(PARAM) if isinstance(params, dict) else None
        if not isinstance(announced, dict):
            return None
        blocks = announced.get("blocks")
        if not isinstance(blocks, int) or blocks <= 0:
            return None
        if announced.get("fingerprint") != fingerprint:
            # Another model, dtype, layout or namespace: its blocks are under other keys, never found here.
            log.warning("Membrain: request %s was prefilled for other KV (fingerprint %s, ours %s); "
                        "not waiting for its blocks", request.request_id, announced.get("fingerprint"), fingerprint)
            return None
        return cls(blocks, wait_s, now + wait_s)

    def answered(self, count: int, now: float) -> "Handoff":
        """The store holds `count` leading blocks: progress restarts the wait."""
        if count > self.seen:
            return replace(self, seen=count, deadline=now + self.wait_s)
        return self

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def next_poll(self, now: float) -> "tuple[float, Handoff]":
        """An answer fell short at `now`: when to look up again, and the hand-off with its interval doubled.

        Never later than the deadline, so the last look is taken when the wait would end anyway.
        """
        at = min(now + self.interval, self.deadline)
        return at, replace(self, interval=min(self.interval * 2, MAX_POLL_S))
