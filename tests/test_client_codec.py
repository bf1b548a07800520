"""The client's tensor codec: every dtype round trip, hand-written wire bytes
against the generated parser, chunked uploads and reassembly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aotiserve.client import dtypes
from aotiserve.client.tensor_codec import (
    SMALL_REQUEST_BYTES,
    ConstantsAssembler,
    UploadItem,
    decode_bytes,
    encode_chunk_request,
    encode_run_request,
    encode_upload,
    from_wire,
    run_request,
    to_wire,
    upload_items,
)
from aotiserve.v1 import model_runner_pb2 as pb

TORCH_DTYPES = [d for d in dtypes.DTYPES if getattr(torch, d.torch_name, None) is not None]
NUMPY_DTYPES = [d for d in dtypes.DTYPES if d.numpy_name]


def _torch_sample(d: dtypes.DType, shape=(3, 5)) -> torch.Tensor:
    dtype = getattr(torch, d.torch_name)
    if d.torch_name == "bool":
        return torch.rand(shape) > 0.5
    if d.torch_name.startswith(("float", "bfloat")):
        return (torch.randn(shape) * 4).to(dtype)
    info = torch.iinfo(dtype)
    hi = min(info.max, 1 << 30)
    return torch.randint(max(info.min, -(1 << 30)), hi, shape, dtype=torch.int64).to(dtype)


def _request_tensor(value) -> pb.Tensor:
    return pb.RunRequest.FromString(encode_run_request("m", [value])).inputs[0]


@pytest.mark.parametrize("d", TORCH_DTYPES, ids=lambda d: d.torch_name)
def test_torch_round_trip_every_dtype(d):
    t = _torch_sample(d)
    wire = _request_tensor(t)
    assert wire.dtype == d.wire and list(wire.shape) == [3, 5]
    assert len(wire.data) == t.numel() * d.itemsize
    back = from_wire(wire, "torch")
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))  # bit-exact, NaNs included


@pytest.mark.parametrize("d", NUMPY_DTYPES, ids=lambda d: d.torch_name)
def test_numpy_round_trip_every_dtype(d):
    a = _torch_sample(d).numpy()
    wire = _request_tensor(a)
    assert wire.dtype == d.wire
    back = from_wire(wire, "numpy")
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)
    # numpy and torch agree on the bytes
    assert bytes(wire.data) == a.tobytes()


def test_numpy_bytes_are_little_endian_and_big_endian_input_is_converted():
    a = np.arange(4, dtype=">i4")
    wire = _request_tensor(a)
    assert wire.data == np.arange(4, dtype="<i4").tobytes()
    np.testing.assert_array_equal(from_wire(wire, "numpy"), np.arange(4))


def test_non_contiguous_inputs():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2].T  # strided and transposed
    assert not a.flags.c_contiguous
    np.testing.assert_array_equal(from_wire(_request_tensor(a), "numpy"), a)
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2].t()
    assert not t.is_contiguous()
    assert torch.equal(from_wire(_request_tensor(t), "torch"), t)


def test_contiguous_numpy_input_is_not_copied():
    a = np.zeros((4, 4), dtype=np.float32)
    wire = to_wire(a)
    assert np.shares_memory(np.frombuffer(wire.data, dtype=np.uint8), a)
    t = torch.zeros(4, 4)
    assert np.shares_memory(np.frombuffer(to_wire(t).data, dtype=np.uint8), t.numpy())


def test_scalars_empty_tensors_and_grad_tensors():
    for value in (np.float32(3.5), np.array(7, dtype=np.int64), torch.tensor(2.5)):
        wire = _request_tensor(value)
        assert list(wire.shape) == []
        assert from_wire(wire, "numpy") == np.asarray(value)
    empty = _request_tensor(np.zeros((0, 3), dtype=np.float32))
    assert list(empty.shape) == [0, 3] and empty.data == b""
    assert from_wire(empty, "numpy").shape == (0, 3)
    assert from_wire(empty, "torch").shape == (0, 3)
    g = torch.ones(2, requires_grad=True)
    assert torch.equal(from_wire(_request_tensor(g), "torch"), torch.ones(2))


def test_python_lists_become_arrays():
    wire = _request_tensor([[1.0, 2.0]])
    assert wire.dtype == pb.DATA_TYPE_FLOAT64 and list(wire.shape) == [1, 2]


def test_unsupported_types_are_refused_locally():
    with pytest.raises(TypeError, match="input 0"):
        encode_run_request("m", [np.array(["a"])])
    with pytest.raises(TypeError, match="complex"):
        encode_run_request("m", [np.zeros(2, dtype=np.complex64)])
    with pytest.raises(TypeError, match="list or tuple"):
        encode_run_request("m", np.zeros(2))
    with pytest.raises(TypeError, match="list or tuple"):
        encode_run_request("m", {"x": np.zeros(2)})


def test_bfloat16_needs_torch_for_numpy_output():
    wire = _request_tensor(torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bfloat16.*install torch"):
        from_wire(wire, "numpy")


def test_decoding_checks_byte_count():
    bad = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12)
    with pytest.raises(ValueError, match="12 bytes"):
        from_wire(bad, "numpy")
    with pytest.raises(ValueError, match="negative"):
        from_wire(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[-1], data=b""), "numpy")
    with pytest.raises(ValueError, match="unknown dtype"):
        from_wire(pb.Tensor(dtype=99, shape=[1], data=b"\0"), "numpy")


def test_torch_outputs_are_writable_and_independent():
    wire = _request_tensor(np.arange(4, dtype=np.int8))  # tiny: below the copy threshold
    a = from_wire(wire, "torch")
    b = from_wire(wire, "torch")
    a += 1
    assert torch.equal(b, torch.arange(4, dtype=torch.int8))
    big = from_wire(_request_tensor(np.zeros(1000, dtype=np.float32)), "torch")
    big += 1  # a writable tensor over the received bytes
    assert float(big.sum()) == 1000


def test_run_request_matches_generated_serializer():
    inputs = [
        np.random.rand(2, 3).astype(np.float32),
        np.arange(5, dtype=np.int64),
        np.zeros((0,), dtype=np.uint8),
        np.float64(1.0),
    ]
    expected = pb.RunRequest(
        model="mlp",
        inputs=[
            pb.Tensor(
                dtype=dtypes.BY_NUMPY_NAME[a.dtype.name].wire,
                shape=np.shape(a),
                data=np.ascontiguousarray(a).tobytes(),
            )
            for a in inputs
        ],
    )
    assert pb.RunRequest.FromString(encode_run_request("mlp", inputs)) == expected
    # and byte for byte, for non-empty tensors (proto3 omits empty bytes)
    assert (
        encode_run_request("mlp", inputs[:2])
        == pb.RunRequest(model="mlp", inputs=expected.inputs[:2]).SerializeToString()
    )


def test_run_request_is_a_message_when_small_and_framed_bytes_when_large():
    """What the Run stub sends: the same RunRequest either way."""
    small = [np.random.rand(2, 3).astype(np.float32), np.arange(5, dtype=np.int64)]
    message = run_request("mlp", small)
    assert isinstance(message, pb.RunRequest)
    assert message == pb.RunRequest.FromString(encode_run_request("mlp", small))
    large = [np.random.rand(SMALL_REQUEST_BYTES // 4).astype(np.float32)]
    framed = run_request("mlp", large)
    assert isinstance(framed, bytes) and framed == encode_run_request("mlp", large)
    with pytest.raises(TypeError, match="list or tuple"):
        run_request("mlp", {"x": small[0]})


def test_chunk_request_matches_generated_serializer():
    for name, offset, data in [
        ("fc1.weight", 0, b"abc"),
        ("w", 1 << 40, b"\xff" * 300),
        ("é", 5, b""),
    ]:
        got = pb.UpdateConstantBufferRequest.FromString(
            encode_chunk_request(name, offset, memoryview(data))
        )
        assert got == pb.UpdateConstantBufferRequest(
            chunk=pb.ConstantChunk(name=name, offset=offset, data=data)
        )


def test_upload_stream_header_then_chunks_of_bounded_size():
    weights = {
        "a": np.arange(1000, dtype=np.float32),
        "b.c": torch.ones(3, 7, dtype=torch.bfloat16),
        "s": np.float32(2),
    }
    seen = []
    messages = [
        pb.UpdateConstantBufferRequest.FromString(m)
        for m in encode_upload(
            "mlp",
            upload_items(weights),
            use_inactive=True,
            validate_full_updates=True,
            description="v2",
            chunk_bytes=512,
            progress=lambda s, t: seen.append((s, t)),
        )
    ]
    header = messages[0].header
    assert header.model == "mlp" and header.use_inactive and header.validate_full_updates
    assert header.description == "v2"
    assert [(c.name, c.dtype, list(c.shape)) for c in header.constants] == [
        ("a", pb.DATA_TYPE_FLOAT32, [1000]),
        ("b.c", pb.DATA_TYPE_BFLOAT16, [3, 7]),
        ("s", pb.DATA_TYPE_FLOAT32, []),
    ]
    chunks = [m.chunk for m in messages[1:]]
    assert all(m.WhichOneof("part") == "chunk" for m in messages[1:])
    assert max(len(c.data) for c in chunks) <= 512
    assert [c.offset for c in chunks if c.name == "a"] == list(range(0, 4000, 512))
    total = 4000 + 42 + 4
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    # reassemble as a server would
    got = {}
    for c in chunks:
        got.setdefault(c.name, bytearray())[c.offset : c.offset + len(c.data)] = c.data
    assert got["a"] == weights["a"].tobytes()
    assert got["b.c"] == weights["b.c"].view(torch.uint8).numpy().tobytes()


def test_upload_items_are_loaded_lazily_one_at_a_time():
    loaded = []

    def item(name, n):
        def load():
            loaded.append(name)
            return to_wire(np.zeros(n, dtype=np.float32))

        return UploadItem(name, dtypes.BY_TORCH_NAME["float32"], (n,), load)

    stream = encode_upload(
        "m", [item("x", 10), item("y", 10)], use_inactive=True, validate_full_updates=False
    )
    next(stream)  # header: nothing loaded yet
    assert loaded == []
    next(stream)
    assert loaded == ["x"]
    list(stream)
    assert loaded == ["x", "y"]


def _chunks(name, value, size, order=None):
    wire = to_wire(value)
    pieces = [(off, bytes(wire.data[off : off + size])) for off in range(0, wire.nbytes, size)]
    if order:
        pieces = [pieces[i] for i in order]
    return [
        pb.ConstantChunk(name=name, offset=off, data=data, dtype=wire.dtype.wire, shape=wire.shape)
        for off, data in pieces
    ]


@pytest.mark.parametrize("fmt", ["numpy", "torch"])
def test_assembler_any_order_and_whole_chunks(fmt):
    a = np.random.rand(10, 10).astype(np.float32)
    b = np.arange(3, dtype=np.int64)
    asm = ConstantsAssembler(fmt)
    for c in _chunks("a", a, 96, order=[4, 0, 3, 1, 2]) + _chunks("b", b, 1 << 20):
        asm.add(c)
    out = asm.result()
    np.testing.assert_array_equal(np.asarray(out["a"]), a)
    np.testing.assert_array_equal(np.asarray(out["b"]), b)
    if fmt == "numpy":
        out["a"][0, 0] = 1.0  # reassembled buffers are writable


def test_assembler_bfloat16_via_torch():
    t = torch.randn(7, 9).to(torch.bfloat16)
    asm = ConstantsAssembler("torch")
    for c in _chunks("w", t, 10):
        asm.add(c)
    assert torch.equal(asm.result()["w"], t)


def test_assembler_rejects_bad_streams():
    a = np.arange(8, dtype=np.float32)
    asm = ConstantsAssembler("numpy")
    asm.add(_chunks("a", a, 16)[0])
    with pytest.raises(ValueError, match="received 16 of 32"):
        asm.result()
    asm = ConstantsAssembler("numpy")
    c = _chunks("a", a, 16)[1]
    c.offset = 24
    with pytest.raises(ValueError, match="beyond"):
        asm.add(c)
    asm = ConstantsAssembler("numpy")
    first = _chunks("a", a, 16)[0]
    asm.add(first)
    first.dtype = pb.DATA_TYPE_INT32
    with pytest.raises(ValueError, match="disagree"):
        asm.add(first)


def test_decode_bytes_accepts_any_buffer():
    raw = bytearray(np.arange(6, dtype=np.int16).tobytes())
    d = dtypes.BY_TORCH_NAME["int16"]
    assert decode_bytes(raw, d, (2, 3), "numpy").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert decode_bytes(memoryview(raw), d, (6,), "torch").tolist() == list(range(6))
    assert math.prod(()) == 1


def test_weights_version_digest_and_an_older_daemons_sha256():
    from aotiserve.client.model_info import WeightsVersion

    new = WeightsVersion.from_proto(pb.WeightsVersion(id="v2", digest="xxh3:cd"))
    assert (new.digest, new.sha256) == ("xxh3:cd", "")
    old = WeightsVersion.from_proto(pb.WeightsVersion(id="v1", sha256="ab"))
    assert (old.digest, old.sha256) == ("sha256:ab", "ab")
    assert WeightsVersion.from_proto(pb.WeightsVersion()) is None


def test_a_meta_tensor_is_refused_naming_the_input():
    with pytest.raises(TypeError, match="input 0: a tensor on the meta device"):
        to_wire(torch.empty(2, device="meta"), "input 0")
