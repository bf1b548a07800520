"""Unit tests of the server's small parts: codec, admission control, reader/writer lock, errors."""

from __future__ import annotations

import re
import threading
import time

import grpc
import pytest
import torch

from aotiserve.client import dtypes as dt
from aotiserve.server import runner_codec
from aotiserve.server import tensor_codec as codec
from aotiserve.server.device_pool import DevicePool
from aotiserve.server.errors import (
    GENERIC_INTERNAL,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    to_status,
)
from aotiserve.server.rwlock import RWLock
from aotiserve.v1 import model_runner_pb2 as pb


@pytest.mark.parametrize(
    "d", [d for d in dt.DTYPES if hasattr(torch, d.torch_name)], ids=lambda d: d.torch_name
)
def test_codec_round_trips_every_dtype(d):
    dtype = getattr(torch, d.torch_name)
    src = (torch.arange(24) % 2).to(torch.float32).reshape(2, 3, 4).to(dtype)
    wire = runner_codec.encode(src)
    assert wire.dtype == d.wire and list(wire.shape) == [2, 3, 4]
    assert len(wire.data) == 24 * d.itemsize == 24 * dtype.itemsize
    back = codec.decode(wire, "x")
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), src.view(torch.uint8))


def test_codec_scalars_empty_and_non_contiguous():
    assert codec.decode(runner_codec.encode(torch.tensor(3.5)), "s").item() == 3.5
    empty = codec.decode(runner_codec.encode(torch.empty(0, 5)), "e")
    assert empty.shape == (0, 5)
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(codec.decode(runner_codec.encode(t), "t"), t)


def test_codec_decode_does_not_copy():
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    msg = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4], data=data)
    payload = msg.data
    t = codec.decode(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4], data=payload), "x")
    assert t.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "shape,data,exc,msg",
    [
        ([4], b"\0" * 15, InvalidArgument, "expected 16 bytes for float32[4], got 15"),
        ([-1], b"", InvalidArgument, "negative dimension"),
        ([1 << 62, 4], b"", InvalidArgument, "dimension 0 of shape [4611686018427387904, 4]"),
        ([1 << 20, 1 << 12], b"", ResourceExhausted, "more than 2147483648 elements"),
        ([0, 1 << 31, 1 << 31, 1 << 31], b"", InvalidArgument, "has no elements"),
        ([1] * 20, b"\0" * 4, InvalidArgument, "rank 20"),
    ],
)
def test_codec_rejects_malformed(shape, data, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)):
        codec.decode(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=shape, data=data), "input 0 ('x')")


def test_codec_rejects_bad_bool_and_unknown_dtype():
    with pytest.raises(InvalidArgument, match="bool"):
        codec.decode(pb.Tensor(dtype=pb.DATA_TYPE_BOOL, shape=[2], data=b"\x00\x07"), "b")
    with pytest.raises(InvalidArgument, match="unknown"):
        codec.decode(pb.Tensor(dtype=0, shape=[1], data=b"\0"), "u")


def test_pool_admission_queue_bound_and_deadline():
    pool = DevicePool("cpu", max_queue=1)
    slot = pool.slot(1, "model 'm'")
    computed = []
    with pool.admit(slot):
        # One may wait; its deadline passes while the runner is busy: dropped, not computed.
        with pytest.raises(DeadlineExceeded, match="not computed"):
            with pool.admit(slot, deadline=time.monotonic() + 0.05):
                computed.append(1)
        waiter_in = threading.Event()
        done = threading.Event()

        def waiter():
            waiter_in.set()
            with pool.admit(slot):
                computed.append(2)
            done.set()

        threading.Thread(target=waiter).start()
        waiter_in.wait()
        while pool.waiting == 0:  # the waiter has queued
            time.sleep(0.001)
        with pytest.raises(ResourceExhausted, match="full"):
            with pool.admit(slot):
                computed.append(3)
    done.wait(5)
    assert computed == [2] and pool.running == 0 and pool.waiting == 0


def test_rwlock_writer_waits_for_readers_and_blocks_new_ones():
    lock = RWLock()
    order = []
    reader_in = threading.Event()
    release_reader = threading.Event()

    def reader():
        with lock.shared():
            reader_in.set()
            release_reader.wait(5)
            order.append("r1")

    def writer():
        with lock.exclusive():
            order.append("w")

    def late_reader():
        with lock.shared():
            order.append("r2")

    t1 = threading.Thread(target=reader)
    t1.start()
    reader_in.wait()
    tw = threading.Thread(target=writer)
    tw.start()
    while not lock._writers_waiting:  # noqa: SLF001
        time.sleep(0.001)
    t2 = threading.Thread(target=late_reader)
    t2.start()
    release_reader.set()
    for t in (t1, tw, t2):
        t.join(5)
    assert order == ["r1", "w", "r2"]


def test_error_table():
    assert to_status(NotFound("model 'x' is not loaded")) == (
        grpc.StatusCode.NOT_FOUND,
        "model 'x' is not loaded",
    )
    code, msg = to_status(KeyError("secret internals"))
    assert code == grpc.StatusCode.INTERNAL and msg == GENERIC_INTERNAL and "secret" not in msg


def test_unload_of_a_loading_model_is_refused_and_the_load_keeps_it():
    """Unloading under a load closed runners the loading thread then kept using (a leak,
    and two instances writing one model's stored weights); now it is UNAVAILABLE."""
    from aotiserve.server.model_registry import ModelRegistry
    from aotiserve.server.model_types import ModelOptions, ModelState
    from aotiserve.server.served_model import ServedModel

    registry = ModelRegistry({}, ("cpu",), 1)
    model = ServedModel("m", "/nowhere.pt2", ModelOptions(("cpu",), 1), None)
    model.state = ModelState.LOADING
    registry._models["m"] = model
    with pytest.raises(Unavailable, match="'m' is still loading"):
        registry.unload("m")
    assert registry._models["m"] is model and model.state == ModelState.LOADING


def test_weights_store_cleanup_waits_for_a_write_under_way(tmp_path, monkeypatch):
    """A load's removal of crash leftovers (and prune) must not delete a temp file that
    another call is still writing: it waits for that write instead."""
    from aotiserve.server import weights_store
    from aotiserve.server.weights import new_version

    store = weights_store.WeightsStore(tmp_path)
    version = new_version("0" * 64, "t", "")
    writing, release = threading.Event(), threading.Event()
    real_save = weights_store.save_file

    def slow_save(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        writing.set()
        release.wait(30)

    monkeypatch.setattr(weights_store, "save_file", slow_save)
    errors = []

    def save():
        try:
            store.save_version("m", version, {"w": torch.ones(4)})
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=save)
    t.start()
    assert writing.wait(30)
    cleaner = threading.Thread(target=lambda: (store.committed("m"), store.prune("m", set())))
    cleaner.start()
    cleaner.join(0.2)
    assert cleaner.is_alive()  # held back while the write is under way
    release.set()
    t.join(30)
    cleaner.join(30)
    assert not errors


def test_versions_recorded_with_a_sha256_keep_it_named_as_such(tmp_path):
    """A weights store written before digests named their algorithm holds a bare hex
    "sha256": it reads back as "sha256:<hex>", never passed off as another algorithm's
    digest, and is written back under the new key."""
    from aotiserve.server.runner_codec import version
    from aotiserve.server.weights import file_digest, new_version
    from aotiserve.server.weights_store import version_from_json, version_json

    old = {"id": "v1", "sha256": "ab" * 32, "created_unix_ms": 5, "author": "a", "description": "d"}
    v = version_from_json(old)
    assert v.digest == "sha256:" + "ab" * 32 and version(v).sha256 == ""
    assert version_from_json(version_json(v)) == v and "sha256" not in version_json(v)
    blob = tmp_path / "w.bin"
    blob.write_bytes(b"\x01" * 5_000_000)
    import xxhash

    digest = file_digest(blob)
    assert digest == "xxh3:" + xxhash.xxh3_128(b"\x01" * 5_000_000).hexdigest()
    assert new_version(digest, "a", "").id.split("-")[1] == digest[len("xxh3:") :][:8]


def test_an_upload_onto_a_model_an_unload_closed_is_unavailable():
    """An unload can close the model (no replicas left) between an upload's claim and its
    allocation: that upload is refused as UNAVAILABLE, not an IndexError (INTERNAL) when
    it hashes its bytes (test_faults' concurrent weight ops and unloads found it)."""
    from types import SimpleNamespace

    from aotiserve.server.model_types import ConstantInfo, DeclaredConstant, UploadHeader
    from aotiserve.server.weights import StagingUpload

    info = ConstantInfo("w", "w", torch.float32, (2,))
    model = SimpleNamespace(
        name="victim",
        replicas=[],
        constants={"w": info},
        constants_by_name={"w": info},
        folded_names=set(),
    )
    header = UploadHeader(
        "victim", (DeclaredConstant("w", codec.wire_dtype(torch.float32), (2,)),), True, True
    )
    staging = StagingUpload(model, header, 1 << 20, codec.Limits())
    with pytest.raises(Unavailable, match="unloading"):
        staging.allocate()


def test_an_upload_reads_the_replicas_once_so_an_unload_midway_cannot_empty_it():
    """An unload may empty ``model.replicas`` right after an upload's check that the model
    has replicas: the staging keeps the replicas it saw, so it never ends up with no
    tensor to hash (an IndexError, INTERNAL); the commit is then refused because the model
    is no longer ready."""
    from types import SimpleNamespace

    from aotiserve.server.model_types import ConstantInfo, DeclaredConstant, UploadHeader
    from aotiserve.server.weights import StagingUpload

    info = ConstantInfo("w", "w", torch.float32, (2,))
    replica = SimpleNamespace(pool=SimpleNamespace(device=torch.device("cpu")))

    class Closing(SimpleNamespace):
        reads = 0

        @property
        def replicas(self):
            self.reads += 1  # the first read sees the replica; every later one, none
            return [replica] if self.reads == 1 else []

    model = Closing(
        name="victim", constants={"w": info}, constants_by_name={"w": info}, folded_names=set()
    )
    header = UploadHeader(
        "victim", (DeclaredConstant("w", codec.wire_dtype(torch.float32), (2,)),), True, True
    )
    staging = StagingUpload(model, header, 1 << 20, codec.Limits())
    staging.allocate()
    staging.add_chunk("w", 0, torch.tensor([1.0, 2.0]).numpy().tobytes())
    tensors, digest = staging.finish()
    assert torch.equal(tensors["w"][0], torch.tensor([1.0, 2.0])) and digest


def test_pack_leaves_the_callers_module_in_the_mode_it_was_in(tmp_path):
    """pack() exports in eval mode; a trainer packing mid-training goes on training (here the
    export fails, data-dependent control flow, and the mode still comes back)."""
    from aotiserve.server.packaging import pack

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    module = DataDependent().train()
    with pytest.raises(Exception):  # noqa: B017 (torch's own export error, whatever its type)
        pack(module, (torch.randn(2),), tmp_path / "m.pt2")
    assert module.training
