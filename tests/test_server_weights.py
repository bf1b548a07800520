"""Constant-buffer semantics over the wire: staging, swap, rollback, free, versions, bad uploads."""

from __future__ import annotations

import os
import threading

import grpc
import model_zoo
import pytest
import torch
import wire
from helpers import code_of, eager_with, info, new_weights, run, upload, wait_for

from aotiserve.v1 import model_runner_pb2 as pb


def reference_digest(weights: dict) -> str:
    """A version's digest computed here from the definition in docs/server.md (XXH3-128
    tree: 4 MiB blocks, then each constant, then the version), not with the server's code."""
    import xxhash

    h = xxhash.xxh3_128()
    for fqn in sorted(weights):
        t = weights[fqn]
        data = t.contiguous().numpy().tobytes()
        blocks = b"".join(
            xxhash.xxh3_128(data[b : b + (4 << 20)]).digest() for b in range(0, len(data), 4 << 20)
        )
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(f"{fqn}\0{dtype}\0{list(t.shape)}\0".encode())
        h.update(xxhash.xxh3_128(blocks).digest())
    return "xxh3:" + h.hexdigest()


@pytest.mark.parametrize("model", ["mlp", "two_io"])
def test_stage_swap_rollback_free_lifecycle(server_factory, model):
    s = server_factory([model], metrics_port=0)
    inputs = model_zoo.MODELS[model].inputs(3)
    old = model_zoo.eager(model, inputs)
    weights = new_weights(model)
    new = eager_with(model, weights, inputs)

    resp = upload(s.stub, model, weights, validate_full=True, chunk_bytes=300, description="halved")
    version = resp.version
    assert resp.bytes_received == sum(t.numel() * t.element_size() for t in weights.values())
    assert sorted(resp.updated) == sorted(weights)
    assert version.digest == reference_digest(weights)
    assert not version.sha256  # deprecated: the digest names its algorithm
    assert version.description == "halved" and version.author
    # Staged, not serving: the active buffer still answers with the old weights.
    out, served = run(s.stub, model, inputs)
    assert wire.close(out, old) and served == "initial"
    m = info(s.stub, model)
    assert m.staged_version.id == version.id and m.active_version.id == "initial"
    staged = wire.extract(s.stub, model, use_inactive=True)
    for k, t in weights.items():
        assert torch.equal(staged[k], t), k

    swapped = s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model=model)).active_version
    assert swapped.id == version.id
    out, served = run(s.stub, model, inputs)
    assert wire.close(out, new) and served == version.id
    active = wire.extract(s.stub, model)
    for k, t in weights.items():
        assert torch.equal(active[k], t), k
    m = info(s.stub, model)
    assert m.active_version.id == version.id and m.previous_version.id == "initial"
    assert not m.HasField("staged_version")

    # Swap again with nothing staged is refused (the runner would break), rollback works.
    code, details = code_of(
        lambda: s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model=model))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "Rollback" in details
    back = s.stub.RollbackConstantBuffer(
        pb.RollbackConstantBufferRequest(model=model)
    ).active_version
    assert back.id == "initial"
    out, served = run(s.stub, model, inputs)
    assert wire.close(out, old) and served == "initial"
    # Roll forward again, then free: rollback is refused clearly, serving is unchanged.
    s.stub.RollbackConstantBuffer(pb.RollbackConstantBufferRequest(model=model))
    s.stub.FreeInactiveConstantBuffer(pb.FreeInactiveConstantBufferRequest(model=model))
    code, details = code_of(
        lambda: s.stub.RollbackConstantBuffer(pb.RollbackConstantBufferRequest(model=model))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no previous weights" in details
    code, _ = code_of(lambda: wire.extract(s.stub, model, use_inactive=True))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    out, served = run(s.stub, model, inputs)
    assert wire.close(out, new) and served == version.id

    # Stage again after a free (of the container's primary buffer) and swap: still correct.
    third = new_weights(model, 2.0, -0.05)
    v3 = upload(s.stub, model, third, validate_full=True).version
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model=model))
    out, served = run(s.stub, model, inputs)
    assert wire.close(out, eager_with(model, third, inputs)) and served == v3.id
    s.stub.FreeInactiveConstantBuffer(pb.FreeInactiveConstantBufferRequest(model=model))
    v4 = upload(s.stub, model, weights, validate_full=True).version
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model=model))
    out, served = run(s.stub, model, inputs)
    assert wire.close(out, new) and served == v4.id
    assert v4.digest == version.digest  # same content, same hash

    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{s.app.metrics_port}/metrics").read().decode()
    labels = f'digest="{v4.digest[:21]}",model="{model}",version="{v4.id}"'  # xxh3:<16 hex>
    assert f"aotiserve_weights_version_info{{{labels}}} 1.0" in text
    assert f'aotiserve_constant_buffer_ops_total{{model="{model}",op="swap",outcome="ok"}}' in text


def test_partial_update_keeps_other_weights(server_factory):
    s = server_factory(["mlp"])
    inputs = model_zoo.MODELS["mlp"].inputs(2)
    bias = {"fc2.bias": torch.full((10,), 3.0)}
    upload(s.stub, "mlp", bias)  # by original FQN, not full
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    out, _ = run(s.stub, "mlp", inputs)
    assert wire.close(out, eager_with("mlp", bias, inputs))
    # Constant names work too, and a direct (active) update applies at once.
    upload(s.stub, "mlp", {"fc2_bias": torch.zeros(10)}, use_inactive=False)
    out, _ = run(s.stub, "mlp", inputs)
    assert wire.close(out, eager_with("mlp", {"fc2.bias": torch.zeros(10)}, inputs))


def test_chunks_any_order_and_tensors_larger_than_message_limit(server_factory):
    s = server_factory(["mlp"], max_message_bytes=4096)
    weights = new_weights("mlp", -1.0, 0.0)  # fc1.weight is 8 KiB > 4 KiB message limit
    resp = upload(
        s.stub,
        "mlp",
        weights,
        validate_full=True,
        chunk_bytes=1000,
        order=lambda chunks: chunks[::-1],
    )
    in_order = upload(s.stub, "mlp", weights, validate_full=True, chunk_bytes=777)
    assert resp.version.digest == in_order.version.digest
    got = wire.extract(s.stub, "mlp", use_inactive=True, chunk_bytes=0)  # server default, capped
    assert torch.equal(got["fc1.weight"], weights["fc1.weight"])


def _header(model="mlp", specs=None, **kw):
    return pb.UpdateConstantBufferRequest(
        header=pb.UpdateConstantBufferHeader(
            model=model, use_inactive=True, constants=specs or [], **kw
        )
    )


def _chunk(name, offset, data):
    return pb.UpdateConstantBufferRequest(
        chunk=pb.ConstantChunk(name=name, offset=offset, data=data)
    )


F32 = pb.DATA_TYPE_FLOAT32
BIAS = pb.TensorSpec(name="fc2.bias", dtype=F32, shape=[10])
B40 = b"\1" * 40

BAD_UPLOADS = {
    "no header": ([_chunk("fc2.bias", 0, B40)], "header"),
    "empty header": ([_header()], "no constants"),
    "unknown constant": (
        [_header(specs=[pb.TensorSpec(name="fc3.weight", dtype=F32, shape=[1])])],
        "'fc3.weight' is not an updatable constant",
    ),
    "folded constant": (
        [_header(specs=[pb.TensorSpec(name="_FOLDED_CONST_permute", dtype=F32, shape=[64, 32])])],
        "folding",
    ),
    "wrong dtype": (
        [_header(specs=[pb.TensorSpec(name="fc2.bias", dtype=pb.DATA_TYPE_FLOAT16, shape=[10])])],
        "constant 'fc2.bias': dtype must be float32",
    ),
    "wrong shape": (
        [_header(specs=[pb.TensorSpec(name="fc2.bias", dtype=F32, shape=[11])])],
        "constant 'fc2.bias': shape must be [10]",
    ),
    "incomplete full update": (
        [_header(specs=[BIAS], validate_full_updates=True), _chunk("fc2.bias", 0, B40)],
        "misses constants",
    ),
    "truncated": (
        [_header(specs=[BIAS]), _chunk("fc2.bias", 0, B40[:39])],
        "received 39 of 40 bytes",
    ),
    "beyond end": ([_header(specs=[BIAS]), _chunk("fc2.bias", 8, B40)], "beyond"),
    "duplicate chunk": (
        [_header(specs=[BIAS]), _chunk("fc2.bias", 0, B40), _chunk("fc2.bias", 0, B40)],
        "overlaps",
    ),
    "overlapping chunk": (
        [_header(specs=[BIAS]), _chunk("fc2.bias", 0, B40[:24]), _chunk("fc2.bias", 20, B40[:20])],
        "overlaps",
    ),
    "undeclared chunk": ([_header(specs=[BIAS]), _chunk("fc1.bias", 0, B40)], "did not declare"),
    "second header": ([_header(specs=[BIAS]), _header(specs=[BIAS])], "only chunks"),
    "declared twice": (
        [_header(specs=[BIAS, pb.TensorSpec(name="fc2_bias", dtype=F32, shape=[10])])],
        "declared twice",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_refused_and_change_nothing(server_factory, case):
    s = server_factory(["mlp"])
    inputs = model_zoo.MODELS["mlp"].inputs(2)
    before = wire.extract(s.stub, "mlp")
    messages, expect = BAD_UPLOADS[case]
    code, details = code_of(lambda: s.stub.UpdateConstantBuffer(iter(messages)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert expect in details
    m = info(s.stub, "mlp")
    assert m.active_version.id == "initial" and not m.HasField("staged_version")
    after = wire.extract(s.stub, "mlp")
    assert all(torch.equal(before[k], after[k]) for k in before)
    out, _ = run(s.stub, "mlp", inputs)
    assert wire.close(out, model_zoo.eager("mlp", inputs))
    assert s.app.metrics.staging_bytes.labels("mlp")._value.get() == 0


@pytest.mark.parametrize("devices", [("cpu",), ("cpu:0", "cpu:1")], ids=["1replica", "2replicas"])
def test_swap_under_load_every_response_old_or_new(server_factory, devices):
    s = server_factory(["mlp"], devices=devices, metrics_port=0)
    inputs = model_zoo.MODELS["mlp"].inputs(8)
    old = model_zoo.eager("mlp", inputs)
    weights = new_weights("mlp")
    new = eager_with("mlp", weights, inputs)
    request = wire.run_request("mlp", inputs)
    swapped = threading.Event()
    stop = threading.Event()
    seen: list[list] = [[] for _ in range(4)]
    started = threading.Barrier(5)

    def client(i):
        n = 0
        while not stop.is_set():
            after_swap = swapped.is_set()  # read before sending: the call started after the swap
            resp = s.stub.Run(request)
            out = wire.outputs(resp)
            if wire.close(out, old):
                kind = "old"
            elif wire.close(out, new):
                kind = "new"
            else:
                kind = "other"
            seen[i].append((kind, resp.weights_version, after_swap))
            n += 1
            if n == 5:
                started.wait()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()
    version = upload(s.stub, "mlp", weights, validate_full=True).version
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    swapped.set()
    for _ in range(20):  # some traffic after the swap
        s.stub.Run(request)
    stop.set()
    for t in threads:
        t.join(30)
    flat = [x for xs in seen for x in xs]
    assert flat and all(kind != "other" for kind, _, _ in flat)
    # The reported version matches the weights that computed the answer.
    assert all((kind == "new") == (v == version.id) for kind, v, _ in flat)
    # A call that started after the swap returned only sees new weights.
    assert all(kind == "new" for kind, _, after in flat if after)
    assert any(kind == "old" for kind, _, _ in flat)
    if len(devices) > 1:  # least-loaded routing used every replica
        for dev in devices:
            assert (
                s.app.metrics.sample("aotiserve_device_requests_total", model="mlp", device=dev) > 0
            ), dev


def test_free_discards_a_stage_that_never_served(server_factory):
    s = server_factory(["mlp"])
    inputs = model_zoo.MODELS["mlp"].inputs(2)
    upload(s.stub, "mlp", new_weights("mlp", 9.0), validate_full=True)
    s.stub.FreeInactiveConstantBuffer(pb.FreeInactiveConstantBufferRequest(model="mlp"))
    assert not info(s.stub, "mlp").HasField("staged_version")
    code, _ = code_of(lambda: s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    weights = new_weights("mlp")
    upload(s.stub, "mlp", weights, validate_full=True)
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    out, _ = run(s.stub, "mlp", inputs)
    assert wire.close(out, eager_with("mlp", weights, inputs))


def test_cancel_mid_upload_frees_staging_and_changes_nothing(server_factory):
    s = server_factory(["mlp"], metrics_port=0)
    inputs = model_zoo.MODELS["mlp"].inputs(2)
    weights = new_weights("mlp")
    half_sent = threading.Event()
    release = threading.Event()

    future = s.stub.UpdateConstantBuffer.future(
        wire.pause_at_half(
            wire.upload_requests("mlp", weights, validate_full=True, chunk_bytes=512),
            half_sent,
            release,
            end=True,
        )
    )
    half_sent.wait(30)
    gauge = s.app.metrics.staging_bytes.labels("mlp")
    future.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    # The server notices the cancel when the stream breaks; wait on the staging gauge via
    # a call that must serialize behind nothing: the server handles the next request.
    for _ in range(200):
        if gauge._value.get() == 0:
            break
        s.stub.ListModels(pb.ListModelsRequest())
    assert gauge._value.get() == 0
    m = info(s.stub, "mlp")
    assert m.active_version.id == "initial" and not m.HasField("staged_version")
    out, served = run(s.stub, "mlp", inputs)
    assert wire.close(out, model_zoo.eager("mlp", inputs)) and served == "initial"


def test_blob_path_outside_allowed_roots_is_permission_denied(server_factory, tmp_path):
    s = server_factory(["mlp"])
    blob = tmp_path / "w.blob"
    blob.write_bytes(b"\0" * 16)
    for p in (str(blob), str(s.repo / ".." / "w.blob"), "/etc/passwd"):
        code, _ = code_of(
            lambda: s.stub.UpdateConstantBufferFromBlob(
                pb.UpdateConstantBufferFromBlobRequest(model="mlp", weights_path=p)
            )
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED, p
    assert info(s.stub, "mlp").active_version.id == "initial"


def test_update_from_blob_inside_allowed_root(server_factory):
    import zipfile

    if not _blob_loadable():
        pytest.skip("runner_ext cannot load blob packages here")
    s = server_factory(["blob_mlp"])
    with zipfile.ZipFile(s.repo / "blob_mlp.pt2") as zf:
        member = next(n for n in zf.namelist() if n.endswith("_weights.blob"))
        data = bytearray(zf.read(member))
    # A blob of new weights: the packaged blob with each constant's bytes replaced in place.
    weights = new_weights("blob_mlp")
    for name, tensor in wire.extract(s.stub, "blob_mlp").items():
        old = tensor.numpy().tobytes()
        at = data.find(old)
        assert at >= 0 and data.find(old, at + 1) < 0, name
        data[at : at + len(old)] = weights[name].numpy().tobytes()
    blob = s.repo / "weights.blob"
    blob.write_bytes(bytes(data))
    inputs = model_zoo.MODELS["blob_mlp"].inputs(2)
    run(s.stub, "blob_mlp", inputs)  # fold the packaged weights first
    version = s.stub.UpdateConstantBufferFromBlob(
        pb.UpdateConstantBufferFromBlobRequest(model="blob_mlp", weights_path=str(blob))
    ).version
    assert version.id != "initial" and version.digest.startswith("xxh3:")
    out, served = run(s.stub, "blob_mlp", inputs)
    assert wire.close(out, eager_with("blob_mlp", weights, inputs)) and served == version.id
    code, _ = code_of(
        lambda: s.stub.UpdateConstantBufferFromBlob(
            pb.UpdateConstantBufferFromBlobRequest(
                model="blob_mlp", weights_path=str(s.repo / "missing.blob")
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    bad = s.repo / "bad.blob"
    bad.write_bytes(b"\0" * 16)
    code, details = code_of(
        lambda: s.stub.UpdateConstantBufferFromBlob(
            pb.UpdateConstantBufferFromBlobRequest(model="blob_mlp", weights_path=str(bad))
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    out, served = run(s.stub, "blob_mlp", inputs)
    assert wire.close(out, eager_with("blob_mlp", weights, inputs)) and served == version.id


def _blob_loadable() -> bool:
    from aotiserve import runner_ext

    try:
        runner_ext.load_model(model_zoo.compiled("blob_mlp")).close()
        return True
    except Exception:  # noqa: BLE001
        return False


def test_uploads_write_in_place_one_at_a_time(server_factory):
    s = server_factory(["mlp"], metrics_port=0)
    inputs = model_zoo.MODELS["mlp"].inputs(2)
    gauge = s.app.metrics.staging_bytes.labels("mlp")
    # The first full upload has no inactive buffer to write into: its own tensors become
    # that buffer (no fill with the active weights, no copy at the end).
    warm = new_weights("mlp", 2.0)
    upload(s.stub, "mlp", warm, validate_full=True)
    assert gauge._value.get() == 0
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    out, _ = run(s.stub, "mlp", inputs)
    assert wire.close(out, eager_with("mlp", warm, inputs))
    s.stub.RollbackConstantBuffer(pb.RollbackConstantBufferRequest(model="mlp"))
    weights = new_weights("mlp")
    half_sent = threading.Event()
    release = threading.Event()

    first = s.stub.UpdateConstantBuffer.future(
        wire.pause_at_half(
            wire.upload_requests("mlp", weights, validate_full=True, chunk_bytes=512),
            half_sent,
            release,
        )
    )
    half_sent.wait(30)
    # Chunks go straight into the inactive buffer (the one the rollback left): no
    # staging copy is held.
    assert gauge._value.get() == 0
    code, details = code_of(lambda: upload(s.stub, "mlp", weights, validate_full=True))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "in progress" in details
    out, served = run(s.stub, "mlp", inputs)  # serving is unaffected meanwhile
    assert wire.close(out, model_zoo.eager("mlp", inputs)) and served == "initial"
    release.set()
    version = first.result(30).version
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    out, served = run(s.stub, "mlp", inputs)
    assert wire.close(out, eager_with("mlp", weights, inputs)) and served == version.id
    upload(s.stub, "mlp", {"fc2.bias": torch.zeros(10)})  # the claim was released


def _inactive_ptrs(model) -> dict[str, int]:
    views = model.replicas[0].runner.extract_constants_map(True)
    return {fqn: views[fqn].data_ptr() for fqn in model.constants if fqn in views}


def test_a_reserved_inactive_buffer_takes_the_first_upload_in_place(server_factory):
    s = server_factory(["mlp"], reserve_inactive_buffer=True)
    model = s.app.registry.get("mlp")
    inputs = model_zoo.MODELS["mlp"].inputs(2)
    # Loaded with both buffers: the inactive one a copy of the weights, but no version.
    reserved = _inactive_ptrs(model)
    assert set(reserved) == set(model.constants)
    active = model.replicas[0].runner.extract_constants_map(False)
    inactive = model.replicas[0].runner.extract_constants_map(True)
    assert all(torch.equal(inactive[f], active[f]) for f in model.constants)
    code, details = code_of(
        lambda: s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "nothing is staged" in details
    code, _ = code_of(
        lambda: s.stub.RollbackConstantBuffer(pb.RollbackConstantBufferRequest(model="mlp"))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    out, served = run(s.stub, "mlp", inputs)
    assert wire.close(out, model_zoo.eager("mlp", inputs)) and served == "initial"
    # The first full upload writes into that memory (no tensors of its own).
    weights = new_weights("mlp")
    version = upload(s.stub, "mlp", weights, validate_full=True).version
    assert _inactive_ptrs(model) == reserved
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    out, served = run(s.stub, "mlp", inputs)
    assert wire.close(out, eager_with("mlp", weights, inputs)) and served == version.id
    s.stub.RollbackConstantBuffer(pb.RollbackConstantBufferRequest(model="mlp"))
    out, served = run(s.stub, "mlp", inputs)
    assert wire.close(out, model_zoo.eager("mlp", inputs)) and served == "initial"


def test_a_partial_first_upload_into_a_reserved_buffer_keeps_the_other_weights(server_factory):
    s = server_factory(["mlp"], reserve_inactive_buffer=True)
    model = s.app.registry.get("mlp")
    reserved = _inactive_ptrs(model)
    inputs = model_zoo.MODELS["mlp"].inputs(2)
    bias = {"fc2.bias": torch.full((10,), 0.25)}
    upload(s.stub, "mlp", bias)
    assert _inactive_ptrs(model) == reserved
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    out, _ = run(s.stub, "mlp", inputs)
    assert wire.close(out, eager_with("mlp", bias, inputs))


def test_without_a_reservation_the_inactive_buffer_waits_for_the_first_upload(server_factory):
    s = server_factory(["mlp"])
    model = s.app.registry.get("mlp")
    assert model.weights.inactive_empty  # nothing reads it (a CUDA runner crashes reading it)
    upload(s.stub, "mlp", new_weights("mlp"), validate_full=True)
    assert not model.weights.inactive_empty


@pytest.mark.slow  # ~30 s on 2 busy cores
def test_one_gib_update_through_the_client_serves_eager_after_swap(server_factory):
    """1 GiB in four 256 MiB tensors (each 4x the 64 MiB message limit), staged by the real
    client: before the swap the old weights serve, after it exactly the new ones."""
    from aotiserve.client import Client

    s = server_factory(["big_embed"])
    assert s.config.max_message_bytes < 256 << 20
    module = model_zoo.MODELS["big_embed"].module()
    ids = torch.tensor([0, 1, 4097, 65535, 31337])
    with torch.no_grad():
        old = module(ids)
        for p in module.parameters():  # new weights in place: no second 1 GiB copy here
            p.mul_(-0.5).add_(0.25)
        new = module(ids)
    weights = {k: v for k, v in module.state_dict().items()}
    assert sum(v.nbytes for v in weights.values()) == 1 << 30
    with Client(s.target) as client:
        handle = client.model("big_embed")
        staged = handle.update_constant_buffer(
            weights, use_inactive=True, validate_full_updates=True
        )
        torch.testing.assert_close(handle.run([ids])[0], old, rtol=0, atol=0)
        active = handle.swap_constant_buffer()
        assert active.id == staged.id
        torch.testing.assert_close(handle.run([ids])[0], new, rtol=0, atol=0)


def _decoded(raw: bytes):
    from aotiserve.server.upload_codec import decode_update_request

    try:
        m = decode_update_request(raw)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__
    if m.WhichOneof("part") != "chunk":
        return m.SerializeToString()
    return (m.chunk.name, m.chunk.offset, bytes(m.chunk.data))


def _by_protobuf(raw: bytes):
    try:
        m = pb.UpdateConstantBufferRequest.FromString(raw)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__
    if m.WhichOneof("part") != "chunk":
        return m.SerializeToString()
    return (m.chunk.name, m.chunk.offset, bytes(m.chunk.data))


def test_chunk_decoder_agrees_with_protobuf():
    """The zero-copy chunk decoder accepts, refuses and reads exactly what protobuf does."""
    import random

    from aotiserve.client.tensor_codec import encode_chunk_request

    messages = [
        _chunk("fc1.weight", 0, b"\1\2\3"),
        _chunk("w", 1 << 40, b"x" * 300),
        _chunk("w", -5, b"abc"),
        _chunk("", 0, b""),
        _chunk("ünï", 7, b""),
        _header(specs=[BIAS]),
        pb.UpdateConstantBufferRequest(),
        pb.UpdateConstantBufferRequest(
            chunk=pb.ConstantChunk(name="w", data=b"1", dtype=F32, shape=[1])
        ),
    ]
    raws = [m.SerializeToString() for m in messages]
    raws += [
        encode_chunk_request("fc2.bias", 4, memoryview(b"\0" * 5000)),
        _chunk("a", 1, b"x").SerializeToString() + _chunk("b", 2, b"y").SerializeToString(),
        b"\x12\x05\x0a\x02\xff\xfe\x10",
        b"\x12\x03\x1a\x05ab",
        b"",
        b"\x12",
    ]
    rng = random.Random(0)
    for base in list(raws):
        for _ in range(200):
            mutated = bytearray(base)
            if mutated and rng.random() < 0.7:
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            else:
                mutated = mutated[: rng.randrange(len(mutated) + 1)]
            raws.append(bytes(mutated))
    for raw in raws:
        assert _decoded(raw) == _by_protobuf(raw), raw


def test_a_swap_folds_the_staged_buffer_and_keeps_its_tensor_constants(server_factory):
    """A package with runtime constant folding: a swap folds the staged buffer before it
    flips (the first Run after it folds nothing), and torch's folding of an inactive buffer,
    which resets its lifted tensor constants to the active ones, does not win: every swap
    and rollback serves exactly the weights staged."""
    s = server_factory(["tensor_const"])
    assert s.app.registry.get("tensor_const").folds_at_run_time
    spec = model_zoo.MODELS["tensor_const"]
    (x,) = spec.inputs(3)

    def eager(weight, bias, scale, c):
        return x @ (weight * scale + 1.0).t() + bias + c

    module = spec.module()
    w, b = module.fc.weight, module.fc.bias
    new = {
        "fc.weight": w * 0.5,
        "fc.bias": b + 1.0,
        "scale": torch.tensor(3.0),
        "_tensor_constant0": torch.tensor([10.0, 20.0, 30.0, 40.0]),
    }
    upload(s.stub, "tensor_const", new, validate_full=True)
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="tensor_const"))
    out, _ = run(s.stub, "tensor_const", [x])
    want = eager(new["fc.weight"], new["fc.bias"], new["scale"], new["_tensor_constant0"])
    assert wire.close(out, [want.detach()])
    # A partial update of the tensor constant alone, then back and forth.
    upload(s.stub, "tensor_const", {"_tensor_constant0": torch.tensor([-1.0, 0.0, 1.0, 2.0])})
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="tensor_const"))
    out, _ = run(s.stub, "tensor_const", [x])
    partial = eager(new["fc.weight"], new["fc.bias"], new["scale"], torch.tensor([-1.0, 0, 1, 2]))
    assert wire.close(out, [partial.detach()])
    s.stub.RollbackConstantBuffer(pb.RollbackConstantBufferRequest(model="tensor_const"))
    out, _ = run(s.stub, "tensor_const", [x])
    assert wire.close(out, [want.detach()])


def _rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) >> 10 for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_repeated_stage_and_swap_cycles_give_their_memory_back():
    """Each stage-and-swap frees a buffer of constants from malloc's heap; without the trim
    (process_env.HeapTrim) and the release of torch's user-managed handles
    (runner_bindings.h), RSS grew by about one buffer (16 MiB for ``compute``) per cycle."""
    from server_harness import start_daemon

    from aotiserve.client import Client

    d = start_daemon(["compute"])
    try:
        model = Client(d.target).model("compute")
        names = list(model.extract_constants_map(False))
        shapes = {k: v.shape for k, v in model.extract_constants_map(False).items()}

        def cycle(i: int) -> None:
            model.update_constant_buffer(
                {n: torch.full(shapes[n], float(i)) for n in names}, True, True
            )
            model.swap_constant_buffer()

        for i in range(3):
            cycle(i)
        base = _rss_mib(d.proc.pid)
        for i in range(3, 23):  # 20 cycles: +300 MiB or more when the memory stays
            cycle(i)
        # The daemon's main loop trims within a tick once the cycles stop.
        wait_for(
            lambda: _rss_mib(d.proc.pid) <= base + 64,
            f"RSS back near {base} MiB after 20 cycles (it is {_rss_mib(d.proc.pid)} MiB)",
            timeout=20,
        )
    finally:
        d.proc.terminate()
        d.proc.wait(30)
