"""Property-based robustness: parsers and the live server survive arbitrary input.

Example counts are bounded for the test suite; `nox -s fuzz` multiplies them (MEMBRAIN_FUZZ_SCALE).
"""

import os
import socket
from collections import Counter

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membrain_async import codec
from membrain_async.protocol import api, bulk
from membrain_async.protocol.bulk import FrameReader, ProtocolError

SCALE = float(os.environ.get("MEMBRAIN_FUZZ_SCALE", "1"))
FAST = settings(max_examples=int(300 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIVE = settings(max_examples=int(60 * SCALE), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CASES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_cases(reliability):
    yield
    reliability.add("fuzz", cases=dict(CASES), total=sum(CASES.values()))


@FAST
@given(st.binary(max_size=512))
def test_frame_reader_never_fails_other_than_protocol_error(data):
    CASES["frame_reader_never_fails_other_than_protocol_error"] += 1
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
    CASES["valid_header_with_random_head"] += 1
    data = bulk.HEADER.pack(bulk.MAGIC, bulk.VERSION, op, 0, rid, len(head), 0) + head
    try:
        frame, rest = FrameReader().feed(data)
    except ProtocolError:
        return
    assert frame is not None and frame.request_id == rid and rest == b""


@FAST
@given(st.binary(max_size=512))
def test_batch_decoder_and_codec_reject_cleanly(data):
    CASES["batch_decoder_and_codec_reject_cleanly"] += 1
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
    CASES["codec_roundtrip_and_any_flipped_bit_is_caught"] += 1
    blob = bytearray(codec.encode(payload, dtype="uint8", shape=(len(payload),)))
    assert bytes(codec.decode(blob).data) == payload
    i = len(blob) - 1 - (len(payload) // 2)
    blob[i] ^= 0x10
    try:
        codec.decode(blob)
        raise AssertionError("a flipped payload bit went unnoticed")
    except codec.PayloadError:
        pass


@LIVE
@given(prefix=st.sampled_from([b"", b"MBRN", b"GET ", b"PUT /memory/a/b HTTP/1.1\r\n"]), junk=st.binary(max_size=2048))
def test_live_server_survives_garbage(server, prefix, junk):
    CASES["live_server_survives_garbage"] += 1
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


def _alive(server) -> None:
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


_names = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(["a", "ns", "x" * 600, "..", ""])


@LIVE
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS"]),
    route=st.sampled_from(["/memory/{ns}/{key}", "/v1/batch/put/{ns}", "/v1/batch/get/{ns}", "/v1/lookup/{ns}",
                           "/v1/exists/{ns}", "/v1/keys/{ns}?limit={key}", "/v1/stats", "/{key}"]),
    ns=_names, key=_names,
    body=st.binary(max_size=4096) | st.builds(lambda k: orjson.dumps({"keys": k}), st.lists(_names, max_size=20)),
)
def test_live_http_api_answers_any_request_with_a_status(server, method, route, ns, key, body):
    """Malformed names, bodies and routes get a 2xx/4xx answer, never a 5xx or a dead server."""
    CASES["live_http_api"] += 1
    from urllib.parse import quote

    path = route.format(ns=quote(ns, safe=""), key=quote(key, safe=""))
    with httpx.Client(base_url=server.url, timeout=5) as c:
        r = c.request(method, path, content=body if method not in ("GET", "HEAD") else None)
    assert r.status_code < 500, (method, path, r.status_code, r.text[:200])
    if r.status_code >= 400 and method != "HEAD":
        assert r.json()["error"]
    _alive(server)


@LIVE
@given(
    op=st.sampled_from(list(bulk.Op)) | st.integers(0, 255),
    head=st.dictionaries(st.sampled_from(["ns", "keys", "sizes", "token"]),
                         st.none() | st.integers(-2**40, 2**40) | _names | st.lists(_names | st.integers(-5, 2**33), max_size=8)),
    body=st.binary(max_size=2048),
    declared=st.sampled_from([None, 0, 2**40, 2**63]),
)
def test_live_bulk_frames_with_hostile_heads_and_lengths(server, op, head, body, declared):
    """Well-formed frames carrying nonsense: wrong types, negative or absurd sizes, lengths that lie."""
    CASES["live_bulk_frames"] += 1
    try:
        head_bytes = orjson.dumps(head)
    except TypeError:
        return
    body_len = len(body) if declared is None else declared
    frame = bulk.HEADER.pack(bulk.MAGIC, bulk.VERSION, op, 0, 7, len(head_bytes), min(body_len, 2**64 - 1)) + head_bytes
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        try:
            s.sendall(frame + body)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(2)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        except OSError:
            reply = b""
    if reply:
        reader = FrameReader()
        frame_back, _ = reader.feed(reply)
        assert frame_back is None or frame_back.op & bulk.REPLY_BIT
    _alive(server)
