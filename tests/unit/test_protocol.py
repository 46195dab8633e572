"""Sans-IO wire formats: no sockets, bytes in and events out."""

import pytest

from membrain_async.protocol import api, bodies, bulk, heads
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


def test_body_reader_gives_several_targets_to_one_receive_within_its_limit_and_discards_alone():
    pages = [bytearray(5) for _ in range(4)]
    tail = bytearray(3)
    reader = BodyReader([memoryview(p) for p in pages] + [6, memoryview(tail)])
    stream = memoryview(bytes(range(20)) + b"SKIPME" + b"xyz")
    seen = []
    while not reader.done:
        views = reader.want_many(limit=8, max_parts=3)
        seen.append([len(v) for v in views])
        assert sum(len(v) for v in views) <= 8 and len(views) <= 3
        n = min(7, sum(len(v) for v in views))  # a receive may fill fewer bytes than it was offered
        left = n
        for v in views:
            step = min(left, len(v))
            v[:step] = stream[:step]
            stream, left = stream[step:], left - step
        reader.advance(n)
    assert b"".join(pages) == bytes(range(20)) and bytes(tail) == b"xyz"
    assert seen[0] == [5, 3] and [6] in seen  # pages side by side; the discarded stretch on its own
    assert reader.remaining == 0


REQUESTS = [
    heads.AuthRequest("secret-token"),
    heads.PingRequest(),
    heads.PutRequest("ns", ["a", "b"], [3, 0]),
    heads.GetRequest("ns", ["a"]),
    heads.LookupRequest("ns", ["a", "b"]),
    heads.ExistsRequest("ns", []),
    heads.DeleteRequest("ns", ["a"]),
]


@pytest.mark.parametrize("request_head", REQUESTS, ids=lambda r: type(r).__name__)
def test_request_heads_round_trip_through_a_frame(request_head):
    frame, _ = FrameReader().feed(heads.encode_request(9, request_head, 0))
    assert frame.op == request_head.op and frame.request_id == 9
    assert heads.decode_request(frame) == request_head


def test_heads_keep_the_wire_bytes():
    """The typed heads write exactly the JSON the dicts they replaced did."""
    put = heads.encode_request(7, heads.PutRequest("a", ["k"], [3]), 3)
    assert put == bulk.encode_frame(Op.PUT, 7, {"ns": "a", "keys": ["k"], "sizes": [3]}, 3)
    assert heads.encode_request(1, heads.PingRequest()) == bulk.encode_frame(Op.PING, 1)
    request = bulk.Frame(Op.LOOKUP, 0, 4, {}, 0)
    assert heads.encode_reply(request, heads.LookupReply(2)) == bulk.encode_frame(Op.LOOKUP | bulk.REPLY_BIT, 4, {"count": 2})
    assert heads.encode_error(None, 400, "no") == bulk.encode_frame(bulk.REPLY_BIT, 0, {"error": "no"}, 0, 400)
    assert heads.ExistsReply([1, 0]).to_json() == b'{"present":[1,0]}'
    assert heads.PutReply(2).to_json() == b'{"stored":2}'
    assert bodies.KeysListing(["a"], False).to_json() == b'{"keys":["a"],"truncated":false}'
    assert bodies.Health().to_json() == b'{"status":"ok"}'


REPLIES = [
    heads.AuthReply(),
    heads.PingReply(),
    heads.PutReply(4),
    heads.GetReply([3, -1]),
    heads.LookupReply(1),
    heads.ExistsReply([1, 0]),
    heads.DeleteReply(0),
    heads.ErrorReply("no such key"),
    bodies.KeysBody(["a", "b"]),
    bodies.KeysListing(["a"], True),
    bodies.Health(),
    bodies.ServerInfo("membrain", "0.1", ["bulk"], "overwrite", bodies.ServerLimits(1 << 30, 0, 8 << 20, 256, 512),
                      bodies.BulkEndpoint(9201), auth=False),
]


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_replies_and_bodies_round_trip_through_json(reply):
    assert type(reply).from_json(reply.to_json()) == reply


@pytest.mark.parametrize(
    "op, head, message",
    [
        (Op.PUT, {"keys": ["k"], "sizes": [1]}, "PUT head needs 'ns', a string"),
        (Op.PUT, {"ns": "a", "keys": "k", "sizes": [1]}, "PUT head needs 'keys', a list of strings"),
        (Op.PUT, {"ns": "a", "keys": ["k"], "sizes": ["1"]}, "PUT head needs 'sizes', a list of integers >= 0"),
        (Op.PUT, {"ns": "a", "keys": ["k"], "sizes": [-1]}, "PUT head needs 'sizes', a list of integers >= 0"),
        (Op.PUT, {"ns": "a", "keys": ["k"], "sizes": [True]}, "PUT head needs 'sizes', a list of integers >= 0"),
        (Op.PUT, {"ns": "a", "keys": ["k"], "sizes": []}, "PUT head has 1 keys but 0 sizes"),
        (Op.GET, {"ns": "a", "keys": [1]}, "GET head needs 'keys', a list of strings"),
        (Op.LOOKUP, {"ns": 5, "keys": []}, "LOOKUP head needs 'ns', a string"),
        (Op.AUTH, {}, "AUTH head needs 'token', a string"),
        (99, {}, "unknown bulk op 99"),
    ],
)
def test_bad_request_heads_are_refused_with_a_clear_error(op, head, message):
    with pytest.raises(ProtocolError) as exc:
        heads.decode_request(bulk.Frame(op, 0, 1, head, 0))
    assert str(exc.value) == message and exc.value.status == 400


@pytest.mark.parametrize(
    "cls, obj, message",
    [
        (heads.LookupReply, {}, "lookup reply needs 'count', an integer >= 0"),
        (heads.LookupReply, [], "lookup reply must be a JSON object"),
        (heads.PutReply, {"stored": "3"}, "put reply needs 'stored', an integer >= 0"),
        (heads.ExistsReply, {"present": [2]}, "exists reply needs 'present', a list of 0 and 1"),
        (heads.GetReply, {"sizes": [-2]}, "GET reply needs 'sizes', a list of integers >= -1"),
        (bodies.KeysBody, {"keys": None}, "keys body needs 'keys', a list of strings"),
        (bodies.KeysListing, {"keys": [], "truncated": 0}, "keys listing needs 'truncated', true or false"),
    ],
)
def test_bad_replies_are_refused_with_a_clear_error(cls, obj, message):
    with pytest.raises(ProtocolError, match=message):
        cls.from_wire(obj)


def test_server_info_nests_its_parts_and_a_client_assumes_defaults_for_what_is_left_out():
    limits = bodies.ServerLimits(100, 0, 8, 16, 4)
    wire = bodies.ServerInfo("membrain", "1", ["bulk"], "overwrite", limits, bodies.BulkEndpoint(7), True).to_wire()
    assert list(wire) == ["server", "version", "capabilities", "put_existing", "limits", "bulk", "auth"]
    assert wire["limits"]["max_batch_keys"] == 16 and wire["limits"]["max_key_len"] == 512
    assert wire["bulk"] == {"port": 7, "same_port": True, "magic": "MBRN", "version": 1}
    bare = bodies.ServerInfo.from_wire({})
    assert (bare.capabilities, bare.limits.max_batch_keys, bare.limits.max_value_bytes) == ([], 1024, 64 << 20)
    assert bare.bulk.same_port and bare.bulk.port is None
    with pytest.raises(ProtocolError, match="info 'limits' needs 'max_batch_keys', an integer >= 0"):
        bodies.ServerInfo.from_wire({"limits": {"max_batch_keys": "many"}})
    with pytest.raises(ProtocolError, match="info 'bulk' must be a JSON object"):
        bodies.ServerInfo.from_wire({"bulk": []})


def test_get_reply_must_match_its_keys_and_body():
    good = bulk.Frame(Op.GET | bulk.REPLY_BIT, 0, 1, {"sizes": [3, -1]}, 3)
    assert heads.GetReply.from_frame(good, 2).sizes == [3, -1]
    for n_keys, body_len in [(1, 3), (2, 4)]:
        with pytest.raises(ProtocolError, match="do not match"):
            heads.GetReply.from_frame(bulk.Frame(good.op, 0, 1, good.head, body_len), n_keys)


def test_json_bodies_that_are_not_json_are_refused():
    with pytest.raises(ProtocolError, match="keys body is not JSON"):
        bodies.KeysBody.from_json(b"{nope")


def test_error_message_falls_back_where_a_reply_says_nothing():
    assert heads.error_message({"error": "full"}, "refused") == "full"
    assert heads.error_message({}, "refused") == heads.error_message(["x"], "refused") == "refused"


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


# Valid names, and names a client could be handed that need percent-encoding in a path segment.
_NAMES = ["ns", "tenant-a.prod_1", "0123abcd:7-deadbeef", "k@v+w=x~y", "a/b", "q?x", "sp ace", "100%", "h#f", "ünï", ".."]


@pytest.mark.parametrize("name", _NAMES)
def test_route_builders_parse_back_to_their_route(name):
    assert api.match_route("PUT", api.memory_path(name, name)) == api.Route("put", name, name)
    assert api.match_route("DELETE", api.memory_path("ns", name)) == api.Route("delete", "ns", name)
    assert api.match_route("POST", api.batch_put_path(name)) == api.Route("batch_put", name)
    assert api.match_route("POST", api.batch_get_path(name)) == api.Route("batch_get", name)
    assert api.match_route("POST", api.lookup_path(name)) == api.Route("lookup", name)
    assert api.match_route("POST", api.exists_path(name)) == api.Route("exists", name)
    assert api.match_route("GET", api.keys_path(name)) == api.Route("keys", name)
    assert "/../" not in api.memory_path("ns", name) + "/"
    path = api.keys_path(name, limit=5)
    assert api.match_route("GET", path) == api.Route("keys", name) and api.keys_limit(path) == 5


def test_static_routes_and_unchanged_paths_for_valid_names():
    for path, name in [(api.HEALTHZ_PATH, "healthz"), (api.READYZ_PATH, "readyz"), (api.INFO_PATH, "info"), (api.STATS_PATH, "stats"),
                       (api.METRICS_PATH, "metrics")]:
        assert api.match_route("GET", path) == api.Route(name)
    # Valid names go out as they are: the same request bytes as before there were builders.
    assert api.memory_path("ns", "0123abcd:7-dead@x+y=z") == "/memory/ns/0123abcd:7-dead@x+y=z"
    assert api.lookup_path("tenant-a.prod_1") == "/v1/lookup/tenant-a.prod_1"
    assert api.batch_put_path("ns") == "/v1/batch/put/ns" and api.batch_get_path("ns") == "/v1/batch/get/ns"


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
