"""Units of OIP shared memory: peers read as addresses, /proc/net/tcp read as open
connections, and the region registry's bounds and rules (no daemon; real shared-memory
objects). End to end through tritonclient: test_oip_shared_memory.py."""

from __future__ import annotations

import os
import socket
import uuid
from types import SimpleNamespace

import pytest
import torch

from aotiserve.server import peer_connections as pc
from aotiserve.server.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unimplemented,
)
from aotiserve.server.shared_memory import SharedMemoryRegions

LOCAL = "ipv4:127.0.0.1:40000"


def test_peers_read_as_addresses():
    assert pc.address("ipv4:127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert pc.address("ipv6:[::1]:5000") == ("::1", 5000)
    assert pc.address("ipv6:%5B::1%5D:5000") == ("::1", 5000)
    assert pc.address("ipv6:[::ffff:10.0.0.2]:7") == ("10.0.0.2", 7)
    assert pc.address("unix:/run/a.sock") is None and pc.address("garbage") is None
    assert pc.is_local("unix:/run/a.sock") and pc.is_local(LOCAL)
    assert not pc.is_local("ipv4:10.1.2.3:5000")


def test_established_connections_from_proc(tmp_path):
    head = "  sl  local_address rem_address   st tx_queue rx_queue\n"
    (tmp_path / "tcp").write_text(
        head
        + "   0: 0100007F:1F90 0100007F:9C40 01 00000000:00000000\n"  # 127.0.0.1:40000 up
        + "   1: 0100007F:1F90 0100007F:9C41 08 00000000:00000000\n"  # CLOSE_WAIT: gone
    )
    (tmp_path / "tcp6").write_text(
        head
        + "   0: 00000000000000000000000001000000:1F90 "
        + "00000000000000000000000001000000:9C42 01 0\n"  # [::1]:40002 up
        + "   1: 0000000000000000FFFF00000100007F:1F90 "
        + "0000000000000000FFFF00000100007F:9C43 01 0\n"  # ::ffff:127.0.0.1:40003 up
    )
    assert pc.established(str(tmp_path)) == {
        ("127.0.0.1", 40000),
        ("::1", 40002),
        ("127.0.0.1", 40003),
    }
    assert pc.established(str(tmp_path / "none")) is None


def test_established_sees_this_process_connection():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, peer = server.accept()
    try:
        assert (peer[0], peer[1]) in pc.established()
    finally:
        for s in (accepted, client, server):
            s.close()


@pytest.fixture
def shm_key():
    key = f"/aotiserve-unit-{uuid.uuid4().hex[:12]}"
    path = f"/dev/shm{key}"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 16)  # 4096 bytes
    yield key
    os.unlink(path)


def _params(**kw):
    """An InferParameter map as protobuf gives it (WhichOneof + the field)."""

    def param(kind, value):
        return SimpleNamespace(WhichOneof=lambda _name: kind, **{kind: value})

    out = {}
    if "region" in kw:
        out["shared_memory_region"] = param("string_param", kw["region"])
    if "size" in kw:
        out["shared_memory_byte_size"] = param("int64_param", kw["size"])
    if "offset" in kw:
        out["shared_memory_offset"] = param("int64_param", kw["offset"])
    return out


def test_region_bytes_are_the_objects_bytes(shm_key):
    regions = SharedMemoryRegions()
    regions.register_system("r", shm_key, 100, 1000, LOCAL)
    data = regions.tensor_bytes(_params(region="r", size=16, offset=4), "input 'x'", 16)
    assert data.tolist() == [(100 + 4 + i) % 256 for i in range(16)]
    data[0] = 7  # writes reach the object (outputs)
    with open(f"/dev/shm{shm_key}", "rb") as f:
        assert f.read()[104] == 7
    with pytest.raises(InvalidArgument, match="outside"):
        regions.tensor_bytes(_params(region="r", size=16, offset=990), "input 'x'", 16)
    with pytest.raises(InvalidArgument, match="has 8 bytes"):
        regions.tensor_bytes(_params(region="r", size=16), "input 'x'", 8)
    with pytest.raises(InvalidArgument, match="without shared_memory_region"):
        regions.tensor_bytes(_params(size=16), "input 'x'", 16)
    assert regions.tensor_bytes({}, "input 'x'", 16) is None


def test_regions_are_bounded_in_count_and_bytes(shm_key):
    regions = SharedMemoryRegions(max_regions=2, max_bytes=3000)
    regions.register_system("a", shm_key, 0, 1000, LOCAL)
    with pytest.raises(ResourceExhausted, match="max_shared_memory_bytes"):
        regions.register_system("b", shm_key, 0, 2500, LOCAL)
    regions.register_system("b", shm_key, 0, 1000, LOCAL)
    with pytest.raises(ResourceExhausted, match="max_shared_memory_regions"):
        regions.register_system("c", shm_key, 0, 10, LOCAL)
    regions.unregister("system", "")
    regions.register_system("c", shm_key, 0, 10, LOCAL)


def test_only_local_peers_register_unless_configured(shm_key):
    with pytest.raises(PermissionDenied, match="same host|daemon's host"):
        SharedMemoryRegions("local").register_system("r", shm_key, 0, 8, "ipv4:10.0.0.9:5")
    SharedMemoryRegions("any").register_system("r", shm_key, 0, 8, "ipv4:10.0.0.9:5")
    with pytest.raises(Unimplemented, match="off"):
        SharedMemoryRegions("off").register_system("r", shm_key, 0, 8, LOCAL)


def test_regions_of_closed_connections_are_released(shm_key):
    open_now = {("127.0.0.1", 40000)}
    regions = SharedMemoryRegions(connections=lambda: open_now)
    regions.register_system("kept", shm_key, 0, 8, LOCAL)
    regions.register_system("gone", shm_key, 0, 8, "ipv4:127.0.0.1:40001")
    regions.register_system("unix", shm_key, 0, 8, "unix:/run/a.sock")
    assert regions.release_closed() == ["gone"]
    assert [r.name for r in regions.status("system", "")] == ["kept", "unix"]
    regions.close()


def test_an_unregistered_region_stays_mapped_while_a_request_holds_it(shm_key):
    regions = SharedMemoryRegions()
    regions.register_system("r", shm_key, 0, 4096, LOCAL)
    held = regions.tensor_bytes(_params(region="r", size=8), "input 'x'", 8)
    regions.unregister("system", "r")
    assert torch.equal(held, torch.arange(8, dtype=torch.uint8))


def test_a_peers_user_is_read_from_its_socket(tmp_path):
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    (tmp_path / "tcp").write_text(
        head
        # the client's side: local 127.0.0.1:40000, owned by uid 1000
        + "   0: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000 0\n"
        # the daemon's accepted side of the same connection, owned by uid 0
        + "   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0 0\n"
    )
    assert pc.peer_uid(LOCAL, str(tmp_path)) == 1000
    assert pc.peer_uid("ipv4:127.0.0.1:40001", str(tmp_path)) is None
    assert pc.peer_uid("unix:/run/a.sock", str(tmp_path)) is None


def test_an_object_of_another_user_is_refused(shm_key):
    """A client may not have the daemon map an object it does not own (root excepted)."""
    owner = os.stat(f"/dev/shm{shm_key}").st_uid
    regions = SharedMemoryRegions()
    regions._owner = lambda peer: owner + 1
    with pytest.raises(PermissionDenied, match="belongs to uid"):
        regions.register_system("r", shm_key, 0, 8, LOCAL)
    regions._owner = lambda peer: owner
    regions.register_system("r", shm_key, 0, 8, LOCAL)
    regions._owner = lambda peer: 0  # root
    regions.register_system("s", shm_key, 0, 8, LOCAL)
    regions._owner = lambda peer: None  # cannot tell: the object's permissions decide
    regions.register_system("t", shm_key, 0, 8, LOCAL)


def test_system_regions_are_page_locked_only_once_cuda_is_up(shm_key, monkeypatch, caplog):
    """A daemon serving a GPU model (CUDA up) page-locks each system region at registration
    (runner_ext.pin_host_memory, stood in for here); one that cannot keeps it as mapped, with
    a warning naming the region; without CUDA up nothing is pinned."""
    pinned = []

    def pin(data: torch.Tensor) -> torch.Tensor:
        if len(pinned) == 1:
            raise RuntimeError("cudaHostRegister: out of memory")
        pinned.append(data.data_ptr())
        return data[:]

    regions = SharedMemoryRegions(pin_host=pin)
    regions.register_system("cold", shm_key, 0, 100, LOCAL)  # CUDA not up: as mapped
    assert pinned == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    regions.register_system("hot", shm_key, 0, 100, LOCAL)
    assert pinned == [regions.status("system", "hot")[0].data.data_ptr()]
    with caplog.at_level("WARNING"):
        regions.register_system("unpinned", shm_key, 0, 100, LOCAL)
    assert "'unpinned': not page-locked (cudaHostRegister: out of memory)" in caplog.text
    data = regions.tensor_bytes(_params(region="unpinned", size=4), "input 'x'", 4)
    assert data.tolist() == [0, 1, 2, 3]  # served all the same
    # An object whose pages were never written or reserved (ftruncate alone) is left as it
    # is: locking it would allocate them in the daemon, for as many bytes as it claims.
    sparse = f"/aotiserve-test-sparse-{uuid.uuid4().hex[:8]}"
    fd = os.open(f"/dev/shm{sparse}", os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 64 << 20)
        with caplog.at_level("INFO"):
            regions.register_system("sparse", sparse, 0, 64 << 20, LOCAL)
        assert len(pinned) == 1
        assert "'sparse': not page-locked (its object is sparse" in caplog.text
        os.posix_fallocate(fd, 0, 64 << 20)  # reserved: pinned like any other
        pinned.clear()
        regions.register_system("reserved", sparse, 0, 64 << 20, LOCAL)
        assert pinned == [regions.status("system", "reserved")[0].data.data_ptr()]
    finally:
        os.close(fd)
        os.unlink(f"/dev/shm{sparse}")
