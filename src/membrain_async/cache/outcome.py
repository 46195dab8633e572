"""What became of one operation (a lookup, a load, a save), as one typed value decided once, where it ended.

The executor knows only how a job ended (ok, cancelled, timed out, raised); what that means for Membrain is
decided here: a server that could not be reached is UNAVAILABLE (never a miss), anything else that raised is
ERROR. Loads add what the payloads themselves say (MISSING, CORRUPT); saves what the server said (PRESENT,
FAILED) or that they were never sent (DROPPED). Members are strings, so counters and logs take them as is.
"""

from __future__ import annotations

from enum import StrEnum

from ..client.errors import MembrainUnavailable
from ..runtime.future import Cancelled


class Outcome(StrEnum):
    OK = "ok"
    MISSING = "missing"  # the server does not hold it (a load: the first such block and all after it)
    CORRUPT = "corrupt"  # a payload failed its check (header, length, checksum, key tag, layout)
    TIMEOUT = "timeout"  # past its deadline
    UNAVAILABLE = "unavailable"  # the server could not be reached, or its breaker is open
    ERROR = "error"  # anything else that failed: a refusal, a protocol error, a bug
    CANCELLED = "cancelled"  # its request finished or was aborted first
    PRESENT = "present"  # a save the server already held
    FAILED = "failed"  # a save the server refused or never acknowledged
    DROPPED = "dropped"  # a save never sent (queue full, or still queued when shutdown's drain ended)


def classify(exc: BaseException | None) -> Outcome:
    """The outcome of an operation that raised `exc` (None: it did not)."""
    if exc is None:
        return Outcome.OK
    if isinstance(exc, Cancelled):
        return Outcome.CANCELLED
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT
    if isinstance(exc, MembrainUnavailable):
        return Outcome.UNAVAILABLE
    return Outcome.ERROR
