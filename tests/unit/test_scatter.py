"""Values landing in a Scatter (a block's header room and its pages where they lie) and checked in pieces."""

from __future__ import annotations

import os

import pytest

from membrain_async import codec, scatter
from membrain_async.scatter import Scatter


def pieces(*sizes: int) -> Scatter:
    return Scatter([bytearray(n) for n in sizes])


def test_a_value_is_written_across_the_pieces_in_order_and_read_back_whole():
    value = os.urandom(1000)
    s = pieces(64, 300, 636)
    assert scatter.write(s, value) == 1000
    assert s.tobytes() == value and bytes(s.parts[1]) == value[64:364]
    again = pieces(64, 936)  # another split of the same bytes: a copy piece against piece
    assert scatter.write(again, s) == 1000 and again.tobytes() == value
    plain = memoryview(bytearray(2000))  # a plain buffer takes any value up to its size
    assert scatter.write(plain, s) == 1000 and bytes(scatter.filled(plain, 1000)) == value


def test_only_a_value_of_exactly_its_size_fits_a_scatter_and_nothing_is_written_otherwise():
    s = pieces(64, 100)
    for n in (163, 165, 0):
        assert not scatter.fits(s, n)
        assert scatter.write(s, b"\x07" * n) == scatter.MISFIT
    assert s.tobytes() == bytes(164)
    assert scatter.fits(memoryview(bytearray(10)), 4) and not scatter.fits(memoryview(bytearray(10)), 11)
    assert scatter.targets(s, 164) == s.parts


def test_a_payload_in_pieces_passes_the_same_check_as_whole_and_a_flipped_bit_fails_it():
    data = os.urandom(4096)
    whole = codec.encode(data, dtype="uint8", shape=(4096,), key="k")
    s = pieces(codec.HEADER_SIZE, 1000, 3096)
    scatter.write(s, whole)
    assert codec.decode_pieces(s.parts, key="k").shape == codec.decode(whole, key="k").shape == (4096,)
    with pytest.raises(codec.PayloadError, match="another key"):
        codec.decode_pieces(s.parts, key="other")
    s.parts[2][5] ^= 1
    with pytest.raises(codec.PayloadError, match="checksum"):
        codec.decode_pieces(s.parts, key="k")
    with pytest.raises(codec.PayloadError, match="header"):
        codec.decode_pieces([memoryview(bytearray(32)), s.parts[1]], key="k")
    short = pieces(codec.HEADER_SIZE, 100)
    scatter.write(short, whole[: codec.HEADER_SIZE + 100])
    with pytest.raises(codec.PayloadError, match="header says"):
        codec.decode_pieces(short.parts, key="k")


def summing(*sizes: int) -> Scatter:
    return Scatter([bytearray(n) for n in sizes], codec.running_checksum)


def test_a_running_sum_fed_part_by_part_equals_the_checksum_of_the_data_after_the_header():
    value = os.urandom(64 + 3000)
    s = summing(64, 1000, 0, 2000)
    assert s.landed_sum() is None  # nothing fed yet
    s.begin_fill()
    s.parts[0][:] = value[:64]
    s.part_landed(0)  # the header is not summed
    offset = 64
    for i in (1, 2, 3):
        s.parts[i][:] = value[offset : offset + len(s.parts[i])]
        offset += len(s.parts[i])
        assert s.landed_sum() is None  # not every part has landed yet
        s.part_landed(i)
    assert s.landed_sum() == codec.checksum(value[64:])


def test_a_running_sum_is_dropped_when_parts_come_out_of_order_refilled_or_written_another_way():
    s = summing(64, 10, 10)
    s.begin_fill()
    s.part_landed(2)  # out of order: the check must sum the bytes itself
    s.part_landed(1)
    assert s.landed_sum() is None
    s.begin_fill()  # a retried receive starts over
    s.part_landed(1)
    s.part_landed(2)
    assert s.landed_sum() == codec.checksum(bytes(20))
    assert scatter.write(s, os.urandom(84)) == 84  # copied in (a shared fetch, a local tier): not summed
    assert s.landed_sum() is None
    assert pieces(64, 10).landed_sum() is None  # built without a checksum: never sums


def test_a_checksum_that_is_not_a_factory_is_refused_when_the_scatter_is_built():
    with pytest.raises(TypeError, match="factory of running sums"):
        Scatter([bytearray(64)], checksum=codec.running_checksum())  # a running sum, not what makes one
