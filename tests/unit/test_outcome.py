"""How an operation's end is named: one decision (classify), the same for lookups, loads and saves."""

from membrain_async.cache.outcome import Outcome, classify
from membrain_async.client import MembrainRequestError, MembrainUnavailable
from membrain_async.runtime import Cancelled


def test_an_unreachable_server_is_unavailable_never_a_miss_or_an_error():
    assert classify(MembrainUnavailable("down")) is Outcome.UNAVAILABLE


def test_every_way_to_fail_has_one_name():
    assert classify(None) is Outcome.OK
    assert classify(TimeoutError()) is Outcome.TIMEOUT
    assert classify(Cancelled("gone")) is Outcome.CANCELLED
    assert classify(MembrainRequestError(500, "refused")) is Outcome.ERROR
    assert classify(ValueError("a bug")) is Outcome.ERROR


def test_outcomes_read_as_the_names_counters_and_logs_use():
    assert f"load_errors_{Outcome.CORRUPT}" == "load_errors_corrupt"
    assert Outcome("unavailable") is Outcome.UNAVAILABLE and Outcome.OK == "ok"
