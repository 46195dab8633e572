"""Property-based robustness: parsers and the live server survive arbitrary input (bounded example counts)."""

import socket

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membrain_async import codec
from membrain_async.protocol import api, bulk
from membrain_async.protocol.bulk import FrameReader, ProtocolError

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=512))
def test_frame_reader_never_fails_other_than_protocol_error(data):
    reader = FrameReader(max_head=4096)
    try:
        while data:
            frame, data = reader.feed(data)
            if frame is None:
                break
    except ProtocolError as exc:
        assert 400 <= exc.status < 600


@FAST
@given(st.binary(max_size=256), st.sampled_from(list(bulk.Op)), st.integers(0, 2**32 - 1))
def test_valid_header_with_random_head(head, op, rid):
    data = bulk.HEADER.pack(bulk.MAGIC, bulk.VERSION, op, 0, rid, len(head), 0) + head
    try:
        frame, rest = FrameReader().feed(data)
    except ProtocolError:
        return
    assert frame is not None and frame.request_id == rid and rest == b""


@FAST
@given(st.binary(max_size=512))
def test_batch_decoder_and_codec_reject_cleanly(data):
    try:
        keys, values = api.decode_batch(data)
        assert len(keys) == len(values)
    except ValueError:
        pass
    try:
        codec.decode(data)
    except codec.PayloadError:
        pass


@FAST
@given(st.binary(min_size=1, max_size=64 * 1024))
def test_codec_roundtrip_and_any_flipped_bit_is_caught(payload):
    blob = bytearray(codec.encode(payload, dtype="uint8", shape=(len(payload),)))
    assert bytes(codec.decode(blob).data) == payload
    i = len(blob) - 1 - (len(payload) // 2)
    blob[i] ^= 0x10
    try:
        codec.decode(blob)
        raise AssertionError("a flipped payload bit went unnoticed")
    except codec.PayloadError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from([b"", b"MBRN", b"GET ", b"PUT /memory/a/b HTTP/1.1\r\n"]), junk=st.binary(max_size=2048))
def test_live_server_survives_garbage(server, prefix, junk):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        try:
            s.sendall(prefix + junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(2)
            while s.recv(4096):
                pass
        except OSError:
            pass
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
