"""Client plumbing against a small fake ModelRunner on port 0: call metadata,
error mapping for every status code, chunked streams both ways, health, and
the async client. (Results against the real server: test_client_integration.)"""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import aotiserve.client as ac
from aotiserve.client import errors
from aotiserve.client import health as client_health
from aotiserve.client.tensor_codec import from_wire, to_wire
from aotiserve.v1 import model_runner_pb2 as pb
from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc

TOKEN = "s3cret"
CONSTANTS = {
    "fc.weight": np.arange(3000, dtype=np.float32).reshape(30, 100),
    "fc.bias": np.arange(30, dtype=np.float64),
    "ids": np.arange(7, dtype=np.int64),
}


class FakeRunner(pb_grpc.ModelRunnerServicer):
    """Echo-style behaviour, enough to observe what the client sends."""

    def __init__(self):
        self.metadata: list[dict] = []
        self.uploads: list[tuple[pb.UpdateConstantBufferHeader, dict, list[int]]] = []

    def _note(self, context):
        md = dict(context.invocation_metadata())
        self.metadata.append(md)
        return md

    def _check_model(self, name, context):
        if name.startswith("code:"):
            context.abort(getattr(grpc.StatusCode, name[5:]), f"forced {name[5:]}")
        if name not in ("echo", "trailer"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not loaded")

    def _check_admin(self, context):
        auth = self._note(context).get("authorization")
        if auth is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token required")
        if auth != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong admin token")

    def Run(self, request, context):
        self._note(context)
        self._check_model(request.model, context)
        outs = []
        for t in request.inputs:
            a = from_wire(t, "torch")
            outs.append(
                pb.Tensor(
                    dtype=t.dtype,
                    shape=t.shape,
                    data=(a * 2).contiguous().view(torch.uint8).numpy().tobytes(),
                )
            )
        if request.model == "trailer":
            context.set_trailing_metadata((("aotiserve-weights-version", "v-trailer"),))
            return pb.RunResponse(outputs=outs)
        return pb.RunResponse(outputs=outs, weights_version="v7")

    def GetCallSpec(self, request, context):
        self._note(context)
        self._check_model(request.model, context)
        return pb.GetCallSpecResponse(in_spec="IN", out_spec="OUT")

    def GetConstantNamesToOriginalFqns(self, request, context):
        self._check_model(request.model, context)
        return pb.GetConstantNamesToOriginalFqnsResponse(fqns={"fc_weight": "fc.weight"})

    def GetConstantNamesToDtypes(self, request, context):
        self._check_model(request.model, context)
        return pb.GetConstantNamesToDtypesResponse(dtypes={"fc_weight": 6})

    def ExtractConstantsMap(self, request, context):
        self._check_model(request.model, context)
        size = request.chunk_bytes or 1 << 20
        pieces = []
        for name, a in CONSTANTS.items():
            w = to_wire(a)
            for off in range(0, w.nbytes, size):
                pieces.append(
                    pb.ConstantChunk(
                        name=name,
                        offset=off,
                        data=bytes(w.data[off : off + size]),
                        dtype=w.dtype.wire,
                        shape=a.shape,
                    )
                )
        yield from reversed(pieces)  # any order is allowed

    def UpdateConstantBuffer(self, request_iterator, context):
        self._check_admin(context)
        first = next(request_iterator)
        header = first.header
        self._check_model(header.model, context)
        data, sizes = {}, []
        for req in request_iterator:
            c = req.chunk
            sizes.append(len(c.data))
            data.setdefault(c.name, bytearray())[c.offset : c.offset + len(c.data)] = c.data
        self.uploads.append((header, data, sizes))
        return pb.UpdateConstantBufferResponse(
            version=pb.WeightsVersion(id="v8", digest="xxh3:ab", description=header.description),
            bytes_received=sum(sizes),
            updated=list(data),
        )

    def SwapConstantBuffer(self, request, context):
        self._check_admin(context)
        self._check_model(request.model, context)
        return pb.SwapConstantBufferResponse(active_version=pb.WeightsVersion(id="v8"))

    def ListModels(self, request, context):
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name="echo",
                    path="/m/echo.pt2",
                    devices=["cpu"],
                    runners_per_device=2,
                    state=pb.MODEL_STATE_READY,
                    active_version=pb.WeightsVersion(id="v7"),
                    inputs=[pb.TensorSpec(name="x", dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 64])],
                    metadata={"k": "v"},
                )
            ]
        )


@pytest.fixture(scope="module")
def fake():
    server = grpc.server(futures.ThreadPoolExecutor(8))
    runner = FakeRunner()
    pb_grpc.add_ModelRunnerServicer_to_server(runner, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", runner, health_servicer
    server.stop(0)


def test_run_round_trip_and_version(fake):
    target, _, _ = fake
    with ac.Client(target) as client:
        m = client.model("echo")
        x = np.random.rand(4, 64).astype(np.float32)
        ids = torch.arange(5)
        y, ids2 = m.run([x, ids])
        assert isinstance(y, torch.Tensor)
        np.testing.assert_allclose(y.numpy(), x * 2)
        assert torch.equal(ids2, ids * 2)
        assert m.last_weights_version == "v7"
        t = client.model("trailer")
        t.run([x])
        assert t.last_weights_version == "v-trailer"
        # Later calls: a plain call where the first response carried the version in the
        # message, the trailer read where it did not.
        for _ in range(2):
            m.run([x, ids])
            t.run([x])
            assert (m.last_weights_version, t.last_weights_version) == ("v7", "v-trailer")
        assert client._versioned_runs == {"echo"}


def test_numpy_output_format(fake):
    target, _, _ = fake
    with ac.Client(target, output_format="numpy") as client:
        (y,) = client.model("echo").run((np.ones(3, dtype=np.int32),))
        assert isinstance(y, np.ndarray) and y.tolist() == [2, 2, 2]


def test_admin_token_sent_on_mutating_calls_only(fake):
    """The admin token goes with mutating calls only; the inference token with the others
    (and with mutating ones when there is no admin token); health carries none."""
    target, runner, _ = fake
    for admin, token, want in (
        (TOKEN, None, [None, None, TOKEN]),
        (TOKEN, "inf", ["inf", "inf", TOKEN]),
        (None, "inf", ["inf", "inf", "inf"]),
    ):
        runner.metadata.clear()
        with ac.Client(target, admin_token=admin, token=token) as client:
            m = client.model("echo")
            m.run([np.zeros(1, dtype=np.float32)])
            m.get_call_spec()
            try:
                m.swap_constant_buffer()
            except ac.PermissionDeniedError:
                assert admin is None
            assert client.health() == "SERVING"
        sent = [md.get("authorization") for md in runner.metadata]
        assert sent == [f"Bearer {t}" if t else None for t in want], (admin, token, sent)


def test_async_client_sends_the_admin_token_on_mutating_calls_only(fake):
    target, runner, _ = fake
    runner.metadata.clear()

    async def main():
        async with ac.AsyncClient(target, admin_token=TOKEN) as client:
            m = client.model("echo")
            await m.run([np.zeros(1, dtype=np.float32)])
            await m.get_call_spec()
            await m.swap_constant_buffer()

    asyncio.run(main())
    assert [md.get("authorization") for md in runner.metadata] == [None, None, f"Bearer {TOKEN}"]


def _construct(cls, target, **kw) -> None:
    """Makes (and closes) a client; AsyncClient inside an event loop, as it must be."""
    if cls is ac.Client:
        cls(target, **kw).close()
        return

    async def make():
        await cls(target, **kw).close()

    asyncio.run(make())


@pytest.mark.parametrize("cls", [ac.Client, ac.AsyncClient])
def test_no_token_in_plaintext_to_a_remote_target(cls):
    """A token goes in plaintext only to loopback (or with insecure=True); TLS, or no
    token, goes anywhere. Refused at construction, naming the target."""
    for target in (
        "10.1.2.3:8500",
        "aotiserve-peers:8500",
        "[fd00::1]:8500",
        "dns:///example.com:443",
    ):
        for kw in ({"admin_token": TOKEN}, {"token": TOKEN}):
            with pytest.raises(ValueError, match="plaintext") as e:
                _construct(cls, target, **kw)
            assert target in str(e.value)
    for target, kw in (
        ("10.1.2.3:8500", {"admin_token": TOKEN, "insecure": True}),
        ("10.1.2.3:8500", {"token": TOKEN, "tls": True}),
        ("10.1.2.3:8500", {}),
        ("localhost:8500", {"admin_token": TOKEN}),
        ("127.0.0.1:8500", {"token": TOKEN}),
        ("[::1]:8500", {"admin_token": TOKEN}),
        ("unix:/run/aotiserve.sock", {"admin_token": TOKEN}),
    ):
        _construct(cls, target, **kw)


def test_auth_errors_are_typed(fake):
    target, _, _ = fake
    with ac.Client(target) as client:
        with pytest.raises(ac.UnauthenticatedError) as e:
            client.model("echo").swap_constant_buffer()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with ac.Client(target, admin_token="wrong") as client:
        with pytest.raises(ac.PermissionDeniedError, match="wrong admin token"):
            client.model("echo").swap_constant_buffer()


CODES = [c for c in grpc.StatusCode if c != grpc.StatusCode.OK]


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_every_status_code_maps_to_its_exception(fake, code):
    target, _, _ = fake
    with ac.Client(target) as client:
        with pytest.raises(ac.ClientError) as e:
            client.model(f"code:{code.name}").get_call_spec()
    assert e.value.code == code
    assert e.value.details == f"forced {code.name}"
    assert type(e.value) is errors.error_for(code).__class__
    assert type(e.value) is not ac.ClientError  # every code has its own class
    assert code.name in str(e.value)


def test_not_found_carries_server_message(fake):
    target, _, _ = fake
    with ac.Client(target) as client:
        with pytest.raises(ac.NotFoundError, match="'nope' is not loaded"):
            client.model("nope").run([np.zeros(1)])
        with pytest.raises(ac.NotFoundError):
            list(client.model("nope").extract_constants_map(False).items())


def test_errors_pickle():
    import pickle

    e = pickle.loads(pickle.dumps(ac.InvalidArgumentError("bad input 0")))
    assert isinstance(e, ac.InvalidArgumentError) and e.details == "bad input 0"


def test_describe_methods(fake):
    target, _, _ = fake
    with ac.Client(target) as client:
        m = client.model("echo")
        assert m.get_call_spec() == ["IN", "OUT"]
        assert m.get_constant_names_to_original_fqns() == {"fc_weight": "fc.weight"}
        assert m.get_constant_names_to_dtypes() == {"fc_weight": 6}
        info = m.info()
        assert info.devices == ("cpu",) and info.state == "READY"
        assert info.active_version.id == "v7" and info.staged_version is None
        assert info.inputs[0].dtype == "float32" and info.inputs[0].shape == (-1, 64)
        assert [i.name for i in client.list_models()] == ["echo"]
        with pytest.raises(ac.NotFoundError):
            client.model("other").info()


@pytest.mark.parametrize("chunk", [0, 100, 4096])
def test_extract_reassembles_chunks(fake, chunk):
    target, _, _ = fake
    with ac.Client(target, output_format="numpy") as client:
        got = client.model("echo").extract_constants_map(False, chunk_bytes=chunk)
    assert set(got) == set(CONSTANTS)
    for name, a in CONSTANTS.items():
        np.testing.assert_array_equal(got[name], a)


def test_upload_streams_header_then_bounded_chunks(fake):
    target, runner, _ = fake
    runner.uploads.clear()
    big = torch.randn(1000, 300)  # 1.2 MB
    with ac.Client(target, admin_token=TOKEN, chunk_bytes=64 << 10) as client:
        progress = []
        version = client.model("echo").update_constant_buffer(
            {"fc.weight": big, "bias": np.ones(3, dtype=np.float16)},
            True,
            True,
            description="nightly",
            progress=lambda s, t: progress.append((s, t)),
        )
    assert version.id == "v8" and version.description == "nightly"
    header, data, sizes = runner.uploads[-1]
    assert header.use_inactive and header.validate_full_updates and not header.user_managed
    assert [(c.name, list(c.shape), c.dtype) for c in header.constants] == [
        ("fc.weight", [1000, 300], pb.DATA_TYPE_FLOAT32),
        ("bias", [3], pb.DATA_TYPE_FLOAT16),
    ]
    assert max(sizes) == 64 << 10 and len(sizes) == 19 + 1
    assert bytes(data["fc.weight"]) == big.numpy().tobytes()
    assert progress[-1] == (1_200_000 + 6, 1_200_000 + 6)


def test_tensor_larger_than_message_limit_travels_in_chunks(fake):
    target, runner, _ = fake
    # the client's own send limit is 1 MiB; the tensor is 3 MiB
    with ac.Client(
        target, admin_token=TOKEN, max_message_bytes=1 << 20, chunk_bytes=256 << 10
    ) as client:
        w = np.random.rand(3 << 18).astype(np.float32)
        client.model("echo").update_constant_buffer({"w": w}, True, False)
        assert bytes(runner.uploads[-1][1]["w"]) == w.tobytes()
        with pytest.raises(ac.ResourceExhaustedError):  # a single Run message cannot exceed it
            client.model("echo").run([w])


def test_health_against_grpc_health_servicer(fake):
    target, _, servicer = fake
    with ac.Client(target) as client:
        assert client.health() == "SERVING"
        servicer.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert client.health("svc") == "NOT_SERVING"
        with pytest.raises(ac.NotFoundError):
            client.health("unknown-service")
        with pytest.raises(ac.DeadlineExceededError, match="NOT_SERVING"):
            client.wait_until_ready(timeout=0.5, service="svc")
        threading.Timer(0.3, servicer.set, ("svc", health_pb2.HealthCheckResponse.SERVING)).start()
        client.wait_until_ready(timeout=10, service="svc")  # follows the Watch stream


def test_wait_until_ready_before_the_server_listens():
    # A port nobody listens on yet (grpc listens at add_insecure_port, so the
    # server is created only when it is time to start it).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = []

    def start():
        server = grpc.server(futures.ThreadPoolExecutor(2))
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        started.append(server)

    with ac.Client(f"127.0.0.1:{port}") as client:
        with pytest.raises(ac.UnavailableError):
            client.health()
        threading.Timer(0.3, start).start()
        client.wait_until_ready(timeout=20)
        assert client.health() == "SERVING"
    started[0].stop(0)


def test_health_wire_format_matches_grpc_health():
    for service in ("", "aotiserve.v1.ModelRunner", "x" * 300):
        assert (
            client_health.encode_request(service)
            == health_pb2.HealthCheckRequest(service=service).SerializeToString()
        )
    for status, name in client_health.STATUS_NAMES.items():
        raw = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert client_health.decode_response(raw) == name


def test_async_client(fake):
    target, runner, _ = fake

    async def main():
        async with ac.AsyncClient(target, admin_token=TOKEN) as client:
            await client.wait_until_ready(timeout=10)
            assert await client.health() == "SERVING"
            m = client.model("echo")
            x = np.random.rand(2, 64).astype(np.float32)
            (y,) = await m.run([x])
            np.testing.assert_allclose(np.asarray(y), x * 2)
            assert m.last_weights_version == "v7"
            t = client.model("trailer")
            await t.run([x])
            assert t.last_weights_version == "v-trailer"
            assert await m.get_call_spec() == ["IN", "OUT"]
            assert await m.get_constant_names_to_dtypes() == {"fc_weight": 6}
            got = await m.extract_constants_map(False, chunk_bytes=500)
            np.testing.assert_array_equal(np.asarray(got["fc.weight"]), CONSTANTS["fc.weight"])
            v = await m.update_constant_buffer(
                {"w": np.ones(10, dtype=np.float32)}, True, True, chunk_bytes=16
            )
            assert v.id == "v8"
            assert (await m.swap_constant_buffer()).id == "v8"
            assert (await m.info()).name == "echo"
            with pytest.raises(ac.NotFoundError):
                await client.model("nope").run([x])
            with pytest.raises(ac.InvalidArgumentError):
                await client.model("code:INVALID_ARGUMENT").get_call_spec()
        async with ac.AsyncClient(target) as anonymous:
            with pytest.raises(ac.UnauthenticatedError):
                await anonymous.model("echo").swap_constant_buffer()

    asyncio.run(main())
    assert runner.uploads[-1][2] == [16] * 2 + [8]
