"""OIP shared-memory regions: inputs read from, and outputs written to, memory a client on
the same host shares with the daemon (Triton's system and CUDA shared-memory extensions).

A system region is a POSIX shared-memory object (``shm_open`` key, e.g. ``/input0``) the
daemon maps read-write; a CUDA region is a ``cudaIpcMemHandle_t`` the daemon opens on its
GPU. Each region is one ``uint8`` tensor over its bytes (kept alive by the requests using
it, so an unregister during a request unmaps only once that request is done).

Bounds and checks: at most ``max_regions`` regions and ``max_bytes`` mapped at once; names
unique; a key is one ``/name`` (no path); a region must lie inside its object; a tensor's
offset and size must lie inside its region and match its byte size; a system object must
belong to the registering client's user where the daemon can tell it (a TCP peer in its
network namespace; root clients excepted). A client that shrinks its object while it is
registered does not crash the daemon (``runner_ext.map_shared_memory``: past the new end the
region reads zeros), but every request that uses the region from then on is refused until it
is registered again (:func:`check_unshrunk`). Registering needs a peer on this host
(``shared_memory = "local"``, the default: loopback or a unix socket), and a region goes away
with the connection that registered it (a client killed without unregistering leaves nothing
mapped; see :meth:`SharedMemoryRegions.release_closed`).
"""

from __future__ import annotations

import base64
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from aotiserve import runner_ext

from . import peer_connections
from .errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unimplemented,
)

log = logging.getLogger(__name__)

SHM_ROOT = "/dev/shm"
# How often regions are checked for a registering connection that closed.
REAP_INTERVAL_S = 1.0


class RegionWatcher(Protocol):
    """What learns of regions as they come and go (``port.Port``)."""

    def region_added(self, kind: str, name: str, data: torch.Tensor) -> None: ...
    def region_removed(self, kind: str, name: str) -> None: ...


@dataclass(frozen=True)
class Region:
    """One registered region: ``data`` is a ``uint8`` tensor over its ``byte_size`` bytes."""

    name: str
    kind: str  # "system" or "cuda"
    data: torch.Tensor
    byte_size: int
    key: str = ""  # system: the shared-memory object's key
    offset: int = 0  # system: where the region starts in the object
    device_id: int = 0  # cuda: the GPU of the handle
    peer: str = ""  # the connection that registered it


def _check_name(name: str, what: str) -> None:
    if not name:
        raise InvalidArgument(f"{what}: a region needs a name")
    if len(name) > 255 or any(ord(c) < 32 for c in name):
        raise InvalidArgument(f"{what}: region name {name[:64]!r} is not a printable name")


def map_system(
    key: str, offset: int, byte_size: int, what: str, owner: int | None = None
) -> tuple[torch.Tensor, bool]:
    """Maps ``byte_size`` bytes at ``offset`` of POSIX shared-memory object ``key``; also
    says whether the object has memory behind every byte (written or reserved, not sparse).
    ``owner``: the registering client's uid where known; the object must then be its (root
    clients excepted), so no client maps, through the daemon, memory it could not open."""
    if not key.startswith("/") or "/" in key[1:] or key in ("/", "/.", "/..") or len(key) > 255:
        raise InvalidArgument(
            f"{what}: shared-memory key {key[:64]!r} must be one name after a slash, e.g. '/input0'"
        )
    if byte_size <= 0:
        raise InvalidArgument(f"{what}: byte_size must be positive, got {byte_size}")
    try:
        fd = os.open(SHM_ROOT + key, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(
            f"{what}: cannot open shared-memory object {key!r}: {exc.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{what}: {key!r} is not a shared-memory object")
        if owner not in (None, 0) and st.st_uid != owner:
            raise PermissionDenied(
                f"{what}: {key!r} belongs to uid {st.st_uid}, not to the registering "
                f"client (uid {owner})"
            )
        if offset + byte_size > st.st_size:
            raise InvalidArgument(
                f"{what}: region [{offset}, {offset + byte_size}) lies beyond the end of "
                f"{key!r} ({st.st_size} bytes)"
            )
        allocated = st.st_blocks * 512 >= st.st_size
        try:  # unmapped once the last view of the tensor goes
            return runner_ext.map_shared_memory(fd, offset, byte_size), allocated
        except RuntimeError as exc:
            raise InvalidArgument(f"{what}: cannot map {key!r}: {exc}") from None
    finally:
        os.close(fd)


def shrunk(name: str) -> InvalidArgument:
    """The error for a system region whose object shrank while it was mapped (the port
    says the same, runner_ext/csrc/port.cpp)."""
    return InvalidArgument(
        f"shared-memory region {name!r} shrank while the server had it mapped (its object is "
        "now smaller than the registered byte_size); unregister it and register it again"
    )


def _faulted(region: Region) -> bool:
    return region.kind == "system" and runner_ext.shared_memory_faulted(region.data)


class SharedMemoryRegions:
    """The registered regions, by kind and name (each kind has its own namespace)."""

    def __init__(
        self,
        mode: str = "local",
        max_regions: int = 64,
        max_bytes: int = 1 << 40,
        open_cuda: Callable[[bytes, int, int], torch.Tensor] | None = None,
        pin_host: Callable[[torch.Tensor], torch.Tensor] | None = None,
        connections: Callable[[], set | None] = peer_connections.established,
    ):
        if mode not in ("local", "any", "off"):
            raise ValueError(f"shared_memory must be local, any or off, got {mode!r}")
        self.mode = mode
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._open_cuda = open_cuda
        self._pin_host = pin_host
        self._connections = connections
        self._lock = threading.Lock()
        self._regions: dict[tuple[str, str], Region] = {}
        self._reaper: threading.Thread | None = None
        self._stopped = threading.Event()
        self._watchers: list[RegionWatcher] = []
        self._owner: Callable[[str], int | None] = peer_connections.peer_uid

    @property
    def extensions(self) -> tuple[str, ...]:
        """The OIP shared-memory extensions served: none when off, CUDA's on a CUDA build
        with a GPU."""
        if self.mode == "off":
            return ()
        cuda = self._open_cuda is not None and torch.cuda.is_available()
        return ("system_shared_memory",) + (("cuda_shared_memory",) if cuda else ())

    def watch(self, watcher: RegionWatcher) -> None:
        """Tells ``watcher`` (the port's hot path) of every region added and removed."""
        self._watchers.append(watcher)

    # Registration --------------------------------------------------------------

    def register_system(self, name: str, key: str, offset: int, byte_size: int, peer: str) -> None:
        what = f"system shared-memory region {name!r}"
        self._admit("system", name, byte_size, peer, what)
        data, allocated = map_system(key, offset, byte_size, what, self._owner(peer))
        data = self._pinned(data, allocated, what)
        self._add(Region(name, "system", data, byte_size, key=key, offset=offset, peer=peer))

    def _pinned(self, data: torch.Tensor, allocated: bool, what: str) -> torch.Tensor:
        """``data`` page-locked for the GPU where this daemon has CUDA up (it serves a model
        on a GPU): a GPU model's input read from the region then goes to the device by DMA
        straight from it, with no copy per request. As it is where it cannot be (the port
        then copies such inputs into pinned memory), where no GPU model is served, and
        where the object is sparse (not ``allocated``): locking its pages would make the
        daemon allocate, on a client's behalf, memory the client never wrote or reserved."""
        if self._pin_host is None or not torch.cuda.is_initialized():
            return data
        if not allocated:
            log.info(
                "%s: not page-locked (its object is sparse: write or reserve it, e.g. "
                "posix_fallocate, before registering); GPU models copy its inputs",
                what,
            )
            return data
        try:
            return self._pin_host(data)
        except RuntimeError as exc:
            log.warning("%s: not page-locked (%s); GPU models copy its inputs", what, exc)
            return data

    def register_cuda(
        self, name: str, raw_handle: bytes, device_id: int, byte_size: int, peer: str
    ) -> None:
        what = f"CUDA shared-memory region {name!r}"
        self._admit("cuda", name, byte_size, peer, what)
        if self._open_cuda is None:
            raise Unimplemented(f"{what}: this daemon was built without CUDA")
        if device_id < 0 or device_id >= torch.cuda.device_count():
            raise InvalidArgument(
                f"{what}: device_id {device_id} is not a GPU of this daemon "
                f"({torch.cuda.device_count()} visible)"
            )
        handle = _raw_handle(raw_handle, what)
        try:
            data = self._open_cuda(handle, device_id, byte_size)
        except (RuntimeError, ValueError) as exc:
            raise InvalidArgument(f"{what}: the CUDA IPC handle does not open: {exc}") from None
        self._add(Region(name, "cuda", data, byte_size, device_id=device_id, peer=peer))

    def _admit(self, kind: str, name: str, byte_size: int, peer: str, what: str) -> None:
        if self.mode == "off":
            raise Unimplemented(f"{what}: shared memory is off on this daemon (--shared-memory)")
        if self.mode == "local" and not peer_connections.is_local(peer):
            raise PermissionDenied(
                f"{what}: shared memory is only for clients on the daemon's host "
                f"(this call came from {peer}); send the data in the request"
            )
        _check_name(name, what)
        if byte_size <= 0:
            raise InvalidArgument(f"{what}: byte_size must be positive, got {byte_size}")
        with self._lock:
            if (kind, name) in self._regions:
                raise AlreadyExists(f"{what} is already registered; unregister it first")
            if len(self._regions) >= self.max_regions:
                raise ResourceExhausted(
                    f"{what}: {self.max_regions} regions are registered, the most this daemon "
                    "maps (max_shared_memory_regions); unregister some first"
                )
            mapped = sum(r.byte_size for r in self._regions.values())
            if mapped + byte_size > self.max_bytes:
                raise ResourceExhausted(
                    f"{what}: {byte_size} more bytes would map {mapped + byte_size}, beyond "
                    f"the limit of {self.max_bytes} (max_shared_memory_bytes)"
                )

    def _add(self, region: Region) -> None:
        what = f"{region.kind} shared-memory region {region.name!r}"
        with self._lock:  # re-checked: a racing register of the same name may have won
            if (region.kind, region.name) in self._regions:
                raise AlreadyExists(f"{what} is already registered; unregister it first")
            if len(self._regions) >= self.max_regions:
                raise ResourceExhausted(f"{what}: {self.max_regions} regions are registered")
            self._regions[(region.kind, region.name)] = region
            for w in self._watchers:
                w.region_added(region.kind, region.name, region.data)
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap, name="aotiserve-shm-reaper", daemon=True
                )
                self._reaper.start()
        log.info(
            "%s registered (%d bytes%s) by %s",
            what,
            region.byte_size,
            f", key {region.key!r} at {region.offset}"
            if region.kind == "system"
            else f", cuda:{region.device_id}",
            region.peer or "?",
        )

    def unregister(self, kind: str, name: str) -> None:
        """Forgets region ``name`` of ``kind`` (empty: every one of the kind). Its memory is
        unmapped once no request uses it. Unknown names are not an error (as in Triton)."""
        with self._lock:
            gone = [k for k in self._regions if k[0] == kind and (not name or k[1] == name)]
            self._forget(gone)
        for _kind, n in gone:
            log.info("%s shared-memory region %r unregistered", kind, n)

    def status(self, kind: str, name: str) -> list[Region]:
        with self._lock:
            if name:
                region = self._regions.get((kind, name))
                if region is None:
                    raise NotFound(f"no {kind} shared-memory region named {name!r} is registered")
                return [region]
            return [r for (k, _n), r in sorted(self._regions.items()) if k == kind]

    # Requests ------------------------------------------------------------------

    def tensor_bytes(self, parameters, what: str, needed: int | None) -> torch.Tensor | None:
        """The ``uint8`` bytes a tensor's shared-memory parameters name (None: the tensor
        has none). ``needed``: the byte size the tensor must have (None: any up to the
        region's end, for outputs whose size is known only after the run)."""
        if "shared_memory_region" not in parameters:
            for key in ("shared_memory_byte_size", "shared_memory_offset"):
                if key in parameters:
                    raise InvalidArgument(f"{what}: {key} without shared_memory_region")
            return None
        name = _param(parameters, "shared_memory_region", "string_param", what)
        size = _param(parameters, "shared_memory_byte_size", ("int64_param", "uint64_param"), what)
        offset = (
            _param(parameters, "shared_memory_offset", ("int64_param", "uint64_param"), what)
            if "shared_memory_offset" in parameters
            else 0
        )
        region = self._find(name, what)
        if _faulted(region):
            raise shrunk(name)
        if size < 0 or offset < 0 or offset + size > region.byte_size:
            raise InvalidArgument(
                f"{what}: bytes [{offset}, {offset + size}) lie outside shared-memory region "
                f"{name!r} ({region.byte_size} bytes)"
            )
        if needed is not None and size != needed:
            raise InvalidArgument(
                f"{what}: shared_memory_byte_size is {size}, but the tensor has {needed} bytes"
            )
        return region.data[offset : offset + size]

    def check_unshrunk(self, tensors: Iterable) -> None:
        """Raises for the first region named by these inputs' or outputs' parameters whose
        object shrank while it was mapped (once a request that used them is done: it may
        have read zeros or written nowhere)."""
        for tensor in tensors:
            if "shared_memory_region" not in tensor.parameters:
                continue
            name = tensor.parameters["shared_memory_region"].string_param
            with self._lock:
                found = [r for (_k, n), r in self._regions.items() if n == name]
            if any(_faulted(r) for r in found):
                raise shrunk(name)

    def _find(self, name: str, what: str) -> Region:
        with self._lock:
            found = [r for (_k, n), r in self._regions.items() if n == name]
        if not found:
            raise InvalidArgument(f"{what}: no shared-memory region named {name!r} is registered")
        if len(found) > 1:  # a system and a CUDA region of one name: prefer neither
            raise InvalidArgument(
                f"{what}: both a system and a CUDA region are named {name!r}; rename one"
            )
        return found[0]

    # Clients that went away ------------------------------------------------------

    def release_closed(self) -> list[str]:
        """Unregisters every region whose registering connection closed (a client that
        exited or was killed without unregistering). Returns their names."""
        open_peers = self._connections()
        if open_peers is None:  # this platform cannot tell: keep everything
            return []
        with self._lock:
            gone = [
                k
                for k, r in self._regions.items()
                if (a := peer_connections.address(r.peer)) is not None and a not in open_peers
            ]
            self._forget(gone)
        for kind, name in gone:
            log.info(
                "%s shared-memory region %r released: the client that registered it went away",
                kind,
                name,
            )
        return [n for _k, n in gone]

    def _reap(self) -> None:
        while not self._stopped.wait(REAP_INTERVAL_S):
            try:
                self.release_closed()
            except Exception:  # noqa: BLE001 (the reaper must outlive a bad read of /proc)
                log.exception("checking shared-memory clients failed")

    def _forget(self, keys: list[tuple[str, str]]) -> None:
        """Drops regions (``self._lock`` held)."""
        for kind, name in keys:
            del self._regions[(kind, name)]
            for w in self._watchers:
                w.region_removed(kind, name)

    def close(self) -> None:
        self._stopped.set()
        with self._lock:
            self._forget(list(self._regions))


def _param(parameters, key: str, kinds: str | Iterable[str], what: str):
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    which = parameters[key].WhichOneof("parameter_choice")
    if which not in kinds:
        raise InvalidArgument(f"{what}: parameter {key} must be a {' or '.join(kinds)}")
    return getattr(parameters[key], which)


def _raw_handle(raw: bytes, what: str) -> bytes:
    """The 64 bytes of a cudaIpcMemHandle_t (tritonclient sends them as they are; some
    clients send them base64-encoded)."""
    if len(raw) == 64:
        return raw
    try:
        decoded = base64.b64decode(raw, validate=True)
    except ValueError:
        decoded = b""
    if len(decoded) == 64:
        return decoded
    raise InvalidArgument(
        f"{what}: raw_handle must be a serialized cudaIpcMemHandle_t (64 bytes), got {len(raw)}"
    )
