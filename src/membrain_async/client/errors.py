"""Client errors. The client reports what happened and never guesses: a miss is None/False/-1, a server that
cannot be reached is `MembrainUnavailable`. The cache layer decides that "unavailable" is served as a miss,
and counts it as such."""


class MembrainError(Exception):
    pass


class MembrainRequestError(MembrainError):
    """The server refused the request (4xx/5xx): bad input, auth, limits. Not retried."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class MembrainUnavailable(MembrainError):
    """The server could not be reached in time, or the circuit breaker is open."""
