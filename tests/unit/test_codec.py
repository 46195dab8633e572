import pytest

from membrain_async import codec


def test_roundtrip_is_a_view():
    data = bytearray(range(256)) * 16
    blob = codec.encode(data, dtype="bfloat16", shape=(2, 2, 512), layout="cpu-pages")
    p = codec.decode(blob)
    assert (p.dtype, p.layout, p.shape) == ("bfloat16", "cpu-pages", (2, 2, 512))
    assert bytes(p.data) == bytes(data)
    assert p.data.obj is not None and len(blob) == codec.HEADER_SIZE + len(data)


def test_header_and_payload_sent_separately_decode_the_same():
    data = b"\x01\x02" * 100
    header = codec.encode_header(memoryview(data), dtype="uint8", shape=(200,))
    assert codec.decode(header + data).data.tobytes() == data


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:10], "shorter"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], "version"),
        (lambda b: b[:-1], "holds"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
        (lambda b: b[:5] + b"\xee" + b[6:], "unknown"),
    ],
)
def test_corruption_is_a_payload_error(mutate, message):
    blob = codec.encode(b"payload-bytes" * 10, dtype="uint8", shape=(130,))
    with pytest.raises(codec.PayloadError, match=message):
        codec.decode(mutate(blob))


def test_bad_arguments():
    with pytest.raises(ValueError):
        codec.encode_header(b"x", dtype="complex", shape=(1,))
    with pytest.raises(ValueError):
        codec.encode_header(b"x", dtype="uint8", shape=(1,), layout="mystery")
    with pytest.raises(ValueError):
        codec.encode_header(b"x", dtype="uint8", shape=(1,) * 7)


def test_payload_is_bound_to_its_key():
    data = bytes(range(200))
    blob = codec.encode(data, dtype="uint8", shape=(200,), key="fp-a-r0p0-abc")
    assert bytes(codec.decode(blob, key="fp-a-r0p0-abc").data) == data
    # The same valid bytes stored under another key (another fingerprint, another prefix) are refused.
    with pytest.raises(codec.PayloadError, match="another key"):
        codec.decode(blob, key="fp-b-r0p0-abc")
    unbound = codec.encode(data, dtype="uint8", shape=(200,))
    with pytest.raises(codec.PayloadError, match="another key"):
        codec.decode(unbound, key="fp-a-r0p0-abc")
