"""Circuit breaker: after `threshold` consecutive connection failures, calls fail fast for `cooldown`
seconds; then a single probe call is let through, and its success closes the circuit again.

Pure state machine with an injectable clock, so it is tested without sockets or sleeps.
"""

from __future__ import annotations

import time
from typing import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    def __init__(self, threshold: int = 3, cooldown: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.opens = 0
        self._probe_out = False

    def allow(self) -> bool:
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock() - self.opened_at >= self.cooldown:
            self.state = HALF_OPEN
            self._probe_out = False
        if self.state == HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return True
        return False

    def ready(self) -> bool:
        """Would a call be let through now? Like allow(), but changes nothing (for choosing among nodes)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self.clock() - self.opened_at >= self.cooldown
        return not self._probe_out

    def record_success(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self._probe_out = False

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            if self.state != OPEN:
                self.opens += 1
            self.state = OPEN
            self.opened_at = self.clock()
            self._probe_out = False
