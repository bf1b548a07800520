"""The sync client's shared-memory path (client/src/aotiserve/client/local_shm.py): large
runs against a daemon on this host travel through a /dev/shm region, with the very results,
versions and errors of the request path; refusals fall back to the request."""

from __future__ import annotations

import logging
import os
import threading

import grpc
import numpy as np
import pytest
import torch
from server_harness import running_server

from aotiserve.client import Client, local_shm, wire
from aotiserve.client.errors import InvalidArgumentError, NotFoundError
from aotiserve.client.local_shm import SERVICE, SHM_DIR

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="no /dev/shm here")


def _regions(channel: grpc.Channel) -> list[str]:
    """The names of the system regions the daemon has registered (SystemSharedMemoryStatus)."""
    status = channel.unary_unary(SERVICE + "SystemSharedMemoryStatus")
    buf = status(b"")
    names, pos = [], 0
    while pos < len(buf):
        field, wt, pos = wire.read_tag(buf, pos, len(buf))
        a, b = wire.read_length(buf, pos, len(buf))
        if field == 1:  # map entry: key (1) is the region's name
            _f, _wt, p = wire.read_tag(buf, a, b)
            ka, kb = wire.read_length(buf, p, b)
            names.append(bytes(buf[ka:kb]).decode())
        pos = b
    return names


def _our_files() -> list[str]:
    return [f for f in os.listdir(SHM_DIR) if f.startswith(f"aotiserve-client-{os.getpid()}-")]


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def server():
    with running_server(["mlp", "two_io"]) as s:
        yield s


def test_runs_through_a_region_give_what_the_request_path_gives(server):
    with (
        Client(server.target, shared_memory_min_bytes=0) as shm,
        Client(server.target, shared_memory=False) as plain,
    ):
        model = shm.model("mlp")
        for seed in range(4):  # the first call learns the output sizes; later ones use the region
            x = _x(8, seed)
            got, want = model.run([x]), plain.model("mlp").run([x])
            assert torch.equal(got[0], want[0])
        assert model.last_weights_version == "initial"
        ours = [
            n for n in _regions(server.channel) if n.startswith(f"aotiserve-client-{os.getpid()}-")
        ]
        assert len(ours) == 1, ours
        assert _our_files() == [], "the client leaves no name in /dev/shm"
        # Several inputs of two dtypes, a tuple of outputs.
        x, ids = torch.randn(5, 16), torch.tensor([0, 3, 1, 2, 4])
        for _ in range(2):
            got, want = shm.model("two_io").run([x, ids]), plain.model("two_io").run([x, ids])
            assert len(got) == len(want) == 2
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and torch.equal(g, w)
    assert not [n for n in _regions(server.channel) if f"-{os.getpid()}-" in n]


def test_only_runs_of_the_threshold_and_more_use_a_region(server):
    with Client(server.target) as c:  # the default threshold, 256 KiB
        mine = lambda: [n for n in _regions(server.channel) if f"-{os.getpid()}-" in n]  # noqa: E731
        c.model("mlp").run([_x(1)])  # 256 bytes
        assert mine() == []
        c.model("mlp").run([_x(1024)])  # 256 KiB
        assert len(mine()) == 1
    with Client(server.target, shared_memory=False) as c:
        c.model("mlp").run([_x(1024)])
        assert not [n for n in _regions(server.channel) if f"-{os.getpid()}-" in n]


def test_a_daemon_that_refuses_regions_gets_the_request(caplog):
    with (
        running_server(["mlp"], shared_memory="off") as s,
        Client(s.target, shared_memory_min_bytes=0) as c,
    ):
        caplog.set_level(logging.INFO, logger="aotiserve.client.local_shm")
        x = _x(4)
        out = c.model("mlp").run([x])
        assert out[0].shape == (4, 10)
        assert torch.equal(out[0], c.model("mlp").run([x])[0])
        assert c._local_shm.enabled is False
        assert "shared memory with the daemon is off for this client" in caplog.text
        assert "UNIMPLEMENTED" in caplog.text


def test_a_client_without_the_admin_token_gets_the_request(tmp_path, caplog):
    token = tmp_path / "admin.token"
    token.write_text("s3cret\n")
    with running_server(["mlp"], admin_token_file=str(token)) as s:
        caplog.set_level(logging.INFO, logger="aotiserve.client.local_shm")
        with Client(s.target, shared_memory_min_bytes=0) as c:
            assert c.model("mlp").run([_x(2)])[0].shape == (2, 10)
            assert "UNAUTHENTICATED" in caplog.text
        with Client(s.target, admin_token="s3cret", shared_memory_min_bytes=0) as c:
            c.model("mlp").run([_x(2)])
            assert c._local_shm.enabled and len(_regions(s.channel)) == 1


def test_refused_inputs_get_the_errors_of_the_request_path(server):
    with (
        Client(server.target, shared_memory_min_bytes=0) as shm,
        Client(server.target, shared_memory=False) as plain,
    ):
        for inputs, error in (
            ([_x(4).astype(np.float64)], InvalidArgumentError),  # wrong dtype
            ([_x(4), _x(4)], InvalidArgumentError),  # one input too many
            ([np.zeros((4, 63), np.float32)], InvalidArgumentError),  # wrong shape
        ):
            with pytest.raises(error) as a:
                shm.model("mlp").run(inputs)
            with pytest.raises(error) as b:
                plain.model("mlp").run(inputs)
            assert str(a.value) == str(b.value)
        with pytest.raises(NotFoundError) as a:
            shm.model("nope").run([_x(4)])
        with pytest.raises(NotFoundError) as b:
            plain.model("nope").run([_x(4)])
        assert str(a.value) == str(b.value)
        # ... and the region still serves.
        assert torch.equal(shm.model("mlp").run([_x(3)])[0], plain.model("mlp").run([_x(3)])[0])


def test_concurrent_calls_each_get_their_own_result(server):
    with (
        Client(server.target, shared_memory_min_bytes=0) as shm,
        Client(server.target, shared_memory=False) as plain,
    ):
        inputs = [_x(1 + i % 7, seed=i) for i in range(24)]
        want = [plain.model("mlp").run([x])[0] for x in inputs]
        wrong: list[int] = []

        def worker(k: int) -> None:
            for i in range(k, len(inputs), 6):
                for _ in range(3):
                    if not torch.equal(shm.model("mlp").run([inputs[i]])[0], want[i]):
                        wrong.append(i)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wrong == []
        assert 1 <= len([n for n in _regions(server.channel) if f"-{os.getpid()}-" in n]) <= 2


def test_a_region_the_daemon_dropped_is_replaced(server):
    with (
        Client(server.target, shared_memory_min_bytes=0) as shm,
        Client(server.target, shared_memory=False) as plain,
    ):
        x = _x(6)
        want = plain.model("mlp").run([x])[0]
        assert torch.equal(shm.model("mlp").run([x])[0], want)
        # As when the connection that registered it closed: the daemon forgets the region.
        server.channel.unary_unary(SERVICE + "SystemSharedMemoryUnregister")(b"")
        for _ in range(3):
            assert torch.equal(shm.model("mlp").run([x])[0], want)
        assert len([n for n in _regions(server.channel) if f"-{os.getpid()}-" in n]) == 1


class _Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_model_whose_outputs_oip_cannot_carry_goes_back_to_the_request():
    """A daemon answers UNIMPLEMENTED for an output with no OIP datatype (float8): that call
    and every later one of the model travel in the request (a pure unit: the calls are fakes)."""
    from aotiserve.client.local_shm import LocalSharedMemory

    calls: list[str] = []

    def call(rpc: str, request: bytes, admin: bool) -> bytes:
        calls.append(rpc)
        if rpc == "ModelInfer":
            raise _Refusal(
                grpc.StatusCode.UNIMPLEMENTED, "output 'y': dtype Float8_e4m3fn has no ..."
            )
        return b""

    shm = LocalSharedMemory(call, lambda model: (["x"], ["y"]), min_bytes=0)
    x = _x(2)
    assert shm.run("m", [x], "numpy") is None
    assert calls == ["SystemSharedMemoryRegister", "ModelInfer"]
    assert shm.run("m", [x], "numpy") is None
    assert calls == ["SystemSharedMemoryRegister", "ModelInfer"], "no second try for that model"
    assert not _our_files()


def test_the_async_client_takes_the_same_path(server):
    import asyncio

    from aotiserve.client import AsyncClient

    x = _x(5)

    async def go():
        async with AsyncClient(server.target, shared_memory_min_bytes=0) as c:
            model = c.model("mlp")
            first, second = await model.run([x]), await model.run([x])
            return first, second, model.last_weights_version, c._local_shm._made

    first, second, version, regions = asyncio.run(go())
    with Client(server.target, shared_memory=False) as plain:
        want = plain.model("mlp").run([x])[0]
    assert torch.equal(first[0], want) and torch.equal(second[0], want)
    assert version == "initial" and regions == 1
    assert not [n for n in _regions(server.channel) if f"-{os.getpid()}-" in n]


def test_large_inputs_and_outputs_are_copied_on_several_threads_exactly():
    """Past PARALLEL_COPY_BYTES the copies into and out of a region are split over threads
    (local_shm.copy_bytes): every byte lands, whatever the split; a large run through a
    region gives what the request gives."""
    rng = np.random.default_rng(3)
    for n in (local_shm.PARALLEL_COPY_BYTES - 1, local_shm.PARALLEL_COPY_BYTES * 3 + 7):
        src = rng.integers(0, 256, n, dtype=np.uint8)
        dst = np.zeros(n, np.uint8)
        local_shm.copy_bytes(memoryview(dst), memoryview(src))
        assert np.array_equal(dst, src)
    with (
        running_server(["passthrough"]) as s,
        Client(s.target) as shm,
        Client(s.target, shared_memory=False) as plain,
    ):
        x = torch.randn(1027, 1024)  # 4 MiB and 12 KiB, in and out
        for _ in range(2):  # the second call also takes its output through the region
            got, want = shm.model("passthrough").run([x]), plain.model("passthrough").run([x])
            assert torch.equal(got[0], want[0])
