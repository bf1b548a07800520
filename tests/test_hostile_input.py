"""Hostile requests cost the daemon little and change nothing.

- Every parser counts as it reads: a 64 MiB request of repeated empty inputs, shape
  entries, raw_input_contents entries or declared constants is INVALID_ARGUMENT naming
  what was wrong, raises the daemon's peak RSS by at most twice its size and costs
  under a second of CPU (a daemon process, measured from /proc);
- oversized or overflowing shapes (zero-element ones too) are INVALID_ARGUMENT naming the
  input, with no traceback in the log; a ModelStreamInfer stream answers a bad message
  in the stream and goes on;
- health Watch takes only the names the daemon serves (others: NOT_FOUND at once,
  nothing kept); Health/List answers.
"""

from __future__ import annotations

import logging
import os

import grpc
import model_zoo
import pytest
import torch
import wire
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import status_of, wait_for
from oip_messages import OipStub, ipb
from server_harness import daemon_process

from aotiserve.v1 import model_runner_pb2 as pb

CODE = grpc.StatusCode
MIB = 1 << 20
HOSTILE_BYTES = 64 * MIB
RUN = "/aotiserve.v1.ModelRunner/Run"
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
UPLOAD = "/aotiserve.v1.ModelRunner/UpdateConstantBuffer"
TRANSPORT_SLACK = 16 * MIB


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _fill(head: bytes, unit: bytes, tail: bytes = b"", size: int = HOSTILE_BYTES) -> bytes:
    """``head``, then ``unit`` repeated, then ``tail``: about ``size`` bytes."""
    return head + unit * ((size - len(head) - len(tail)) // len(unit)) + tail


def _nested_fill(field: int, inner_head: bytes, unit: bytes) -> bytes:
    """One length-delimited ``field`` holding ``inner_head`` and ``unit`` repeated."""
    body = _fill(inner_head, unit, size=HOSTILE_BYTES - 16)
    return _ld(field, body)


# (name, method, request bytes, what the refusal names)
HOSTILE = [
    ("Run: empty inputs", RUN, _fill(_ld(1, b"mlp"), b"\x12\x00"), "more than 64 inputs"),
    (
        "Run: packed shape entries",
        RUN,
        _ld(1, b"mlp") + _ld(2, _nested_fill(2, b"", b"\x01")),
        "input 0: rank exceeds",
    ),
    (
        "Run: unpacked shape entries",
        RUN,
        _ld(1, b"mlp") + _nested_fill(2, b"", b"\x10\x01"),
        "input 0: rank exceeds",
    ),
    ("Run: unknown fields", RUN, _fill(_ld(1, b"mlp"), b"\x20\x01"), "more than 64 fields"),
    ("ModelInfer: empty inputs", INFER, _fill(_ld(1, b"mlp"), b"\x2a\x00"), "more than 64 inputs"),
    (
        "ModelInfer: shape entries",
        INFER,
        _ld(1, b"mlp") + _nested_fill(5, _ld(1, b"x") + _ld(2, b"FP32") + b"\x1a\x00", b"\x18\x01"),
        "input 0 ('x'): rank exceeds",
    ),
    (
        "ModelInfer: packed shape entries",
        INFER,
        _ld(1, b"mlp") + _ld(5, _ld(1, b"x") + _nested_fill(3, b"", b"\x01")),
        "input 0 ('x'): rank exceeds",
    ),
    (
        "ModelInfer: raw_input_contents entries",
        INFER,
        _fill(_ld(1, b"mlp"), b"\x3a\x00"),
        "more than 64 raw_input_contents entries",
    ),
    (
        "ModelInfer: parameters",
        INFER,
        _fill(_ld(1, b"mlp"), b"\x22\x00"),
        "more than 64 parameters",
    ),
    (
        "ModelInfer: requested outputs",
        INFER,
        _fill(_ld(1, b"mlp"), b"\x32\x00"),
        "more than 64 requested outputs",
    ),
    (
        "ModelInfer: inputs inside an unknown group",
        INFER,
        _fill(_ld(1, b"mlp") + b"\x7b", b"\x2a\x00", b"\x7c"),
        "more than 64 fields",
    ),
    (
        "GetCallSpec: repeated model names",
        "/aotiserve.v1.ModelRunner/GetCallSpec",
        _fill(b"", b"\x0a\x01a"),
        "more than 64 fields",
    ),
    (
        "ModelMetadata: repeated names",
        "/inference.GRPCInferenceService/ModelMetadata",
        _fill(b"", b"\x0a\x01a"),
        "more than 64 fields",
    ),
    (
        "Health/Check: repeated service names",
        "/grpc.health.v1.Health/Check",
        _fill(b"", b"\x0a\x01a"),
        "more than 64 fields",
    ),
    (
        "UpdateConstantBuffer: declared constants",
        UPLOAD,
        _ld(1, _fill(_ld(1, b"mlp"), b"\x2a\x00", size=HOSTILE_BYTES - 16)),
        "more than 65536 declared constants",
    ),
]


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reset_peak(pid: int) -> None:
    """Peak RSS back to the current RSS (Linux: clear_refs 5), where allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _send(channel: grpc.Channel, method: str, raw: bytes, timeout: float = 60):
    if method == UPLOAD:
        return channel.stream_unary(method)(iter([raw]), timeout=timeout)
    return channel.unary_unary(method)(raw, timeout=timeout)


@pytest.fixture(scope="module")
def daemon():
    """A daemon process serving mlp, and a channel that may send 64 MiB messages."""
    with daemon_process(["mlp"]) as d:
        channel = grpc.insecure_channel(
            d.target, options=[("grpc.max_send_message_length", 2 * HOSTILE_BYTES)]
        )
        # gRPC grows its receive buffers on the first large message, whatever it holds:
        # one that is nothing to walk (one 64 MiB unknown field) pays that first.
        code, details = status_of(
            lambda: _send(channel, RUN, _ld(1, b"mlp") + _ld(15, bytes(HOSTILE_BYTES - 64)))
        )
        assert code == CODE.INVALID_ARGUMENT and "got 0" in details, details
        yield d, channel
        channel.close()


@pytest.mark.parametrize("name, method, raw, names", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_64_mib_request_is_refused_cheaply(daemon, name, method, raw, names):
    d, channel = daemon
    pid = d.proc.pid
    assert len(raw) >= HOSTILE_BYTES - MIB
    _reset_peak(pid)
    before, cpu_before = _proc_status(pid), _cpu_seconds(pid)
    code, details = status_of(lambda: _send(channel, method, raw))
    after, cpu_after = _proc_status(pid), _cpu_seconds(pid)
    assert code == CODE.INVALID_ARGUMENT and names in details, (code, details)
    grown = after["VmHWM"] - min(before["VmRSS"], before["VmHWM"])
    # grpcio itself holds a message twice at its peak (the received slices and the bytes
    # it hands the handler), plus a few MiB of read buffers; the parsers add nothing per
    # entry (before, this request took gigabytes).
    assert grown <= 2 * len(raw) + TRANSPORT_SLACK, f"{name}: peak RSS grew {grown / MIB:.0f} MiB"
    assert cpu_after - cpu_before < 1.0, f"{name}: {cpu_after - cpu_before:.2f} s of CPU"
    assert d.proc.poll() is None
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_watching_unknown_health_names_keeps_nothing(daemon):
    """40 watches of 8 MiB made-up names: each NOT_FOUND at once, none kept (grpc_health's
    servicer answered SERVICE_UNKNOWN and kept every name, ~300 MB, for good)."""
    d, channel = daemon
    stub = health_pb2_grpc.HealthStub(channel)
    before = _proc_status(d.proc.pid)["VmRSS"]
    for i in range(40):
        name = f"{i}-" + "x" * (8 * MIB)
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() == CODE.NOT_FOUND and len(e.value.details()) < 200
    grown = _proc_status(d.proc.pid)["VmRSS"] - before
    assert grown < 64 * MIB, f"RSS grew {grown / MIB:.0f} MiB"


# ---------------------------------------------------------------- shapes

BAD_SHAPES = [
    [0, 1 << 62, 1 << 62],
    [1 << 62],
    [1 << 40, 64],
    [0, 1 << 31, 1 << 31, 1 << 31],
    [1 << 40, 1 << 40, 0],
    [(1 << 63) - 1, 64],
    [0, (1 << 63) - 1],
]


def _big(raw: bytes) -> bytes:
    """``raw`` with a 20 KiB unknown field: past the size protobuf's parser takes."""
    return raw + _ld(15, bytes(20 << 10))


@pytest.mark.parametrize("shape", BAD_SHAPES, ids=str)
def test_oversized_or_overflowing_shape_is_invalid_argument_naming_the_input(
    server_factory, caplog, shape
):
    s = server_factory(["mlp"])
    oip = OipStub(s.channel)
    run = s.channel.unary_unary(RUN)
    infer = s.channel.unary_unary(INFER)
    caplog.set_level(logging.DEBUG)
    run_raw = pb.RunRequest(
        model="mlp", inputs=[pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=shape)]
    ).SerializeToString()
    req = ipb.ModelInferRequest(model_name="mlp", raw_input_contents=[b""])
    req.inputs.add(name="x", datatype="FP32", shape=shape)
    typed = ipb.ModelInferRequest(model_name="mlp")
    typed.inputs.add(name="x", datatype="FP32", shape=shape)
    typed.inputs[0].contents.SetInParent()
    for what, call, names in (
        ("Run", lambda: run(run_raw, timeout=10), "input 0"),
        ("Run (walked)", lambda: run(_big(run_raw), timeout=10), "input 0"),
        ("ModelInfer", lambda: oip.ModelInfer(req, timeout=10), "'x'"),
        ("ModelInfer (walked)", lambda: infer(_big(req.SerializeToString()), timeout=10), "'x'"),
        ("ModelInfer (typed contents)", lambda: oip.ModelInfer(typed, timeout=10), "'x'"),
    ):
        caplog.clear()
        code, details = status_of(call)
        assert code == CODE.INVALID_ARGUMENT and names in details, (what, code, details)
        records = [r for r in caplog.records if r.name.startswith("aotiserve")]
        assert len(records) <= 1 and not any(r.exc_info for r in records), (what, records)
    assert s.stub.Run(wire.run_request("mlp", [torch.zeros(2, 64)]), timeout=10).outputs


def test_max_inputs_is_configurable(server_factory):
    s = server_factory(["two_io"], max_inputs=2)
    oip = OipStub(s.channel)
    inputs = model_zoo.MODELS["two_io"].inputs(2)
    assert wire.close(
        wire.outputs(s.stub.Run(wire.run_request("two_io", inputs))),
        model_zoo.eager("two_io", inputs),
    )
    for request in (
        wire.run_request("two_io", [*inputs, inputs[0]]),
        pb.RunRequest.FromString(
            _big(wire.run_request("two_io", [*inputs, inputs[0]]).SerializeToString())
        ),
    ):
        code, details = status_of(lambda: s.stub.Run(request, timeout=10))
        assert code == CODE.INVALID_ARGUMENT and "more than 2 inputs" in details, details
        assert "max_inputs" in details
    req = ipb.ModelInferRequest(model_name="two_io")
    for name in ("a", "b", "c"):
        req.inputs.add(name=name, datatype="FP32", shape=[1])
    code, details = status_of(lambda: oip.ModelInfer(req, timeout=10))
    assert code == CODE.INVALID_ARGUMENT and "more than 2 inputs" in details, details


def test_stream_infer_answers_a_bad_message_in_the_stream_and_goes_on(server_factory):
    """Each refused message, even one that does not decode, gets its error in its
    response (OIP's error_message); the messages after it are served."""
    s = server_factory(["mlp"])
    x = model_zoo.MODELS["mlp"].inputs(2)[0]

    def infer(id_, shape, data):
        req = ipb.ModelInferRequest(model_name="mlp", id=id_, raw_input_contents=[data])
        req.inputs.add(name="x", datatype="FP32", shape=shape)
        return req.SerializeToString()

    many = ipb.ModelInferRequest(model_name="mlp", id="many")
    for _ in range(65):
        many.inputs.add(name="x", datatype="FP32", shape=[1])
    messages = [
        infer("first", [2, 64], x.numpy().tobytes()),
        infer("huge", [0, 1 << 62, 1 << 62], b""),
        infer("overflow", [0, 1 << 31, 1 << 31, 1 << 31], b""),
        many.SerializeToString(),
        b"\xff\xff\xff" + b"x" * 64,
        infer("wrong", [3, 64], b"\0" * 4),
        infer("last", [2, 64], x.numpy().tobytes()),
    ]
    call = s.channel.stream_stream(
        STREAM_INFER, response_deserializer=ipb.ModelStreamInferResponse.FromString
    )
    responses = list(call(iter(messages), timeout=30))
    assert len(responses) == len(messages)
    errors = [r.error_message for r in responses]
    assert not errors[0] and not errors[-1], errors
    want = [None, "'x'", "'x'", "more than 64 inputs", "not a valid message", "'x'", None]
    for got, expect in zip(errors[1:-1], want[1:-1]):
        assert got.startswith("INVALID_ARGUMENT: ") and expect in got, (got, expect)
    assert [r.infer_response.id for r in responses][-2:] == ["wrong", "last"]
    want_out = model_zoo.eager("mlp", [x])[0]
    for r in (responses[0], responses[-1]):
        out = torch.frombuffer(
            bytearray(r.infer_response.raw_output_contents[0]), dtype=torch.float32
        ).view(*r.infer_response.outputs[0].shape)
        assert torch.allclose(out, want_out, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- health


def test_health_watch_takes_only_served_names_and_list_answers(server_factory):
    s = server_factory(["mlp"])
    stub = health_pb2_grpc.HealthStub(s.channel)
    served = {"", "aotiserve.v1.ModelRunner", "inference.GRPCInferenceService"}
    for name in ("nope", "aotiserve.v1.ModelRunnerX", "x" * MIB):
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() == CODE.NOT_FOUND, e.value.details()
        code, _ = status_of(
            lambda: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        )
        assert code == CODE.NOT_FOUND
    assert s.app.port_server.watchers() == 0  # nothing kept for them
    # A served name is watched as ever, and forgotten with its last stream.
    streams = [
        stub.Watch(health_pb2.HealthCheckRequest(service="aotiserve.v1.ModelRunner"), timeout=30)
        for _ in range(2)
    ]
    for stream in streams:
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    assert s.app.port_server.watchers() == 1
    for stream in streams:
        stream.cancel()
    wait_for(lambda: s.app.port_server.watchers() == 0, "the watchers to be forgotten")
    listed = stub.List(health_pb2.HealthListRequest(), timeout=10)
    assert set(listed.statuses) == served
    assert {v.status for v in listed.statuses.values()} == {health_pb2.HealthCheckResponse.SERVING}
