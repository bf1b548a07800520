"""Server-side weight pulls (LoadWeights), partial stagings that copy only what they
change, GPU-direct hand-off refusals, and the weights metrics (issue 19)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import grpc
import model_zoo
import pytest
import torch
import wire
from helpers import code_of, eager_with, info, new_weights, run, upload
from safetensors.torch import save_file

import aotiserve.client as ac
from aotiserve.client import cli
from aotiserve.server import buffer_writes, weights_ipc
from aotiserve.v1 import model_runner_pb2 as pb


def load(s, model, path, **kw) -> pb.LoadWeightsResponse:
    return s.stub.LoadWeights(pb.LoadWeightsRequest(model=model, path=str(path), **kw))


def served(s, model="mlp"):
    """What serves now: (active version id, staged version id, outputs on fixed inputs)."""
    m = info(s.stub, model)
    out, _ = run(s.stub, model, model_zoo.MODELS[model].inputs(3))
    return m.active_version.id, m.staged_version.id, out


def test_load_a_file_stage_swap_and_the_same_sha_as_an_upload(server_factory, tmp_path):
    s = server_factory(["mlp"], metrics_port=0)
    weights = new_weights("mlp")
    path = s.repo / "new.safetensors"
    save_file(weights, path)
    inputs = model_zoo.MODELS["mlp"].inputs(3)
    old = model_zoo.eager("mlp", inputs)

    resp = load(s, "mlp", path, validate_full_updates=True)
    assert resp.bytes_staged == sum(t.numel() * t.element_size() for t in weights.values())
    assert sorted(resp.updated) == sorted(weights)
    assert resp.version.description == "new.safetensors"
    out, version = run(s.stub, "mlp", inputs)  # staged, not serving
    assert wire.close(out, old) and version == "initial"
    assert info(s.stub, "mlp").staged_version.id == resp.version.id
    staged = wire.extract(s.stub, "mlp", use_inactive=True)
    assert all(torch.equal(staged[k], t) for k, t in weights.items())

    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    out, version = run(s.stub, "mlp", inputs)
    assert wire.close(out, eager_with("mlp", weights, inputs)) and version == resp.version.id

    # The same weights uploaded over the wire form the same content hash.
    uploaded = upload(s.stub, "mlp", weights, validate_full=True).version
    assert uploaded.digest == resp.version.digest and uploaded.digest.startswith("xxh3:")

    metrics = s.app.metrics
    assert (
        metrics.sample("aotiserve_staged_bytes_total", model="mlp", path="file")
        == resp.bytes_staged
    )
    assert metrics.sample("aotiserve_weights_stage_seconds_count", model="mlp", path="file") == 1
    assert metrics.sample("aotiserve_weights_stage_seconds_count", model="mlp", path="upload") == 1
    assert metrics.sample("aotiserve_weights_swap_seconds_count", model="mlp", op="swap") == 1
    age = metrics.sample("aotiserve_weights_active_age_seconds", model="mlp")
    assert 0 <= age < 3600


def test_a_pull_hashes_many_blocks_as_an_upload_does(tmp_path):
    """A pull hashes each 1 MiB piece as it reads it; an upload hashes whole 4 MiB blocks
    once their bytes arrived: for a constant of several blocks and a ragged end, read in
    windows as a pull does, both give the same block digests (so the same version digest)."""
    from aotiserve.server import safetensors_source, tensor_codec, weights, weights_pull

    t = torch.arange((10 << 20) // 4 + 3, dtype=torch.float32)  # 2.5 blocks and 12 bytes
    path = tmp_path / "w.safetensors"
    save_file({"w": t}, path)
    with safetensors_source.open_source(path, lambda p: None, tensor_codec.Limits(), 8) as src:
        entry = src.entries[0]
        host = torch.empty(entry.nbytes, dtype=torch.uint8)
        pulled = {}
        for start, end in safetensors_source.windows(entry.nbytes, 2 * weights.HASH_BLOCK):
            pulled.update(weights_pull._read_hashing(entry, host[start:end], start, end))
    assert torch.equal(host.view(torch.float32), t)
    blocks = range(0, entry.nbytes, weights.HASH_BLOCK)
    whole = {
        b // weights.HASH_BLOCK: weights._block_hash(host, b, b + weights.HASH_BLOCK)
        for b in blocks
    }
    assert pulled == whole and len(pulled) == 3


def test_a_file_truncated_while_mapped_is_an_error_not_sigbus(tmp_path):
    """Pulls copy out of a mapping of the file; a file that shrinks meanwhile would make the
    copy fault (SIGBUS, fatal). The copy traps it: FileTruncated, again and again, and the
    window's other bytes still copy; through the source it is INVALID_ARGUMENT naming the
    tensor and the file."""
    import numpy as np

    from aotiserve import runner_ext
    from aotiserve.server import safetensors_source, tensor_codec
    from aotiserve.server.errors import InvalidArgument

    t = torch.arange(1 << 20, dtype=torch.int32)  # 4 MiB
    path = tmp_path / "w.safetensors"
    save_file({"w": t}, path)
    with safetensors_source.open_source(path, lambda p: None, tensor_codec.Limits(), 8) as src:
        entry = src.entries[0]
        dst = np.empty(entry.nbytes, dtype=np.uint8)
        with entry.window(0, entry.nbytes) as window:
            window.copy_into(0, memoryview(dst)[:4096])
            assert np.array_equal(dst[:4096].view(np.int32), t[:1024].numpy())
            with open(path, "r+b") as f:
                f.truncate(entry.start + (1 << 20))  # 1 MiB of the tensor's data left
            for _ in range(2):
                with pytest.raises(InvalidArgument, match="tensor 'w': w.safetensors ended before"):
                    window.copy_into(2 << 20, memoryview(dst)[2 << 20 :])
            window.copy_into(4096, memoryview(dst)[4096:8192])  # still mapped: the same bytes
            assert np.array_equal(dst[:8192].view(np.int32), t[:2048].numpy())
        with pytest.raises(InvalidArgument, match="truncated or rewritten meanwhile"):
            with entry.window(0, entry.nbytes) as window:
                window.copy_into(0, memoryview(dst))
    fd = os.open(path, os.O_RDONLY)
    try:
        with runner_ext.FileWindow(fd, 0, 3 << 20) as raw, pytest.raises(runner_ext.FileTruncated):
            raw.copy_into(0, memoryview(np.empty(3 << 20, dtype=np.uint8)))
        with pytest.raises(IndexError, match="outside the window"):
            runner_ext.FileWindow(fd, 0, 16).copy_into(8, bytearray(16))
    finally:
        os.close(fd)


def test_runs_across_file_loads_and_swaps_are_never_mixed(server_factory):
    """Runs going on while files are loaded and swapped in: every Run answers, and with
    exactly the output of the version it reports."""
    import threading

    s = server_factory(["mlp"])
    inputs = model_zoo.MODELS["mlp"].inputs(3)
    expected = {"initial": model_zoo.eager("mlp", inputs)}
    stop = threading.Event()
    seen: list[tuple[str, list]] = []
    failed: list[BaseException] = []

    def loop():
        while not stop.is_set():
            try:
                seen.append(run(s.stub, "mlp", inputs)[::-1])
            except grpc.RpcError as e:  # counted: none may fail
                failed.append(e)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        for i in range(4):
            weights = new_weights("mlp", 1.0 + i, 0.01 * i)
            path = s.repo / f"v{i}.safetensors"
            save_file(weights, path)
            version = load(s, "mlp", path, validate_full_updates=True).version.id
            expected[version] = eager_with("mlp", weights, inputs)
            s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    finally:
        stop.set()
        thread.join()
    assert not failed and len(seen) > 4
    versions = {v for v, _ in seen}
    assert versions <= set(expected), versions
    assert all(wire.close(out, expected[v]) for v, out in seen)


def test_load_a_sharded_folder_partially(server_factory):
    s = server_factory(["mlp"])
    weights = new_weights("mlp", 2.0)
    keys = sorted(weights)
    folder = s.repo / "sharded"
    folder.mkdir()
    first, second = keys[:2], keys[2:3]  # a partial set: 3 of the constants
    save_file({k: weights[k] for k in first}, folder / "model-00001-of-00002.safetensors")
    save_file({k: weights[k] for k in second}, folder / "model-00002-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            **{k: "model-00001-of-00002.safetensors" for k in first},
            **{k: "model-00002-of-00002.safetensors" for k in second},
        },
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    code, details = code_of(lambda: load(s, "mlp", folder, validate_full_updates=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "misses constants" in details
    resp = load(s, "mlp", folder)
    assert sorted(resp.updated) == first + second
    staged = wire.extract(s.stub, "mlp", use_inactive=True)
    active = wire.extract(s.stub, "mlp")
    for k in keys:
        assert torch.equal(staged[k], weights[k] if k in first + second else active[k]), k
    # The index file itself names the same source.
    assert (
        load(s, "mlp", folder / "model.safetensors.index.json").version.digest
        == resp.version.digest
    )


def _corrupt(path, tensors, how):
    save_file(tensors, path)
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:-7])
    elif how == "garbage":
        path.write_bytes(b"\x00" * 3)
    elif how == "huge header":
        path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    elif how == "bad offsets":
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"][1] += 4
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


BAD_FILES = [
    ("unknown name", lambda w: {**w, "no.such.weight": torch.zeros(2)}, None, "no.such.weight"),
    ("folded name", lambda w: {"_FOLDED_CONST_x": torch.zeros(2)}, None, "only folded constants"),
    ("wrong dtype", lambda w: {**w, "fc1.weight": w["fc1.weight"].double()}, None, "dtype"),
    ("wrong shape", lambda w: {**w, "fc1.weight": w["fc1.weight"][:1]}, None, "shape"),
    ("truncated", lambda w: w, "truncated", "truncated"),
    ("not safetensors", lambda w: w, "garbage", "not a safetensors file"),
    ("huge header", lambda w: w, "huge header", "exceeds the bound"),
    ("lying offsets", lambda w: w, "bad offsets", "data_offsets"),
]


@pytest.mark.parametrize("case,make,how,says", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_are_refused_and_change_nothing(server_factory, case, make, how, says):
    s = server_factory(["mlp"])
    upload(s.stub, "mlp", new_weights("mlp", 3.0), validate_full=True)  # something staged
    before = served(s)
    path = s.repo / "bad.safetensors"
    tensors = make(new_weights("mlp"))
    if how:
        _corrupt(path, tensors, how)
    else:
        save_file(tensors, path)
    code, details = code_of(lambda: load(s, "mlp", path))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert says in details, details
    after = served(s)
    assert after[:2] == before[:2] and wire.close(after[2], before[2])


def test_paths_outside_the_roots_and_symlink_escapes(server_factory, tmp_path):
    s = server_factory(["mlp"])
    outside = tmp_path / "outside.safetensors"
    save_file(new_weights("mlp"), outside)
    before = served(s)
    link = s.repo / "escape.safetensors"
    link.symlink_to(outside)
    folder = s.repo / "shards"
    folder.mkdir()
    (folder / "w.safetensors").symlink_to(outside)  # a shard that leads outside
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"fc1.weight": "w.safetensors"}})
    )
    bad_index = s.repo / "dots"
    bad_index.mkdir()
    (bad_index / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"fc1.weight": "../../outside.safetensors"}})
    )
    for path, want in [
        (outside, grpc.StatusCode.PERMISSION_DENIED),
        (link, grpc.StatusCode.PERMISSION_DENIED),
        (folder, grpc.StatusCode.PERMISSION_DENIED),
        (bad_index, grpc.StatusCode.INVALID_ARGUMENT),
        (s.repo / "missing.safetensors", grpc.StatusCode.INVALID_ARGUMENT),
        (s.repo, grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        code, details = code_of(lambda: load(s, "mlp", path))
        assert code == want, (path, details)
    code, _ = code_of(lambda: load(s, "nope", outside))
    assert code == grpc.StatusCode.NOT_FOUND
    after = served(s)
    assert after[:2] == before[:2] and wire.close(after[2], before[2])


def test_named_pipes_are_refused_at_once_and_hold_no_weight_stream(server_factory):
    """A FIFO as the file, as the index or as a shard would block an open until a writer
    came: each is refused with INVALID_ARGUMENT at once, more times than there are weight
    streams (8), and a real file loads afterwards."""
    s = server_factory(["mlp"])
    before = served(s)
    fifo = s.repo / "pipe.safetensors"
    os.mkfifo(fifo)
    index_dir = s.repo / "piped_index"
    index_dir.mkdir()
    os.mkfifo(index_dir / "model.safetensors.index.json")
    shard_dir = s.repo / "piped_shard"
    shard_dir.mkdir()
    os.mkfifo(shard_dir / "w.safetensors")
    (shard_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"fc1.weight": "w.safetensors"}})
    )
    for _ in range(4):
        for path in (fifo, index_dir, shard_dir):
            request = pb.LoadWeightsRequest(model="mlp", path=str(path))
            code, details = code_of(lambda r=request: s.stub.LoadWeights(r, timeout=20))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert "is not a regular file" in details, details
    after = served(s)
    assert after[:2] == before[:2] and wire.close(after[2], before[2])
    good = s.repo / "good.safetensors"
    save_file(new_weights("mlp"), good)
    request = pb.LoadWeightsRequest(model="mlp", path=str(good))
    assert s.stub.LoadWeights(request, timeout=20).version.id


def test_a_file_of_only_folded_constants_says_so(server_factory):
    s = server_factory(["mlp"])
    path = s.repo / "folded.safetensors"
    save_file({"_FOLDED_CONST_a": torch.ones(2), "_FOLDED_CONST_b": torch.ones(3)}, path)
    code, details = code_of(lambda: load(s, "mlp", path))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "folded.safetensors" in details and "_FOLDED_CONST_a" in details, details


def test_partial_stagings_copy_only_what_differs(server_factory, monkeypatch):
    """k of n constants staged: the inactive buffer keeps what it already holds of the
    active weights; only constants whose content differs are copied."""
    s = server_factory(["mlp"])
    copied: list[str] = []
    original = buffer_writes.copy_into

    def counting(replica, constants, fqn, dst, src):
        copied.append(fqn)
        return original(replica, constants, fqn, dst, src)

    monkeypatch.setattr(buffer_writes, "copy_into", counting)
    inputs = model_zoo.MODELS["mlp"].inputs(3)
    base = model_zoo.MODELS["mlp"].module().state_dict()
    expect = {k: v.clone() for k, v in base.items()}
    steps = [("fc1.weight", 2.0), ("fc1.weight", 3.0), ("fc2.weight", 4.0), ("fc2.weight", 5.0)]
    copies = []
    for fqn, factor in steps:
        copied.clear()
        new = {fqn: (base[fqn] * factor).contiguous()}
        upload(s.stub, "mlp", new)
        copies.append(sorted(copied))
        s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
        expect.update(new)
        out, _ = run(s.stub, "mlp", inputs)
        assert wire.close(out, eager_with("mlp", expect, inputs)), (fqn, factor)
    # 1st: the inactive buffer is filled once (at claim) and nothing more is copied; 2nd:
    # it holds the initial weights, which equal the active ones but fc1.weight (sent);
    # 3rd: it holds the 1st's fc1.weight, older than the active one: that one is copied;
    # 4th: it holds the 2nd's weights, fc2.weight aside: nothing to copy.
    assert copies == [[], [], ["fc1.weight"], []], copies


def test_the_cli_loads_and_swaps(server_factory, capsys):
    s = server_factory(["mlp"])
    path = s.repo / "cli.safetensors"
    weights = new_weights("mlp", 0.25)
    save_file(weights, path)
    code = cli.main(
        [
            "--json",
            "weights",
            "load",
            "--model",
            "mlp",
            str(path),
            "--full",
            "--swap",
            "--target",
            s.target,
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["active"]["id"] == result["staged"]["id"] != "initial"
    inputs = model_zoo.MODELS["mlp"].inputs(2)
    with ac.Client(s.target) as client:
        m = client.model("mlp")
        torch.testing.assert_close(
            m.run(list(inputs))[0], eager_with("mlp", weights, inputs)[0], rtol=1e-4, atol=1e-5
        )
    code = cli.main(
        ["weights", "load", "--model", "mlp", "/nonexistent/x.safetensors", "--target", s.target]
    )
    _, err = capsys.readouterr()
    assert code == 1 and "PERMISSION_DENIED" in err


@pytest.mark.parametrize("nbytes", [0, 3, 4, 10, 4099])
def test_a_fingerprint_from_sums_is_the_hash_of_all_even_and_tail_sums(nbytes):
    """The version's per-constant fingerprint: SHA-256 of the int64 sums of the 32-bit words
    (all, even-indexed) and of the bytes past the last whole word, whichever way the sums
    were gathered (here torch's reductions; on a GPU the fused copy, tested there)."""
    import hashlib

    import numpy as np

    data = torch.randint(
        0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes)
    )
    sums = torch.zeros(3, dtype=torch.int64)
    weights_ipc.fingerprint_into(sums, data)
    words = np.frombuffer(data.numpy().tobytes()[: nbytes - nbytes % 4], dtype="<i4").astype(
        np.int64
    )
    want = np.array([words.sum(), words[::2].sum(), int(data[nbytes - nbytes % 4 :].sum())])
    assert (
        weights_ipc.fingerprint(sums.numpy())
        == hashlib.sha256(b"gpu-direct\0" + want.tobytes()).digest()
    )


def test_views_of_one_storage_give_their_reference_back_once(monkeypatch):
    """Tensors the client shared as one storage (same handle, counter and event) hold one
    reference: a hand-off that did not open them gives it back once, and one per storage."""
    released = []
    monkeypatch.setattr(
        torch.UntypedStorage,
        "_release_ipc_counter_cuda",
        lambda handle, offset: released.append((handle, offset)),
        raising=False,
    )

    from aotiserve.server.model_types import CudaHandoff, CudaIpcTensor

    def tensor(name, ref):
        return CudaIpcTensor(name, 1, (4,), (1,), 0, b"h" + ref, 16, 0, ref, 1, b"", False)

    shared = [tensor("a", b"r1"), tensor("b", b"r1"), tensor("c", b"r2"), tensor("d", b"r3")]
    handoff = CudaHandoff("m", "host", "gpu", tuple(shared), False)
    weights_ipc.release_unopened(handoff, opened={"d"})
    assert released == [(b"r1", 1), (b"r2", 1)]


def test_gpu_direct_refusals_need_no_gpu(server_factory):
    """Across hosts, or to a server without that GPU: FAILED_PRECONDITION with the reason,
    before any handle is opened; nothing served changes."""
    s = server_factory(["mlp"])
    before = served(s)
    tensor = pb.CudaIpcTensor(
        name="fc1.weight",
        dtype=pb.DATA_TYPE_FLOAT32,
        shape=[32, 64],
        stride=[64, 1],
        storage_handle=b"x" * 66,
        storage_size_bytes=32 * 64 * 4,
    )
    for host, says in [
        ("another-host", "host"),
        (weights_ipc.host_id(), "CUDA" if not torch.cuda.is_available() else "does not see"),
    ]:
        # As many tensors as a large model has constants: more than a control message's
        # 64 fields, each counted as a constant (up to an upload's max_constants).
        for tensors in ([tensor], [tensor] * 200):
            request = pb.LoadWeightsFromCudaRequest(
                model="mlp", host_id=host, device_uuid="GPU-not-here", tensors=tensors
            )
            code, details = code_of(lambda: s.stub.LoadWeightsFromCuda(request))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and says in details, details
    deep = pb.LoadWeightsFromCudaRequest(
        model="mlp", tensors=[pb.CudaIpcTensor(name="fc1.weight", shape=[1] * 17)]
    )
    code, details = code_of(lambda: s.stub.LoadWeightsFromCuda(deep))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "rank exceeds" in details, details
    with ac.Client(s.target) as client:
        with pytest.raises(ValueError, match="CUDA tensors"):
            client.model("mlp").update_constant_buffer(
                new_weights("mlp"), True, False, gpu_direct=True
            )
    after = served(s)
    assert after[:2] == before[:2] and wire.close(after[2], before[2])


# ---------------------------------------------------------------- CUDA (GPU machine)

_SENDER = textwrap.dedent("""
    import sys, torch
    from aotiserve.client import Client, cuda_ipc
    target, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(1)
    model = Client(target).model("mlp")
    fqns = model.get_constant_names_to_original_fqns().values()
    active = model.extract_constants_map(False)
    new = {k: (active[k] * 0.5 + 0.1).cuda() for k in fqns if k in active}
    if mode == "handoff":
        v = model.update_constant_buffer(new, True, True)  # auto: picks GPU-direct here
        torch.save({k: t.cpu() for k, t in new.items()}, sys.argv[3])
        print(v.id)
    elif mode == "flat":  # views of one allocation, some 16-byte aligned, some not
        reserved = torch.cuda.memory_reserved()
        flat = torch.zeros(sum(t.numel() + 5 for t in new.values()), device="cuda")
        views, at = {}, 0
        for i, (k, t) in enumerate(new.items()):
            views[k] = flat[at : at + t.numel()].view(t.shape)
            views[k].copy_(t)
            at = (at + t.numel() + 3) // 4 * 4 + i % 2
        v = model.update_constant_buffer(views, True, True, gpu_direct=True)
        del views, flat, t
        torch.cuda.ipc_collect()  # frees what the daemon gave back
        torch.cuda.empty_cache()
        print(v.id, torch.cuda.memory_reserved() == reserved)
    else:  # print a request whose tensors this process frees when it exits
        sys.stdout.buffer.write(cuda_ipc.share("mlp", new, validate_full_updates=True)
                                .SerializeToString())
""")


@pytest.fixture(scope="module")
def cuda_repo(tmp_path_factory):
    from torch.export import Dim

    from aotiserve.server.packaging import pack

    repo = tmp_path_factory.mktemp("cuda-repo")
    spec = model_zoo.MODELS["mlp"]
    inputs = tuple(t.cuda() for t in spec.inputs(4))
    batch = Dim("batch", min=1, max=spec.max_batch)
    pack(
        spec.module().cuda(),
        inputs,
        repo / "mlp.pt2",
        dynamic_shapes=tuple({0: batch} for _ in inputs),
        **spec.pack_kwargs,
    )
    return repo


def _cuda_server(server_factory, cuda_repo):
    s = server_factory(
        [],
        model_repository=str(cuda_repo),
        devices=("cuda:0",),
        allowed_roots=(str(cuda_repo),),
        metrics_port=0,
    )
    s.repo = cuda_repo
    return s


@pytest.mark.cuda
def test_gpu_direct_hand_off_from_a_second_process(server_factory, cuda_repo, tmp_path):
    s = _cuda_server(server_factory, cuda_repo)
    saved = tmp_path / "sent.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _SENDER, s.target, "handoff", str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    version = proc.stdout.strip().splitlines()[-1]
    staged_version = info(s.stub, "mlp").staged_version
    assert staged_version.id == version
    assert staged_version.digest.startswith("gpu-fingerprint:")  # not a hash of the bytes
    sent = torch.load(saved)
    staged = wire.extract(s.stub, "mlp", use_inactive=True)
    assert all(torch.equal(staged[k].cpu(), t) for k, t in sent.items())
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    inputs = model_zoo.MODELS["mlp"].inputs(3)
    out, served_by = run(s.stub, "mlp", inputs)
    assert served_by == version
    assert wire.close([o.cpu() for o in out], eager_with("mlp", sent, inputs))
    assert s.app.metrics.sample("aotiserve_staged_bytes_total", model="mlp", path="gpu-direct") > 0


@pytest.mark.cuda
def test_views_of_one_buffer_hand_over_as_one_storage_and_fingerprint_alike(
    server_factory, cuda_repo, tmp_path
):
    """A trainer's flat buffer: its views travel as one shared storage, opened once and
    given back once (the sender's memory is freed after the call), at aligned and
    unaligned offsets; the version's fingerprint depends on the bytes only, not on how
    they were laid out in the sender."""
    s = _cuda_server(server_factory, cuda_repo)

    def send(mode, *more):
        proc = subprocess.run(
            [sys.executable, "-c", _SENDER, s.target, mode, *more],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1].split()

    version, freed = send("flat")
    assert freed == "True"  # the daemon released the one reference it was given
    flat = info(s.stub, "mlp").staged_version
    assert flat.id == version
    saved = tmp_path / "sent.pt"
    (separate,) = send("handoff", str(saved))
    staged = wire.extract(s.stub, "mlp", use_inactive=True)
    assert all(torch.equal(staged[k].cpu(), t) for k, t in torch.load(saved).items())
    assert info(s.stub, "mlp").staged_version.digest == flat.digest != ""


@pytest.mark.cuda
@pytest.mark.parametrize("nbytes", [1, 3, 4, 7, 16, 21, 48, 4099, (3 << 20) + 13])
def test_the_fused_copy_fingerprints_as_torch_sums(nbytes):
    """runner_ext.copy_fingerprint copies exactly and adds the same sums as the torch
    reductions (even and odd int32 words, tail bytes) at every size and tail; an
    unaligned source is left to the caller (False, nothing copied)."""
    from aotiserve import runner_ext
    from aotiserve.server import weights_ipc

    gen = torch.Generator().manual_seed(nbytes)
    src = torch.randint(0, 256, (nbytes + 16,), dtype=torch.uint8, generator=gen).cuda()
    for offset, fused in ((0, True), (4, False)):
        dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
        sums = torch.full((3,), 7, dtype=torch.int64, device="cuda")
        assert runner_ext.copy_fingerprint(dst, src[offset : offset + nbytes], sums) is fused
        want = torch.full((3,), 7, dtype=torch.int64, device="cuda")
        weights_ipc.fingerprint_into(want, src[offset : offset + nbytes])
        if fused:
            assert torch.equal(dst, src[:nbytes]) and torch.equal(sums, want)
        else:
            assert not dst.any() and (sums == 7).all()


@pytest.mark.cuda
def test_gpu_direct_stale_handle_and_other_device(server_factory, cuda_repo):
    s = _cuda_server(server_factory, cuda_repo)
    before = served(s)
    proc = subprocess.run(
        [sys.executable, "-c", _SENDER, s.target, "share"], capture_output=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    request = pb.LoadWeightsFromCudaRequest.FromString(proc.stdout)  # its sender has exited
    code, details = code_of(lambda: s.stub.LoadWeightsFromCuda(request))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "could not be opened" in details
    other = pb.LoadWeightsFromCudaRequest()
    other.CopyFrom(request)
    other.device_uuid = "GPU-00000000-0000-0000-0000-000000000000"
    code, details = code_of(lambda: s.stub.LoadWeightsFromCuda(other))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "does not see" in details
    after = served(s)
    assert after[:2] == before[:2]


@pytest.mark.cuda
def test_load_a_file_into_a_cuda_replica(server_factory, cuda_repo):
    s = _cuda_server(server_factory, cuda_repo)
    weights = new_weights("mlp")
    path = s.repo / "new.safetensors"
    save_file(weights, path)
    resp = load(s, "mlp", path, validate_full_updates=True)
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    inputs = model_zoo.MODELS["mlp"].inputs(3)
    out, version = run(s.stub, "mlp", inputs)
    assert version == resp.version.id
    assert wire.close([o.cpu() for o in out], eager_with("mlp", weights, inputs))
    assert upload(s.stub, "mlp", weights, validate_full=True).version.digest == resp.version.digest


# ---------------------------------------------------------------- hostile files


@pytest.fixture(scope="module")
def fuzz_server():
    from server_harness import running_server

    with running_server(["mlp"]) as s:
        valid = s.repo / "valid.safetensors"
        save_file(new_weights("mlp"), valid)
        yield s, valid.read_bytes()


def test_fuzz_files_get_invalid_argument_or_stage(fuzz_server):
    """Random bytes, and valid files with bytes overwritten anywhere (header length, JSON,
    offsets, data): OK or INVALID_ARGUMENT, never another code, and the daemon serves on."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    s, valid = fuzz_server
    n = len(valid)
    files = st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, n - 1), st.binary(min_size=1, max_size=16)).map(
            lambda ib: valid[: ib[0]] + ib[1] + valid[ib[0] + len(ib[1]) :]
        ),
        st.integers(0, n - 1).map(lambda k: valid[:k]),
    )
    path = s.repo / "fuzz.safetensors"
    inputs = model_zoo.MODELS["mlp"].inputs(2)

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(data=files)
    def check(data):
        path.write_bytes(data)
        try:
            load(s, "mlp", path)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert run(s.stub, "mlp", inputs)[0]

    check()


def test_the_client_picks_gpu_direct_only_where_the_daemon_can_take_it(server_factory, monkeypatch):
    """update_constant_buffer with CUDA tensors (stood in for here: this machine has no GPU):
    a daemon whose ListModels does not say it shares this host and GPU gets them streamed;
    one that refuses the hand-off with FAILED_PRECONDITION too; gpu_direct=True raises it."""
    from aotiserve.client import cuda_ipc

    s = server_factory(["mlp"], metrics_port=0)
    weights = new_weights("mlp", 1.5)
    monkeypatch.setattr(cuda_ipc, "all_cuda", lambda m: True)
    refusal = pb.LoadWeightsFromCudaRequest(model="mlp", host_id="another-host")
    monkeypatch.setattr(cuda_ipc, "share", lambda *a, **k: refusal)
    metrics = s.app.metrics
    with ac.Client(s.target) as client:
        m = client.model("mlp")
        assert weights_ipc.HOST_ID_KEY not in m.info().metadata  # a CPU model
        m.update_constant_buffer(weights, True, True)  # not reachable: streamed
        assert metrics.sample("aotiserve_staged_bytes_total", model="mlp", path="upload") > 0
        monkeypatch.setattr(cuda_ipc, "reachable", lambda md, t: True)
        v = m.update_constant_buffer(weights, True, True)  # refused, then streamed
        assert v.id == m.info().staged_version.id
        assert (
            metrics.sample(
                "aotiserve_constant_buffer_ops_total",
                model="mlp",
                op="stage",
                outcome="failed_precondition",
            )
            == 1
        )
        with pytest.raises(ac.ClientError) as info:
            m.update_constant_buffer(weights, True, True, gpu_direct=True)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "host" in info.value.details
