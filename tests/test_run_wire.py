"""server/run_wire.py (requests) and the client's response reader against protobuf's own
parser and serializer."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from aotiserve.client.tensor_codec import parse_run_response
from aotiserve.server import run_wire, runner_codec
from aotiserve.server import tensor_codec as codec
from aotiserve.v1 import model_runner_pb2 as pb

I64 = st.integers(-(1 << 63), (1 << 63) - 1)
I32 = st.integers(-(1 << 31), (1 << 31) - 1)

tensors = st.builds(
    lambda dtype, shape, data: pb.Tensor(dtype=dtype, shape=shape, data=data),
    I32,
    st.lists(I64, max_size=5),
    st.binary(max_size=64),
)
requests = st.builds(
    lambda model, inputs: pb.RunRequest(model=model, inputs=inputs),
    st.text(max_size=20),
    st.lists(tensors, max_size=4),
)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wt: int) -> bytes:
    return _varint(field << 3 | wt)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _unknown(field: int, kind: int) -> bytes:
    if kind == 0:
        return _key(field, 0) + _varint(300)
    if kind == 1:
        return _key(field, 1) + b"\x01" * 8
    if kind == 2:
        return _ld(field, b"xyz")
    return _key(field, 5) + b"\x02" * 4


def _same(raw: bytes) -> None:
    """run_wire accepts what protobuf accepts, with the same values, and refuses the rest."""
    try:
        want = pb.RunRequest.FromString(raw)
    except DecodeError:
        with pytest.raises(Exception):
            run_wire.parse_run_request(raw)
        with pytest.raises(Exception):
            run_wire.parse_viewing(raw)
        return
    for got in (run_wire.parse_run_request(raw), run_wire.parse_viewing(raw)):
        assert got.model == want.model
        assert len(got.inputs) == len(want.inputs)
        for g, w in zip(got.inputs, want.inputs):
            assert g.dtype == w.dtype
            assert list(g.shape) == list(w.shape)
            assert bytes(g.data) == w.data


@settings(max_examples=400, deadline=None)
@given(requests)
def test_parse_matches_protobuf(req):
    raw = req.SerializeToString()
    _same(raw)
    got = run_wire.parse_viewing(raw)
    for t in got.inputs:
        assert isinstance(t.data, memoryview)  # a view of the received bytes: no copy


def _same_response(raw: bytes) -> None:
    """The client's reader accepts what protobuf accepts, with the same values."""
    try:
        want = pb.RunResponse.FromString(raw)
    except DecodeError:
        with pytest.raises(Exception):
            parse_run_response(raw, viewing_min_bytes=0)
        return
    got = parse_run_response(raw, viewing_min_bytes=0)
    assert got.weights_version == want.weights_version
    assert len(got.outputs) == len(want.outputs)
    for g, w in zip(got.outputs, want.outputs):
        assert (g.dtype, list(g.shape), bytes(g.data)) == (w.dtype, list(w.shape), w.data)


@st.composite
def hand_encoded(draw, text_field=1, tensor_field=2):
    """Non-canonical encodings: unpacked/packed shape mixes, repeats, unknown fields,
    any field order (a RunRequest by default; fields 2 and 1 make a RunResponse)."""

    def tensor():
        parts = []
        for _ in range(draw(st.integers(0, 6))):
            what = draw(st.sampled_from(["dtype", "packed", "unpacked", "data", "unknown"]))
            if what == "dtype":
                parts.append(_key(1, 0) + _varint(draw(I32)))
            elif what == "packed":
                dims = draw(st.lists(I64, max_size=3))
                parts.append(_ld(2, b"".join(_varint(d) for d in dims)))
            elif what == "unpacked":
                parts.append(_key(2, 0) + _varint(draw(I64)))
            elif what == "data":
                parts.append(_ld(3, draw(st.binary(max_size=16))))
            else:
                parts.append(_unknown(draw(st.integers(4, 5000)), draw(st.integers(0, 3))))
        return b"".join(parts)

    parts = []
    for _ in range(draw(st.integers(0, 6))):
        what = draw(st.sampled_from(["model", "input", "unknown"]))
        if what == "model":
            parts.append(_ld(text_field, draw(st.text(max_size=8)).encode()))
        elif what == "input":
            parts.append(_ld(tensor_field, tensor()))
        else:
            parts.append(_unknown(draw(st.integers(3, 5000)), draw(st.integers(0, 3))))
    return b"".join(parts)


@settings(max_examples=400, deadline=None)
@given(hand_encoded())
def test_parse_noncanonical_matches_protobuf(raw):
    _same(raw)


def _mangle(raw: bytes, data) -> bytes:
    op = data.draw(st.sampled_from(["truncate", "flip", "append", "insert"]))
    b = bytearray(raw)
    if op == "truncate" and b:
        del b[data.draw(st.integers(0, len(b) - 1)) :]
    elif op == "flip" and b:
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    elif op == "append":
        b += data.draw(st.binary(min_size=1, max_size=12))
    elif b:
        i = data.draw(st.integers(0, len(b)))
        b[i:i] = data.draw(st.binary(min_size=1, max_size=6))
    return bytes(b)


@settings(max_examples=600, deadline=None)
@given(hand_encoded(), st.data())
def test_parse_mangled_matches_protobuf(raw, data):
    """Truncated, corrupted or extended bytes: same verdict and values as protobuf."""
    _same(_mangle(raw, data))


@settings(max_examples=400, deadline=None)
@given(
    st.builds(
        lambda outs, v: pb.RunResponse(outputs=outs, weights_version=v).SerializeToString(),
        st.lists(tensors, max_size=4),
        st.text(max_size=20),
    )
)
def test_client_reads_responses_like_protobuf(raw):
    _same_response(raw)
    for t in parse_run_response(raw, viewing_min_bytes=0).outputs:
        assert isinstance(t.data, memoryview)  # a view of the received bytes: no copy


@settings(max_examples=600, deadline=None)
@given(hand_encoded(text_field=2, tensor_field=1), st.data())
def test_client_reads_noncanonical_and_mangled_responses_like_protobuf(raw, data):
    _same_response(raw)
    _same_response(_mangle(raw, data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_parse_random_bytes_matches_protobuf(raw):
    _same(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\x02\xff\xfe",  # model not UTF-8
        b"\x12\x05\x08\x01",  # input runs past the end
        b"\x12\x02\x1a\x05",  # data runs past its tensor
        b"\x08" + b"\xff" * 10 + b"\x01",  # varint of 11 bytes
        b"\x00\x01",  # field number 0
        b"\x0f",  # wire type 7
        b"\x0c",  # end group without a start
    ],
)
def test_parse_refuses_what_protobuf_refuses(raw):
    with pytest.raises(DecodeError):
        pb.RunRequest.FromString(raw)
    with pytest.raises(Exception):
        run_wire.parse_run_request(raw)
    with pytest.raises(Exception):
        run_wire.parse_viewing(raw)


def test_parse_accepts_groups_and_other_wire_types_like_protobuf():
    group = _key(9, 3) + _key(1, 0) + b"\x01" + _key(9, 4)
    for raw in (
        group + _ld(1, b"m"),  # an unknown group
        _key(1, 0) + b"\x05" + _ld(1, b"m"),  # model as a varint: unknown
        _ld(2, _key(3, 0) + b"\x01"),
    ):  # data as a varint: unknown
        _same(raw)


DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float64,
    torch.int32,
]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)), max_size=4
    ),
    st.text(max_size=40),
    st.booleans(),
)
def test_write_matches_protobuf(specs, version, transpose):
    outputs = []
    for dtype, shape in specs:
        t = (torch.rand(shape) * 3).to(dtype)
        if transpose and t.dim() >= 2:
            t = t.transpose(0, 1)  # not contiguous
        outputs.append(t)
    got = run_wire.write_run_response(
        outputs, [codec.wire_dtype(t.dtype) for t in outputs], version
    )
    want = pb.RunResponse(
        outputs=[runner_codec.encode(t) for t in outputs], weights_version=version
    )
    assert got == want.SerializeToString()
    assert pb.RunResponse.FromString(got) == want


def test_write_large_output_bytes():
    t = torch.arange(1 << 20, dtype=torch.float32).reshape(1024, 1024)
    got = run_wire.write_run_response([t], [codec.wire_dtype(t.dtype)], "v1")
    back = pb.RunResponse.FromString(got)
    assert back.outputs[0].data == t.numpy().tobytes()
    assert list(back.outputs[0].shape) == [1024, 1024]
    assert back.weights_version == "v1"


def test_decoded_inputs_view_the_received_bytes():
    x = torch.arange(64 * 1024, dtype=torch.float32).reshape(256, 256)  # a large request
    raw = pb.RunRequest(model="m", inputs=[runner_codec.encode(x)]).SerializeToString()
    assert len(raw) >= run_wire.SMALL_REQUEST_BYTES
    req = run_wire.parse_run_request(raw)
    t = codec.decode(req.inputs[0], "input 0")
    assert torch.equal(t, x)
    assert t.data_ptr() == torch.frombuffer(raw, dtype=torch.uint8).data_ptr() + (
        len(raw) - x.numel() * 4
    )
