"""Sans-IO wire formats: no sockets, bytes in and events out."""

import pytest

from membrain_async.protocol import api, bulk
from membrain_async.protocol.bulk import BodyReader, FrameReader, Op, ProtocolError
from membrain_async.protocol.names import validate_key, validate_namespace


def test_frame_roundtrip_in_one_piece_and_byte_by_byte():
    data = bulk.encode_frame(Op.PUT, 7, {"ns": "a", "keys": ["k"], "sizes": [3]}, 3) + b"xyz"
    frame, rest = FrameReader().feed(data)
    assert (frame.op, frame.request_id, frame.body_len, frame.head["keys"]) == (Op.PUT, 7, 3, ["k"])
    assert rest == b"xyz"
    reader = FrameReader()
    got = None
    for i in range(len(data) - 3):
        got, _ = reader.feed(data[i : i + 1])
    assert got == frame


def test_frame_without_head():
    frame, rest = FrameReader().feed(bulk.encode_frame(Op.PING, 1))
    assert frame.op == Op.PING and frame.head == {} and rest == b""


@pytest.mark.parametrize(
    "data, status",
    [
        (b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 8, 400),
        (bulk.HEADER.pack(b"MBRN", 99, 1, 0, 0, 0, 0), 505),
        (bulk.HEADER.pack(b"MBRN", 1, 1, 0, 0, bulk.MAX_HEAD_BYTES + 1, 0), 413),
        (bulk.HEADER.pack(b"MBRN", 1, 1, 0, 0, 3, 0) + b"{{{", 400),
        (bulk.HEADER.pack(b"MBRN", 1, 1, 0, 0, 2, 0) + b"[]", 400),
    ],
)
def test_bad_frames_raise_protocol_error(data, status):
    with pytest.raises(ProtocolError) as exc:
        FrameReader().feed(data)
    assert exc.value.status == status


def test_truncated_frame_is_incomplete_not_an_error():
    data = bulk.encode_frame(Op.GET, 1, {"ns": "a", "keys": ["k"]})
    frame, _ = FrameReader().feed(data[:-1])
    assert frame is None


def test_body_reader_fills_targets_in_place_and_skips():
    a, b = bytearray(3), bytearray(2)
    reader = BodyReader([memoryview(a), 4, bytearray(0), memoryview(b)])
    stream = memoryview(b"abc" + b"SKIP" + b"de")
    while not reader.done:
        want = reader.want()
        n = min(len(want), 2)
        want[:n] = stream[:n]
        stream = stream[n:]
        reader.advance(n)
    assert bytes(a) == b"abc" and bytes(b) == b"de"


def test_keys_and_sizes_validation():
    good = bulk.Frame(Op.PUT, 0, 1, {"ns": "a", "keys": ["k"], "sizes": [1]}, 1)
    assert bulk.keys_and_sizes(good) == ("a", ["k"], [1])
    for head in ({"keys": ["k"]}, {"ns": "a", "keys": "k"}, {"ns": "a", "keys": [1]}, {"ns": "a", "keys": [], "sizes": ["1"]}):
        with pytest.raises(ProtocolError):
            bulk.keys_and_sizes(bulk.Frame(Op.PUT, 0, 1, head, 0))


def test_batch_body_roundtrip_views_not_copies():
    parts = api.encode_batch(["a", "b", "c"], [b"one", None, b""])
    body = b"".join(parts)
    keys, values = api.decode_batch(body)
    assert keys == ["a", "b", "c"]
    assert bytes(values[0]) == b"one" and values[1] is None and bytes(values[2]) == b""
    assert isinstance(values[0], memoryview)


@pytest.mark.parametrize(
    "body",
    [b"", b"\x05\0\0\0{}", b"\x02\0\0\0{}", b'\x1c\0\0\0{"keys":["a"],"sizes":[5]}ab', b'\x1c\0\0\0{"keys":["a"],"sizes":[1]}ab'],
)
def test_bad_batch_bodies(body):
    with pytest.raises(ValueError):
        api.decode_batch(body)


def test_routes():
    assert api.match_route("PUT", "/memory/ns/k") == api.Route("put", "ns", "k")
    assert api.match_route("HEAD", "/memory/ns/k?x=1") == api.Route("head", "ns", "k")
    assert api.match_route("POST", "/v1/lookup/ns") == api.Route("lookup", "ns")
    assert api.match_route("POST", "/v1/batch/get/ns") == api.Route("batch_get", "ns")
    assert api.match_route("GET", "/metrics").name == "metrics"
    for method, path, status in [("GET", "/nope", 404), ("POST", "/memory/a/b", 405), ("GET", "/v1/lookup/a", 405), ("POST", "/healthz", 405)]:
        with pytest.raises(api.RouteError) as exc:
            api.match_route(method, path)
        assert exc.value.status == status


@pytest.mark.parametrize("name", ["", "a" * 129, "-lead", "has space", "sl/ash", "ünï"])
def test_bad_namespaces(name):
    with pytest.raises(ValueError):
        validate_namespace(name)


@pytest.mark.parametrize("key", ["", "k" * 513, "a/b", "..", "sp ace", "q?x"])
def test_bad_keys(key):
    with pytest.raises(ValueError):
        validate_key(key)


def test_good_names():
    assert validate_namespace("tenant-a.prod_1") and validate_key("0123abcd:7-deadbeef")
