"""Client errors. Unavailability is not an error for a cache: it surfaces as a miss (see MembrainClient)."""


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
