"""Who may talk to the daemon and change what it serves (issue 8).

- TLS / mutual TLS at the transport: certificates from another CA are refused both ways
  (the client library's happy paths live in test_client_tls.py);
- the admin token on every mutating RPC of both services: missing → UNAUTHENTICATED,
  wrong → PERMISSION_DENIED, right → the RPC runs; the token never reaches the log;
- the optional inference token, admin RPCs on loopback only or on a separate admin port;
- path traversal (``..``, symlinks, absolute paths outside the roots) for LoadModel,
  UpdateConstantBufferFromBlob and OIP RepositoryModelLoad;
- configured resource bounds answer with their status code;
- nothing the server runs unpickles client data.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from pathlib import Path

import grpc
import model_zoo
import pki as pki_files
import pytest
import torch
import wire
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import external_ip, new_weights, status_of, wait_for
from oip_messages import OipStub, ipb
from server_harness import REPO_ROOT, running_server

from aotiserve import runner_ext
from aotiserve.server import interceptors
from aotiserve.v1 import model_runner_pb2 as pb
from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc

CODE = grpc.StatusCode
TOKEN = "adm1n-s3cret-token"
INFER_TOKEN = "inf3rence-token"


def _bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


# ---------------------------------------------------------------- TLS

needs_openssl = pytest.mark.skipif(not pki_files.HAVE_OPENSSL, reason="needs openssl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Our CA (server + client certs) and a rogue CA (its own server + client certs)."""
    return pki_files.make(tmp_path_factory.mktemp("pki"), rogue=True)


def _secure_health(target: str, ca: Path, cert: Path | None = None, key: Path | None = None):
    creds = grpc.ssl_channel_credentials(
        ca.read_bytes(), key.read_bytes() if key else None, cert.read_bytes() if cert else None
    )
    with grpc.secure_channel(target, creds) as ch:
        return status_of(
            lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        )


@needs_openssl
def test_tls_refuses_a_server_from_another_ca_and_plaintext(pki):
    with running_server(
        ["mlp"], tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")
    ) as s:
        assert _secure_health(s.target, pki / "ca.pem")[0] == CODE.OK
        # A client that trusts only the rogue CA refuses our server's certificate.
        assert _secure_health(s.target, pki / "rogue_ca.pem")[0] == CODE.UNAVAILABLE
        with grpc.insecure_channel(s.target) as ch:
            code, _ = status_of(
                lambda: health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            )
        assert code == CODE.UNAVAILABLE
    # And a server with the rogue CA's certificate is refused by a client trusting ours.
    with running_server(
        ["mlp"], tls_cert=str(pki / "rogue_server.pem"), tls_key=str(pki / "rogue_server.key")
    ) as s:
        assert _secure_health(s.target, pki / "ca.pem")[0] == CODE.UNAVAILABLE


@needs_openssl
def test_mutual_tls_refuses_missing_and_foreign_client_certificates(pki):
    with running_server(
        ["mlp"],
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_ca=str(pki / "ca.pem"),
    ) as s:
        ca = pki / "ca.pem"
        assert _secure_health(s.target, ca, pki / "client.pem", pki / "client.key")[0] == CODE.OK
        assert _secure_health(s.target, ca)[0] == CODE.UNAVAILABLE
        # A well-formed client certificate, signed by a CA the server does not trust.
        code, _ = _secure_health(s.target, ca, pki / "rogue_client.pem", pki / "rogue_client.key")
        assert code == CODE.UNAVAILABLE
        # Nothing reached a servicer: the refused handshakes ran no RPC.
        assert not any(
            sample.labels.get("method") == "Run"
            for family in s.app.metrics.registry.collect()
            if family.name == "aotiserve_requests"
            for sample in family.samples
        )


# ---------------------------------------------------------------- admin token


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    d = tmp_path_factory.mktemp("guarded")
    token_file = d / "token"
    token_file.write_text(TOKEN + "\n")
    with running_server(["mlp", "two_io"], admin_token_file=str(token_file)) as s:
        (s.repo / "junk.blob").write_bytes(b"\0" * 100)
        yield s


def _upload(model="mlp"):
    return lambda stub, md: stub.UpdateConstantBuffer(
        wire.upload_requests(model, new_weights(model), validate_full=True), metadata=md, timeout=30
    )


# Each mutating RPC, called with the right token, in an order where it succeeds (or fails
# on its own terms, showing it ran): (method, call(native stub, oip stub, metadata), code).
MUTATING_CALLS = [
    (
        "/aotiserve.v1.ModelRunner/LoadModel",
        lambda s, o, md, repo: s.LoadModel(
            pb.LoadModelRequest(name="mlp2", path=str(repo / "mlp.pt2")), metadata=md
        ),
        CODE.OK,
    ),
    (
        "/aotiserve.v1.ModelRunner/UnloadModel",
        lambda s, o, md, repo: s.UnloadModel(pb.UnloadModelRequest(name="mlp2"), metadata=md),
        CODE.OK,
    ),
    (
        "/aotiserve.v1.ModelRunner/UpdateConstantBuffer",
        lambda s, o, md, repo: _upload()(s, md),
        CODE.OK,
    ),
    (
        "/aotiserve.v1.ModelRunner/SwapConstantBuffer",
        lambda s, o, md, repo: s.SwapConstantBuffer(
            pb.SwapConstantBufferRequest(model="mlp"), metadata=md
        ),
        CODE.OK,
    ),
    (
        "/aotiserve.v1.ModelRunner/RollbackConstantBuffer",
        lambda s, o, md, repo: s.RollbackConstantBuffer(
            pb.RollbackConstantBufferRequest(model="mlp"), metadata=md
        ),
        CODE.OK,
    ),
    (
        "/aotiserve.v1.ModelRunner/FreeInactiveConstantBuffer",
        lambda s, o, md, repo: s.FreeInactiveConstantBuffer(
            pb.FreeInactiveConstantBufferRequest(model="mlp"), metadata=md
        ),
        CODE.OK,
    ),
    (
        "/aotiserve.v1.ModelRunner/UpdateConstantBufferFromBlob",
        lambda s, o, md, repo: s.UpdateConstantBufferFromBlob(
            pb.UpdateConstantBufferFromBlobRequest(
                model="mlp", weights_path=str(repo / "junk.blob")
            ),
            metadata=md,
        ),
        CODE.INVALID_ARGUMENT,
    ),  # it ran: the blob is too short for the model
    (
        "/aotiserve.v1.ModelRunner/LoadWeights",
        lambda s, o, md, repo: s.LoadWeights(
            pb.LoadWeightsRequest(model="mlp", path=str(repo / "junk.blob")), metadata=md
        ),
        CODE.INVALID_ARGUMENT,
    ),  # it ran: not a safetensors file
    (
        "/aotiserve.v1.ModelRunner/LoadWeightsFromCuda",
        lambda s, o, md, repo: s.LoadWeightsFromCuda(
            pb.LoadWeightsFromCudaRequest(model="mlp", host_id="another-host"), metadata=md
        ),
        CODE.FAILED_PRECONDITION,
    ),  # it ran: handles from another host are refused
    (
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        lambda s, o, md, repo: o.RepositoryModelUnload(
            ipb.RepositoryModelUnloadRequest(model_name="two_io"), metadata=md
        ),
        CODE.OK,
    ),
    (
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        lambda s, o, md, repo: o.RepositoryModelLoad(
            ipb.RepositoryModelLoadRequest(model_name="two_io"), metadata=md
        ),
        CODE.OK,
    ),
    (
        "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
        lambda s, o, md, repo: o.SystemSharedMemoryRegister(
            ipb.SystemSharedMemoryRegisterRequest(
                name="r", key="/aotiserve-no-such-object", byte_size=8
            ),
            metadata=md,
        ),
        CODE.INVALID_ARGUMENT,
    ),  # it ran: no such shared-memory object
    (
        "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
        lambda s, o, md, repo: o.SystemSharedMemoryUnregister(
            ipb.SystemSharedMemoryUnregisterRequest(), metadata=md
        ),
        CODE.OK,
    ),
    (
        "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
        lambda s, o, md, repo: o.CudaSharedMemoryRegister(
            ipb.CudaSharedMemoryRegisterRequest(
                name="c", raw_handle=b"\0" * 64, device_id=0, byte_size=64
            ),
            metadata=md,
        ),
        # it ran: a handle of zeros opens nothing (a build without CUDA has no CUDA regions)
        CODE.INVALID_ARGUMENT if runner_ext.open_cuda_ipc is not None else CODE.UNIMPLEMENTED,
    ),
    (
        "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
        lambda s, o, md, repo: o.CudaSharedMemoryUnregister(
            ipb.CudaSharedMemoryUnregisterRequest(), metadata=md
        ),
        CODE.OK,
    ),
]


def test_every_mutating_rpc_is_in_the_table():
    assert {m for m, _, _ in MUTATING_CALLS} == set(interceptors.MUTATING_METHODS)


def test_admin_token_missing_wrong_right_for_each_mutating_rpc(guarded, caplog):
    stub, oip = guarded.stub, OipStub(guarded.channel)
    inputs = model_zoo.MODELS["mlp"].inputs(2)
    want = model_zoo.eager("mlp", inputs)
    caplog.set_level(logging.DEBUG)

    def state():
        return sorted(
            (m.name, m.active_version.id, m.staged_version.id, m.previous_version.id)
            for m in stub.ListModels(pb.ListModelsRequest()).models
        )

    for method, call, right in MUTATING_CALLS:
        before = state()
        for md, expect in (
            ((), CODE.UNAUTHENTICATED),
            (_bearer("wrong"), CODE.PERMISSION_DENIED),
            (_bearer(TOKEN[:-1]), CODE.PERMISSION_DENIED),
            (_bearer(TOKEN + "x"), CODE.PERMISSION_DENIED),
            ((("authorization", "Basic " + TOKEN),), CODE.PERMISSION_DENIED),
            ((("x-admin-token", TOKEN),), CODE.UNAUTHENTICATED),
        ):
            code, details = status_of(lambda: call(stub, oip, md, guarded.repo))
            assert code == expect, (method, md, code, details)
        assert state() == before, method  # refused calls changed nothing
        code, details = status_of(lambda: call(stub, oip, _bearer(TOKEN), guarded.repo))
        assert code == right, (method, code, details)
    # After load/unload, stage/swap/rollback/free and the OIP unload/load: packaged weights.
    assert wire.close(wire.outputs(stub.Run(wire.run_request("mlp", inputs))), want)
    # Reads need no token.
    assert stub.Run(wire.run_request("mlp", inputs)).outputs
    assert stub.ListModels(pb.ListModelsRequest()).models
    assert oip.ServerReady(ipb.ServerReadyRequest()).ready
    assert TOKEN not in caplog.text


def test_token_is_not_logged_at_start(tmp_path, caplog):
    token_file = tmp_path / "tok"
    token_file.write_text(TOKEN)
    caplog.set_level(logging.DEBUG)
    from aotiserve.server.config import ServeConfig

    cfg = ServeConfig(admin_token_file=str(token_file), inference_token_file=str(token_file))
    assert TOKEN not in repr(cfg.redacted()) and TOKEN not in repr(cfg)
    with running_server(["mlp"], admin_token_file=str(token_file)):
        pass
    assert TOKEN not in caplog.text


def test_inference_token(tmp_path):
    (tmp_path / "admin").write_text(TOKEN)
    (tmp_path / "infer").write_text(INFER_TOKEN)
    with running_server(
        ["mlp"],
        admin_token_file=str(tmp_path / "admin"),
        inference_token_file=str(tmp_path / "infer"),
    ) as s:
        oip = OipStub(s.channel)
        req = wire.run_request("mlp", model_zoo.MODELS["mlp"].inputs(1))
        for md, expect in (
            ((), CODE.UNAUTHENTICATED),
            (_bearer("nope"), CODE.PERMISSION_DENIED),
            (_bearer(INFER_TOKEN), CODE.OK),
            (_bearer(TOKEN), CODE.OK),
        ):
            assert status_of(lambda: s.stub.Run(req, metadata=md))[0] == expect, md
            assert (
                status_of(lambda: s.stub.ListModels(pb.ListModelsRequest(), metadata=md))[0]
                == expect
            ), md
            assert (
                status_of(lambda: oip.ServerMetadata(ipb.ServerMetadataRequest(), metadata=md))[0]
                == expect
            ), md
            # Shared memory: none of it without the token (a status of no region is OK).
            assert (
                status_of(
                    lambda: oip.SystemSharedMemoryStatus(
                        ipb.SystemSharedMemoryStatusRequest(), metadata=md
                    )
                )[0]
                == expect
            ), md
        # Registering shared memory is a mutating RPC: the admin token, not the inference one.
        register = ipb.SystemSharedMemoryRegisterRequest(
            name="r", key="/aotiserve-no-such-object", byte_size=8
        )
        for md, expect in (
            ((), CODE.UNAUTHENTICATED),
            (_bearer(INFER_TOKEN), CODE.PERMISSION_DENIED),
            (_bearer(TOKEN), CODE.INVALID_ARGUMENT),  # it ran: no such object
        ):
            code = status_of(lambda: oip.SystemSharedMemoryRegister(register, metadata=md))[0]
            assert code == expect, md
        # The inference token is no admin token.
        code, _ = status_of(
            lambda: s.stub.SwapConstantBuffer(
                pb.SwapConstantBufferRequest(model="mlp"), metadata=_bearer(INFER_TOKEN)
            )
        )
        assert code == CODE.PERMISSION_DENIED
        # Probes need no token.
        status = health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_loopback_peer_detection():
    loop = interceptors._is_loopback
    assert loop("ipv4:127.0.0.1:5000") and loop("ipv6:[::1]:5000") and loop("unix:/run/a.sock")
    assert loop("ipv6:[::ffff:127.0.0.1]:5000")
    assert not loop("ipv4:10.1.2.3:5000") and not loop("ipv6:[fe80::1]:5000")
    assert not loop("ipv4:128.0.0.1:1") and not loop("garbage")
    assert loop("ipv6:%5B::1%5D:5000")  # gRPC C++ percent-encodes the brackets


def test_admin_loopback_only():
    with running_server(["mlp"], host="0.0.0.0", admin_loopback_only=True) as s:
        swap = pb.SwapConstantBufferRequest(model="mlp")
        # From loopback the call runs (and fails on its own terms: nothing staged).
        assert status_of(lambda: s.stub.SwapConstantBuffer(swap))[0] == CODE.FAILED_PRECONDITION
        ip = external_ip()
        if ip is None:
            pytest.skip("no non-loopback address on this machine")
        port = s.target.rsplit(":", 1)[1]
        with grpc.insecure_channel(f"{ip}:{port}") as ch:
            stub = pb_grpc.ModelRunnerStub(ch)
            code, details = status_of(lambda: stub.SwapConstantBuffer(swap, timeout=10))
            assert code == CODE.PERMISSION_DENIED and "loopback" in details
            assert (
                status_of(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10))[0] == CODE.OK
            )


def test_admin_rpcs_on_a_separate_port(tmp_path):
    (tmp_path / "admin").write_text(TOKEN)
    with running_server(["mlp"], admin_port=0, admin_token_file=str(tmp_path / "admin")) as s:
        assert s.app.admin_port and s.app.admin_port != int(s.target.rsplit(":", 1)[1])
        swap = pb.SwapConstantBufferRequest(model="mlp")
        code, details = status_of(lambda: s.stub.SwapConstantBuffer(swap, metadata=_bearer(TOKEN)))
        assert code == CODE.PERMISSION_DENIED and "admin port" in details
        with grpc.insecure_channel(f"127.0.0.1:{s.app.admin_port}") as ch:
            admin = pb_grpc.ModelRunnerStub(ch)
            assert status_of(lambda: admin.SwapConstantBuffer(swap))[0] == CODE.UNAUTHENTICATED
            code, _ = status_of(lambda: admin.SwapConstantBuffer(swap, metadata=_bearer(TOKEN)))
            assert code == CODE.FAILED_PRECONDITION  # ran: nothing staged
            version = admin.UpdateConstantBuffer(
                wire.upload_requests("mlp", new_weights("mlp"), validate_full=True),
                metadata=_bearer(TOKEN),
            ).version
            assert (
                admin.SwapConstantBuffer(swap, metadata=_bearer(TOKEN)).active_version.id
                == version.id
            )
            assert admin.ListModels(pb.ListModelsRequest()).models
        # Inference on the main port sees the swap.
        out = s.stub.Run.with_call(wire.run_request("mlp", model_zoo.MODELS["mlp"].inputs(1)))
        assert ("aotiserve-weights-version", version.id) in tuple(out[1].trailing_metadata())


# ---------------------------------------------------------------- paths


def test_compressed_requests_are_refused_before_they_are_inflated(server_factory):
    """gRPC 1.51 inflates a compressed message whole before it compares it with the size
    limit (a 1 MB gzip body cost the daemon 1 GiB and seconds of CPU): the port takes
    uncompressed messages only, and refuses others from their headers."""
    s = server_factory(["mlp"], max_message_bytes=1 << 20)
    zeros = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4 << 20], data=bytes(16 << 20))
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(s.target, options=options) as ch:
        stub = pb_grpc.ModelRunnerStub(ch)
        for algorithm in (grpc.Compression.Gzip, grpc.Compression.Deflate):
            for call in (
                lambda c: stub.Run(pb.RunRequest(model="mlp", inputs=[zeros]), compression=c),
                lambda c: stub.ListModels(pb.ListModelsRequest(), compression=c),
            ):
                code, details = status_of(lambda: call(algorithm))  # noqa: B023
                assert code == CODE.UNIMPLEMENTED, (code, details)
                assert "is disabled" in details and algorithm.name.lower() in details
    assert s.stub.Run(wire.run_request("mlp", [torch.zeros(2, 64)])).outputs


@pytest.fixture
def roots(tmp_path):
    """A root (model or blob) with a package, a blob, and links and paths that leave it."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(model_zoo.compiled("mlp"), outside / "real.pt2")  # a valid package, outside
    (outside / "w.blob").write_bytes(b"\0" * 4096)
    (root / "link_to_pkg.pt2").symlink_to(outside / "real.pt2")
    (root / "link_to_dir").symlink_to(outside)
    (root / "sub").mkdir()
    (root / "sub" / "up.pt2").symlink_to("../../outside/real.pt2")  # relative link out
    (root / "link_to_blob").symlink_to(outside / "w.blob")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    escapes = [
        str(outside / "real.pt2"),
        str(root / ".." / "outside" / "real.pt2"),
        str(root / "sub" / ".." / ".." / "outside" / "real.pt2"),
        str(root / "link_to_pkg.pt2"),
        str(root / "link_to_dir" / "real.pt2"),
        str(root / "sub" / "up.pt2"),
        "/etc/passwd",
        "/proc/self/environ",
        str(root) + "_sibling/x.pt2",
        "../../../../etc/passwd",
        str(root / "link_to_blob"),
        str(root / "link_to_dir" / "w.blob"),
    ]
    return root, outside, escapes


def test_load_model_paths_stay_below_model_roots(server_factory, roots):
    root, outside, escapes = roots
    s = server_factory(
        [], model_roots=(str(root),), allowed_roots=(str(outside),), model_repository=None
    )
    for p in escapes:
        code, details = status_of(lambda: s.stub.LoadModel(pb.LoadModelRequest(name="x", path=p)))
        assert code == CODE.PERMISSION_DENIED, (p, code, details)
    code, _ = status_of(
        lambda: s.stub.LoadModel(pb.LoadModelRequest(name="x", path=str(root / "loop_a")))
    )
    assert code in (CODE.INVALID_ARGUMENT, CODE.PERMISSION_DENIED)
    assert not s.stub.ListModels(pb.ListModelsRequest()).models
    # The same package copied below the root loads.
    shutil.copy(outside / "real.pt2", root / "ok.pt2")
    info = s.stub.LoadModel(
        pb.LoadModelRequest(name="ok", path=str(root / "sub" / ".." / "ok.pt2"))
    )
    assert info.model.state == pb.MODEL_STATE_READY


def test_blob_paths_stay_below_allowed_roots(server_factory, roots):
    root, outside, escapes = roots
    s = server_factory(["mlp"], allowed_roots=(str(root),), model_roots=(str(outside),))
    for p in escapes:
        code, details = status_of(
            lambda: s.stub.UpdateConstantBufferFromBlob(
                pb.UpdateConstantBufferFromBlobRequest(model="mlp", weights_path=p)
            )
        )
        assert code == CODE.PERMISSION_DENIED, (p, code, details)
    info = s.stub.ListModels(pb.ListModelsRequest()).models[0]
    assert info.active_version.id == "initial"


def test_no_roots_refuse_every_path(server_factory):
    s = server_factory(["mlp"], allowed_roots=(), model_roots=())
    (s.repo / "w.blob").write_bytes(b"\0" * 64)
    code, _ = status_of(
        lambda: s.stub.UpdateConstantBufferFromBlob(
            pb.UpdateConstantBufferFromBlobRequest(model="mlp", weights_path=str(s.repo / "w.blob"))
        )
    )
    assert code == CODE.PERMISSION_DENIED
    # The repository is a model root of its own, but its links lead out of it.
    code, details = status_of(
        lambda: s.stub.LoadModel(pb.LoadModelRequest(name="x", path=str(s.repo / "mlp.pt2")))
    )
    assert code == CODE.PERMISSION_DENIED and "model root" in details


def test_oip_repository_load_names_cannot_leave_the_repository(server_factory, roots):
    root, outside, _ = roots
    s = server_factory(["mlp"])
    oip = OipStub(s.channel)
    (s.repo / "sub").mkdir()
    shutil.copy(outside / "real.pt2", s.repo / "sub" / "nested.pt2")
    for name in (
        "../outside/real",
        "..",
        ".",
        "sub/nested",
        "sub/../mlp",
        "/etc/passwd",
        str(outside / "real"),
        "..\\mlp",
        "",
        "mlp\0",
    ):
        code, details = status_of(
            lambda: oip.RepositoryModelLoad(ipb.RepositoryModelLoadRequest(model_name=name))
        )
        assert code in (CODE.INVALID_ARGUMENT, CODE.NOT_FOUND), (name, code, details)
    code, _ = status_of(
        lambda: oip.RepositoryModelLoad(
            ipb.RepositoryModelLoadRequest(
                model_name="mlp",
                parameters={"file:1/model.pt2": ipb.ModelRepositoryParameter(bytes_param=b"\0")},
            )
        )
    )
    assert code == CODE.UNIMPLEMENTED  # no packages from the client, ever
    names = sorted(m.name for m in s.stub.ListModels(pb.ListModelsRequest()).models)
    assert names == ["mlp"]


# ---------------------------------------------------------------- resource bounds


def test_configured_bounds_answer_with_their_codes(server_factory):
    s = server_factory(
        ["mlp"],
        max_tensor_rank=3,
        max_tensor_elements=4096,
        max_upload_bytes=1000,
        max_message_bytes=1 << 20,
        max_runners_per_model=4,
    )
    oip = OipStub(s.channel)
    t = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 1, 1, 64], data=b"\0" * 256)
    code, details = status_of(lambda: s.stub.Run(pb.RunRequest(model="mlp", inputs=[t])))
    assert code == CODE.INVALID_ARGUMENT and "rank 4 exceeds the limit of 3" in details
    x = torch.zeros(100, 64)
    code, details = status_of(lambda: s.stub.Run(wire.run_request("mlp", [x])))
    assert code == CODE.RESOURCE_EXHAUSTED and "4096 elements" in details
    req = ipb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.numpy().tobytes()])
    req.inputs.add(name="x", datatype="FP32", shape=[100, 64])
    assert status_of(lambda: oip.ModelInfer(req))[0] == CODE.RESOURCE_EXHAUSTED
    # mlp's weights are ~10 KiB: over the 1000-byte upload limit, refused from the header.
    code, details = status_of(
        lambda: s.stub.UpdateConstantBuffer(
            wire.upload_requests("mlp", new_weights("mlp"), validate_full=True)
        )
    )
    assert code == CODE.RESOURCE_EXHAUSTED and "exceeds the limit" in details
    big = pb.RunRequest(
        model="mlp",
        inputs=[pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2 << 20], data=b"\0" * (2 << 20))],
    )
    with grpc.insecure_channel(s.target, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        code, _ = status_of(lambda: pb_grpc.ModelRunnerStub(ch).Run(big))
    assert code == CODE.RESOURCE_EXHAUSTED
    code, details = status_of(
        lambda: s.stub.LoadModel(
            pb.LoadModelRequest(
                name="many", path=str(s.repo / "mlp.pt2"), runners_per_device=1 << 30
            )
        )
    )
    assert code == CODE.INVALID_ARGUMENT and "limit of 4" in details
    # Small requests still work.
    assert s.stub.Run(wire.run_request("mlp", [torch.zeros(2, 64)])).outputs


def test_weight_streams_get_a_share_of_the_workers_never_all(server_factory):
    """A stalled upload or download holds a worker thread: at most max_weight_streams of
    them at once, the next ones RESOURCE_EXHAUSTED naming the limit, Runs unaffected."""
    s = server_factory(["mlp"], max_weight_streams=1)
    weights = new_weights("mlp")
    reached, release = threading.Event(), threading.Event()
    stalled = s.stub.UpdateConstantBuffer.future(
        wire.pause_at_half(
            wire.upload_requests("mlp", weights, validate_full=True, chunk_bytes=512),
            reached,
            release,
        )
    )
    try:
        wait_for(lambda: s.app.plane.weight_streams_open == 1, "the upload to hold its place")
        for what, call in (
            (
                "UpdateConstantBuffer",
                lambda: s.stub.UpdateConstantBuffer(
                    wire.upload_requests("mlp", weights, validate_full=True)
                ),
            ),
            (
                "ExtractConstantsMap",
                lambda: list(
                    s.stub.ExtractConstantsMap(pb.ExtractConstantsMapRequest(model="mlp"))
                ),
            ),
        ):
            code, details = status_of(call)
            assert code == CODE.RESOURCE_EXHAUSTED, (what, code, details)
            assert what in details and "max_weight_streams" in details, details
        inputs = model_zoo.MODELS["mlp"].inputs(2)
        out = wire.outputs(s.stub.Run(wire.run_request("mlp", inputs)))
        assert wire.close(out, model_zoo.eager("mlp", inputs))
    finally:
        release.set()
    assert stalled.result(30).bytes_received == sum(t.nbytes for t in weights.values())
    assert s.app.plane.weight_streams_open == 0  # the place is given back before the reply
    chunks = list(s.stub.ExtractConstantsMap(pb.ExtractConstantsMapRequest(model="mlp")))
    assert chunks and s.app.plane.weight_streams_open == 0


def test_weight_streams_must_leave_worker_threads_for_runs():
    from aotiserve.server.config import ServeConfig

    for bad in (0, 32, 40):
        with pytest.raises(ValueError, match="max_weight_streams"):
            ServeConfig(max_weight_streams=bad, grpc_workers=32)
    assert ServeConfig(max_weight_streams=31, grpc_workers=32).max_weight_streams == 31


def test_max_concurrent_rpcs(server_factory):
    s = server_factory(["mlp"], max_concurrent_rpcs=2, runners_per_model=1)
    port = s.app.port_server
    req = wire.run_request("mlp", [torch.zeros(1, 64)])
    with port.holding_a_runner("mlp"):  # the only runner is busy: calls wait in the queue
        waiting = [s.stub.Run.future(req, timeout=30) for _ in range(2)]
        for _ in range(200):
            if port.pool_state("cpu")[1] == 2:
                break
            threading.Event().wait(0.01)
        code, details = status_of(lambda: s.stub.Run(req, timeout=10))
        assert code == CODE.RESOURCE_EXHAUSTED, details
    assert all(f.result().outputs for f in waiting)


# ---------------------------------------------------------------- no unpickling

_UNSAFE = re.compile(
    r"\bpickle\b|torch\.load\b|allow_pickle\s*=\s*True|\bmarshal\b|"
    r"yaml\.load\(|\beval\(|\bexec\(|jsonpickle|dill\b"
)


def test_server_never_unpickles():
    """Weights persist as safetensors, uploads are raw bytes, configs JSON/TOML: nothing in
    the daemon's own code can deserialize code. (Loading a .pt2 runs its compiled .so: that
    is why LoadModel needs the admin token and a path below an allowed root.)"""
    hits = []
    for folder in ("server", "runner_ext"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if _UNSAFE.search(code) and ".eval()" not in code:
                    hits.append(f"{path.relative_to(REPO_ROOT)}:{i}: {line.strip()}")
    assert not hits, hits


def test_bound_and_access_flags_reach_the_config():
    import argparse

    from aotiserve.server.config import ServeConfig, add_serve_arguments

    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--max-upload-bytes",
            "100",
            "--max-tensor-elements",
            "7",
            "--max-tensor-rank",
            "3",
            "--max-runners-per-model",
            "5",
            "--max-concurrent-rpcs",
            "9",
            "--max-concurrent-streams",
            "11",
            "--admin-port",
            "0",
            "--admin-loopback-only",
            "--inference-token-file",
            "/t",
            "--admin-host",
            "::1",
        ]
    )
    c = ServeConfig.from_sources(args, {})
    assert (
        c.max_upload_bytes,
        c.max_tensor_elements,
        c.max_tensor_rank,
        c.max_runners_per_model,
        c.max_concurrent_rpcs,
        c.max_concurrent_streams,
    ) == (100, 7, 3, 5, 9, 11)
    assert c.admin_port == 0 and c.admin_loopback_only and c.inference_token_file == "/t"
    assert c.admin_host == "::1"
    env = ServeConfig.from_sources(
        {},
        {
            "AOTISERVE_ADMIN_PORT": "-1",
            "AOTISERVE_ADMIN_LOOPBACK_ONLY": "true",
            "AOTISERVE_MAX_CONCURRENT_RPCS": "3",
        },
    )
    assert env.admin_port is None and env.admin_loopback_only and env.max_concurrent_rpcs == 3
    defaults = ServeConfig()
    assert defaults.admin_port is None and not defaults.admin_loopback_only
    assert defaults.max_concurrent_rpcs and defaults.max_concurrent_streams


def test_model_names_cannot_leave_or_share_the_weights_folder(server_factory, tmp_path):
    """A model named ".." wrote its committed weights beside the weights folder, and
    "mlp v2" and "mlp_v2" shared one folder (a restart served one's weights as the other's)."""
    weights = tmp_path / "w" / "weights"
    s = server_factory(["mlp"], weights_dir=str(weights))
    names = ("..", "mlp v2", "mlp_v2", ".hidden")
    for i, name in enumerate(names):
        s.stub.LoadModel(pb.LoadModelRequest(name=name, path=str(s.repo / "mlp.pt2")))
        s.stub.UpdateConstantBuffer(
            wire.upload_requests(name, new_weights("mlp", 1.0 + i), validate_full=True)
        )
        s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model=name))
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["weights"]
    folders = [p for p in weights.iterdir() if p.is_dir()]
    assert len(folders) == len(names)
    assert all(not p.name.startswith(".") for p in folders)
    from aotiserve.server.weights_store import WeightsStore

    store = WeightsStore(weights)
    active = {m.name: m.active_version.id for m in s.stub.ListModels(pb.ListModelsRequest()).models}
    for name in names:
        assert store.committed(name)[0].id == active[name], name


def test_undecodable_requests_are_invalid_argument_and_leak_nothing(server_factory):
    """grpcio keeps the call state of every request its deserializer refuses (~19 KB each,
    never freed; with a stream limit, the connection stops taking calls): requests are
    parsed by the interceptor instead. A 4-stream connection survives 200 garbage calls."""
    s = server_factory(["mlp"], max_concurrent_streams=4)
    oip = OipStub(s.channel)
    garbage = b"\xff\xff\xff" + b"x" * 64
    calls = [
        s.channel.unary_unary("/aotiserve.v1.ModelRunner/Run"),
        s.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer"),
        s.channel.unary_unary("/grpc.health.v1.Health/Check"),
        s.channel.unary_unary("/aotiserve.v1.ModelRunner/LoadModel"),
    ]
    for i in range(200):
        code, details = status_of(lambda: calls[i % len(calls)](garbage, timeout=10))
        assert code == CODE.INVALID_ARGUMENT and "not a valid message" in details, (
            i,
            code,
            details,
        )
    stream = s.channel.stream_unary("/aotiserve.v1.ModelRunner/UpdateConstantBuffer")
    code, _ = status_of(lambda: stream(iter([garbage]), timeout=10))
    assert code == CODE.INVALID_ARGUMENT
    assert s.stub.Run(wire.run_request("mlp", [torch.zeros(1, 64)]), timeout=10).outputs
    assert oip.ServerLive(ipb.ServerLiveRequest(), timeout=10).live


# ---------------------------------------------------------------- any token guards admin


def _refusal_lines(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "aotiserve.server.interceptors" and "refused a mutating call" in r.getMessage()
    ]


def test_an_inference_token_alone_refuses_every_mutating_rpc(tmp_path, caplog):
    """With only --inference-token-file, no token (or the inference token) changes
    anything: the daemon has no admin token, so mutating RPCs are refused (UnloadModel
    with no token used to succeed). The log says why, once, not once per call."""
    (tmp_path / "infer").write_text(INFER_TOKEN)
    caplog.set_level(logging.INFO)
    with running_server(["mlp", "two_io"], inference_token_file=str(tmp_path / "infer")) as s:
        (s.repo / "junk.blob").write_bytes(b"\0" * 100)
        oip = OipStub(s.channel)
        for method, call, _ in MUTATING_CALLS:
            for md in ((), _bearer(INFER_TOKEN), _bearer("guess")):
                code, details = status_of(lambda: call(s.stub, oip, md, s.repo))
                assert code == CODE.PERMISSION_DENIED, (method, md, code, details)
                assert "no admin token configured" in details, details
        state = sorted(
            (m.name, m.active_version.id)
            for m in s.stub.ListModels(pb.ListModelsRequest(), metadata=_bearer(INFER_TOKEN)).models
        )
        assert state == [("mlp", "initial"), ("two_io", "initial")]
    lines = _refusal_lines(caplog)
    assert len(lines) == 1 and "no admin token configured" in lines[0], lines
    assert INFER_TOKEN not in caplog.text


def test_without_any_token_mutating_rpcs_come_from_loopback_only(caplog):
    """The safe default: no token configured, a peer that is not loopback cannot change
    what is served (before, anyone who reached the port could); --insecure-admin lifts it."""
    ip = external_ip()
    if ip is None:
        pytest.skip("no non-loopback address on this machine")
    swap = pb.SwapConstantBufferRequest(model="mlp")
    caplog.set_level(logging.INFO)
    with running_server(["mlp"], host="0.0.0.0") as s:
        assert status_of(lambda: s.stub.SwapConstantBuffer(swap))[0] == CODE.FAILED_PRECONDITION
        port = s.target.rsplit(":", 1)[1]
        with grpc.insecure_channel(f"{ip}:{port}") as ch:
            stub, oip = pb_grpc.ModelRunnerStub(ch), OipStub(ch)
            for method, call, _ in MUTATING_CALLS:
                code, details = status_of(lambda: call(stub, oip, (), s.repo))
                assert code == CODE.PERMISSION_DENIED, (method, code, details)
                assert "no admin token configured" in details and "loopback" in details
            # Everything else is open as before.
            assert stub.Run(wire.run_request("mlp", [torch.zeros(1, 64)]), timeout=10).outputs
            assert [m.name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["mlp"]
        lines = _refusal_lines(caplog)
        assert len(lines) == 1 and ip in lines[0] and "loopback" in lines[0], lines
    with running_server(["mlp"], host="0.0.0.0", insecure_admin=True) as s:
        port = s.target.rsplit(":", 1)[1]
        with grpc.insecure_channel(f"{ip}:{port}") as ch:
            code, _ = status_of(lambda: pb_grpc.ModelRunnerStub(ch).SwapConstantBuffer(swap))
            assert code == CODE.FAILED_PRECONDITION  # it ran: nothing staged


def test_refusals_are_logged_once_a_minute_per_reason():
    log = interceptors._RefusalLog()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("aotiserve.server.interceptors")
    logger.addHandler(handler)
    try:
        for _ in range(1000):
            log.note("wrong token", "ipv4:10.0.0.1:5", "Swap: wrong admin token")
        log.note("token missing", "ipv4:10.0.0.1:5", "Swap needs the admin token")
        log._limit.expire()  # a minute later
        log.note("wrong token", "ipv4:10.0.0.2:5", "Swap: wrong admin token")
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 3, messages
    assert "999 more since the last" in messages[2] and "10.0.0.2" in messages[2]


# ---------------------------------------------------------------- model roots, packages


def test_model_roots_never_overlap_a_folder_the_daemon_writes(tmp_path, capsys):
    from aotiserve.server.cli import main as serve_main
    from aotiserve.server.config import ServeConfig

    weights, models, demo = tmp_path / "weights", tmp_path / "models", tmp_path / "demo"
    for d in (weights, models, demo):
        d.mkdir()
    (tmp_path / "link").symlink_to(weights)
    bad = [
        ({"model_roots": (str(weights),), "weights_dir": str(weights)}, weights, weights),
        ({"model_roots": (str(tmp_path),), "weights_dir": str(weights)}, tmp_path, weights),
        (
            {"model_roots": (str(weights / "pk"),), "weights_dir": str(weights)},
            weights / "pk",
            weights,
        ),
        (
            {"model_repository": str(tmp_path / "link"), "weights_dir": str(weights)},
            tmp_path / "link",
            weights,
        ),
        (
            {"model_roots": (str(models),), "demo": True, "demo_cache_dir": str(models / "d")},
            models,
            models / "d",
        ),
        ({"model_roots": ("/",), "model_repository": str(models)}, "/", "/tmp"),
    ]
    for kw, root, folder in bad:
        with pytest.raises(ValueError) as e:
            ServeConfig(**kw)
        message = str(e.value)
        assert "\n" not in message and f"'{root}'" in message, message
        assert str(folder) in message, message
    ok = ServeConfig(
        model_roots=(str(models),),
        model_repository=str(models / "repo"),
        weights_dir=str(weights),
        demo_cache_dir=str(demo),
        demo=True,
    )
    assert ok.package_roots == (str(models), str(models / "repo"))
    # From the command line: exit status 2, one line naming both folders.
    assert (
        serve_main(
            ["--model-root", str(weights), "--weights-dir", str(weights / "w"), "--port", "0"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(weights) in err and "weights_dir" in err, err


def test_uploaded_weights_never_load_as_a_package(server_factory, tmp_path):
    """The weights folder may be a blob root, never a model root: a file there (bytes a
    client wrote, or a package placed beside them) is refused by LoadModel."""
    weights = tmp_path / "weights"
    s = server_factory(["mlp"], weights_dir=str(weights), allowed_roots=(str(weights),))
    s.stub.UpdateConstantBuffer(wire.upload_requests("mlp", new_weights("mlp"), validate_full=True))
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    shutil.copy(model_zoo.compiled("mlp"), weights / "evil.pt2")
    stored = [p for p in weights.rglob("*") if p.is_file()]
    assert len(stored) >= 2
    for path in stored:
        code, details = status_of(
            lambda: s.stub.LoadModel(pb.LoadModelRequest(name="evil", path=str(path)))
        )
        assert code == CODE.PERMISSION_DENIED and "model root" in details, (path, details)
    assert [m.name for m in s.stub.ListModels(pb.ListModelsRequest()).models] == ["mlp"]


def test_a_package_is_a_zip_from_its_first_byte(server_factory, tmp_path):
    """zipfile finds an archive behind any prefix (a package appended to uploaded weights
    would open): LoadModel, and the repository's load at start, refuse it, naming the
    path and why."""
    root = tmp_path / "models"
    root.mkdir()
    package = model_zoo.compiled("mlp").read_bytes()
    header = b'{"fc1.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    files = {
        "prefixed.pt2": (b"\0" * 512 + package, "zip header"),
        "zip_then_zip.pt2": (b"PK\x03\x04" + b"\0" * 60 + package, "bytes lie in front"),
        "safetensors_then_zip.pt2": (
            len(header).to_bytes(8, "little") + header + b"\0" * 4 + package,
            "zip header",
        ),
        "empty.pt2": (b"", "zip header"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    (root / "ok.pt2").write_bytes(package)
    s = server_factory([], model_roots=(str(root),), model_repository=None)
    for name, (_, why) in files.items():
        path = str(root / name)
        code, details = status_of(
            lambda: s.stub.LoadModel(pb.LoadModelRequest(name=name.removesuffix(".pt2"), path=path))
        )
        assert code == CODE.INVALID_ARGUMENT and path in details and why in details, details
    info = s.stub.LoadModel(pb.LoadModelRequest(name="ok", path=str(root / "ok.pt2")))
    assert info.model.state == pb.MODEL_STATE_READY
    # A repository holding one: that model fails to load, saying why; health stays NOT_SERVING.
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "bad.pt2").write_bytes(b"PK\x03\x04" + b"\0" * 508 + package)
    with running_server([], model_repository=str(repo)) as bad:
        (info,) = bad.stub.ListModels(pb.ListModelsRequest()).models
        assert info.state == pb.MODEL_STATE_FAILED and "bytes lie in front" in info.error
        status = health_pb2_grpc.HealthStub(bad.channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_security_flags_reach_the_config():
    import argparse

    from aotiserve.server.config import ServeConfig, add_serve_arguments

    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--model-root",
            "/m1",
            "--model-root",
            "/m2",
            "--allowed-root",
            "/b",
            "--max-inputs",
            "5",
            "--insecure-admin",
            "--max-upload-constants",
            "9",
        ]
    )
    c = ServeConfig.from_sources(args, {})
    assert c.model_roots == ("/m1", "/m2") and c.allowed_roots == ("/b",)
    assert c.max_inputs == 5 and c.insecure_admin and c.max_upload_constants == 9
    env = ServeConfig.from_sources(
        {},
        {
            "AOTISERVE_MODEL_ROOTS": "/m1,/m2",
            "AOTISERVE_MAX_INPUTS": "7",
            "AOTISERVE_INSECURE_ADMIN": "1",
        },
    )
    assert env.model_roots == ("/m1", "/m2") and env.max_inputs == 7 and env.insecure_admin
    defaults = ServeConfig()
    assert not defaults.insecure_admin and defaults.max_inputs == 64 and not defaults.model_roots
    for name in ("max_inputs", "max_tensor_rank", "max_tensor_elements"):
        with pytest.raises(ValueError, match=name):
            ServeConfig(**{name: 0})
