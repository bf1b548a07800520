"""Shared memory for a client on the daemon's host: large runs without gRPC's copies.

A ``Model.run`` whose inputs hold at least ``min_bytes`` goes through a POSIX shared-memory
region instead of the request when the daemon runs on this host: the inputs are copied into
the region, the call is an Open Inference Protocol ``ModelInfer`` that names them there (the
daemon's C++ hot path reads them in place, docs/oip.md), and the outputs are written by the
daemon into the same region and copied out once. The request and the response carry a few
hundred bytes; gRPC's copies of the payload (serialization, its buffers, the socket) are gone.

When. The target is a loopback address, ``localhost`` or a unix socket, and the daemon accepts
the client's first region: it advertises system shared memory, allows this caller to register
(an admin call: with an admin token set on the daemon the client needs it) and sees the same
``/dev/shm``. A refusal turns the path off for this client (one INFO log line); every call then
travels in the request, as it does for a remote daemon.

Regions. At most ``max_regions`` per client, one per call in flight (a call that finds none
free travels in the request). Each is a ``/dev/shm`` object created by this client (mode 0600,
its pages reserved up front, so a full ``/dev/shm`` is an error here and never a SIGBUS later),
registered, and unlinked at once: the client and the daemon keep it mapped, and nothing is left
behind when either exits. The daemon drops the region when the client's connection closes; a
call that finds it gone travels in the request, and the next one registers a new region.

Outputs. The first call with given input shapes sends its outputs in the response and
learns their sizes; later calls with the same shapes have them written into the region. A
call the daemon refuses (a wrong dtype or shape, an unknown model) is made again in the
request, so that the error is the native ``Run``'s, word for word.

The messages are encoded and read here by hand (``wire``): the generated OIP classes must not
be imported into a process that may also import tritonclient (``aotiserve.oip``).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import mmap
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from aotiserve.client import wire
from aotiserve.client.dtypes import BY_OIP_NAME, DType
from aotiserve.client.errors import from_rpc_error
from aotiserve.client.tensor_codec import WireTensor, decode_bytes, to_wire

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
#: Inputs of this many bytes and more go through shared memory (Client's default).
DEFAULT_MIN_BYTES = 256 * 1024
#: Regions per client: calls in flight at once through shared memory.
DEFAULT_MAX_REGIONS = 2
_ALIGN = 64  # the daemon reads an input in place at a 64-byte aligned offset
_LEARNED_SHAPES = 64  # input shapes per client whose output sizes are remembered

# Copies into and out of a region this large are split over a few threads (numpy copies
# without the GIL): one core's memcpy runs at ~10 GB/s, a few together near the memory's
# bandwidth (a 4.8 MB input: 337 -> 201 µs on 2 cores).
PARALLEL_COPY_BYTES = 2 << 20
_COPY_PIECE = 1 << 20  # the smallest share of a copy worth a thread
# The CPUs this process may run on (a container's cpuset, not the host's count).
_COPY_WAYS = min(
    4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)

SERVICE = "/inference.GRPCInferenceService/"
# The daemon's own words for a region it does not have (any longer), docs/oip.md.
_REGION_GONE = ("no shared-memory region named", "shrank while the server had it mapped")


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _region_size(n: int) -> int:
    """``n`` rounded up to 1 MiB, and to an eighth of its power of two (at most 1/8 more), so
    that calls of slightly different sizes share a region."""
    step = max(1 << 20, 1 << max(0, (n - 1).bit_length() - 3))
    return (n + step - 1) // step * step


# ---------------------------------------------------------------- the messages


_text = wire.text


def _len_field(field: int, payload: bytes) -> bytes:
    return wire.len_prefix(field, len(payload)) + payload


def _region_params(field: int, region: str, offset: int, size: int) -> bytes:
    """The ``parameters`` map entries (the map's ``field``) naming bytes of a region
    (InferParameter: 2 int64, 3 string)."""
    entries = (
        ("shared_memory_region", _text(3, region)),
        ("shared_memory_offset", wire.key(2, 0) + wire.put_varint(offset)),
        ("shared_memory_byte_size", wire.key(2, 0) + wire.put_varint(size)),
    )
    return b"".join(_len_field(field, _text(1, k) + _len_field(2, v)) for k, v in entries)


def encode_register(name: str, key: str, byte_size: int) -> bytes:
    """``SystemSharedMemoryRegisterRequest``."""
    return _text(1, name) + _text(2, key) + wire.key(4, 0) + wire.put_varint(byte_size)


def encode_infer(
    model: str,
    inputs: Sequence[tuple[str, WireTensor, int]],
    outputs: Sequence[tuple[str, int, int]],
    region: str,
) -> bytes:
    """``ModelInferRequest`` of ``inputs`` (name, tensor, offset) in ``region``, asking for
    ``outputs`` (name, offset, size) there (none: every output, in the response)."""
    parts = [_text(1, model)]
    for name, t, offset in inputs:
        shape = b"".join(wire.put_varint(d) for d in t.shape)
        body = _text(1, name) + _text(2, t.dtype.oip_name or "")
        if shape:
            body += _len_field(3, shape)
        parts.append(_len_field(5, body + _region_params(4, region, offset, t.nbytes)))
    for name, offset, size in outputs:
        parts.append(_len_field(6, _text(1, name) + _region_params(2, region, offset, size)))
    return b"".join(parts)


@dataclass
class OutputView:
    name: str = ""
    datatype: str = ""
    shape: tuple[int, ...] = ()
    in_region: bool = False  # written into the region (else in raw_output_contents)


def _read_params(buf, start: int, stop: int) -> set[str]:
    """The key of one ``parameters`` map entry (a set of at most one name)."""
    keys = set()
    pos = start
    while pos < stop:
        field, wt, pos = wire.read_tag(buf, pos, stop)
        if field == 1 and wt == 2:
            a, b = wire.read_length(buf, pos, stop)
            keys.add(wire.utf8(buf, a, b))
            pos = b
        else:
            pos = wire.skip_field(buf, pos, stop, wt)
    return keys


def _read_output(buf, start: int, stop: int) -> OutputView:
    out = OutputView()
    shape: list[int] = []
    pos = start
    while pos < stop:
        field, wt, pos = wire.read_tag(buf, pos, stop)
        if wt == 2 and field in (1, 2, 3, 4):
            a, b = wire.read_length(buf, pos, stop)
            if field == 1:
                out.name = wire.utf8(buf, a, b)
            elif field == 2:
                out.datatype = wire.utf8(buf, a, b)
            elif field == 3:  # packed int64
                while a < b:
                    v, a = wire.read_varint(buf, a, b)
                    shape.append(wire.signed64(v))
            else:
                out.in_region |= "shared_memory_region" in _read_params(buf, a, b)
            pos = b
        elif field == 3 and wt == 0:
            v, pos = wire.read_varint(buf, pos, stop)
            shape.append(wire.signed64(v))
        else:
            pos = wire.skip_field(buf, pos, stop, wt)
    out.shape = tuple(shape)
    return out


def decode_infer(buf: bytes) -> tuple[str, list[OutputView], list[memoryview]]:
    """``ModelInferResponse`` → (model_version, outputs, raw_output_contents views)."""
    version, outputs, raw = "", [], []
    view = memoryview(buf)
    pos, end = 0, len(buf)
    while pos < end:
        field, wt, pos = wire.read_tag(buf, pos, end)
        if wt == 2 and field in (2, 5, 6):
            a, b = wire.read_length(buf, pos, end)
            if field == 2:
                version = wire.utf8(buf, a, b)
            elif field == 5:
                outputs.append(_read_output(buf, a, b))
            else:
                raw.append(view[a:b])
            pos = b
        else:
            pos = wire.skip_field(buf, pos, end, wt)
    return version, outputs, raw


# ---------------------------------------------------------------- copies

_copiers: tuple[int, cf.ThreadPoolExecutor] | None = None  # (pid, pool): made at first use


def _copier_pool() -> cf.ThreadPoolExecutor:
    global _copiers
    pid = os.getpid()
    if _copiers is None or _copiers[0] != pid:  # a forked child has none of its threads
        pool = cf.ThreadPoolExecutor(_COPY_WAYS - 1, thread_name_prefix="aotiserve-shm-copy")
        _copiers = (pid, pool)
    return _copiers[1]


def copy_bytes(dst: memoryview, src: memoryview) -> None:
    """``src``'s bytes into ``dst`` (both format "B", the same length); large copies on a
    few threads at once."""
    n = src.nbytes
    ways = min(_COPY_WAYS, n // _COPY_PIECE) if n >= PARALLEL_COPY_BYTES else 1
    if ways < 2:
        dst[:] = src
        return
    d = np.frombuffer(dst, np.uint8, n)
    s = np.frombuffer(src, np.uint8, n)
    step = -(-n // ways)

    def part(i: int) -> None:
        np.copyto(d[i * step : (i + 1) * step], s[i * step : (i + 1) * step])

    pool = _copier_pool()
    rest = [pool.submit(part, i) for i in range(1, ways)]
    part(0)
    for f in rest:
        f.result()


# ---------------------------------------------------------------- regions


class Region:
    """A ``/dev/shm`` object of ``size`` bytes, created and mapped by this process."""

    def __init__(self, size: int) -> None:
        self.key = f"/aotiserve-client-{os.getpid()}-{secrets.token_hex(8)}"
        self.name = self.key[1:]
        self.size = size
        path = SHM_DIR + self.key
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC now, rather than SIGBUS at a write
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)
        self.buf = memoryview(self._map)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR + self.key)


# ---------------------------------------------------------------- the path


Call = Callable[[str, bytes, bool], bytes]  # (rpc, request, admin) -> response bytes


class LocalSharedMemory:
    """The shared-memory path of one client (see the module doc). ``call`` makes a unary
    call of the OIP service on the client's channel (raising ``grpc.RpcError``); ``names_of``
    gives a model's input and output names (``ModelInfo``)."""

    def __init__(
        self,
        call: Call,
        names_of: Callable[[str], tuple[list[str], list[str]]],
        min_bytes: int = DEFAULT_MIN_BYTES,
        max_regions: int = DEFAULT_MAX_REGIONS,
    ) -> None:
        if min_bytes < 0:
            raise ValueError(f"shared_memory_min_bytes must be >= 0, got {min_bytes}")
        self._call = call
        self._names_of = names_of
        self.min_bytes = min_bytes
        self.max_regions = max_regions
        self.enabled = os.path.isdir(SHM_DIR)
        self._lock = threading.Lock()
        self._free: list[Region] = []
        self._made = 0  # regions this client holds (free or in a call)
        self._names: dict[str, tuple[list[str], list[str]]] = {}
        self._out_sizes: OrderedDict[tuple, list[int]] = OrderedDict()

    # ---- regions

    def _take(self, size: int) -> Region | None:
        """A registered region of ``size`` bytes or more, or None (none free, or refused)."""
        small = None
        with self._lock:
            fits = [r for r in self._free if r.size >= size]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
            if self._free:  # too small: given up for a larger one
                small = self._free.pop()
            elif self._made >= self.max_regions:
                return None
            else:
                self._made += 1
        if small is not None:
            self._unregister(small)
        size = _region_size(size)
        try:
            region = Region(size)
        except OSError as e:
            self._lost()
            self._off(f"no region of {size} bytes in {SHM_DIR} ({e.strerror})")
            return None
        try:
            self._call(
                "SystemSharedMemoryRegister", encode_register(region.name, region.key, size), True
            )
        except grpc.RpcError as e:
            self._lost()
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._off(f"the daemon did not take a region ({e.code().name}: {e.details()})")
            return None  # this call travels in the request
        finally:
            region.unlink()  # mapped by both ends now (or by none): the name is not needed
        return region

    def _lost(self) -> None:
        with self._lock:
            self._made -= 1

    def _give(self, region: Region) -> None:
        with self._lock:
            self._free.append(region)

    def _unregister(self, region: Region) -> None:
        """Gives ``region`` up (the daemon unmaps it: now, or with the connection)."""
        self._lost()
        with contextlib.suppress(grpc.RpcError):
            self._call("SystemSharedMemoryUnregister", _text(1, region.name), True)

    def _off(self, why: str) -> None:
        if self.enabled:
            self.enabled = False
            log.info("shared memory with the daemon is off for this client: %s", why)

    def close(self) -> None:
        with self._lock:
            regions, self._free = self._free, []
        for region in regions:
            self._unregister(region)

    # ---- runs

    def wants(self, inputs: Any) -> bool:
        """Whether ``inputs`` may go through a region (the path is on, and their bytes are
        ``min_bytes`` or more); cheap, so a small call pays nothing for the path."""
        if not self.enabled or not isinstance(inputs, (list, tuple)):
            return False
        total = 0
        for value in inputs:
            n = getattr(value, "nbytes", 0)
            total += n if isinstance(n, int) else 0
        return total >= self.min_bytes

    def run(self, model: str, inputs: Sequence[Any], fmt: str) -> tuple[list, str] | None:
        """Runs ``model`` through a region: (outputs, weights version), or None where this
        call must travel in the request (refused, no region free...). For inputs that
        :meth:`wants`."""
        try:
            tensors = [to_wire(v, f"input {i}") for i, v in enumerate(inputs)]
        except TypeError:
            return None  # the request path raises the error
        if any(t.dtype.oip_name is None for t in tensors):
            return None
        names = self._model_names(model)
        if names is None or len(names[0]) != len(tensors):
            return None
        in_names, out_names = names
        shapes_key = (model, tuple((t.dtype.wire, t.shape) for t in tensors))
        placed, offset = [], 0
        for name, t in zip(in_names, tensors):
            placed.append((name, t, offset))
            offset = _aligned(offset + t.nbytes)
        with self._lock:
            sizes = self._out_sizes.get(shapes_key)
        wanted = []
        if sizes is not None and len(sizes) == len(out_names):
            for name, size in zip(out_names, sizes):
                wanted.append((name, offset, size))
                offset = _aligned(offset + max(size, 1))
        region = self._take(max(offset, _ALIGN))
        if region is None:
            return None
        keep = True
        try:
            for _name, t, at in placed:
                copy_bytes(region.buf[at : at + t.nbytes], t.data)
            try:
                reply = self._call(
                    "ModelInfer", encode_infer(model, placed, wanted, region.name), False
                )
            except grpc.RpcError as e:
                details = e.details() or ""
                if any(words in details for words in _REGION_GONE):
                    keep = False
                    return None
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # The model answers what OIP cannot carry (a float8 output): the native
                    # Run can, so this model's calls travel in the request from now on.
                    self._names[model] = ([], [])
                    return None
                if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                    self._forget(model)
                    return None  # the request path says what was wrong, as Run says it
                raise from_rpc_error(e) from None
            version, outs, raw = decode_infer(reply)
            return self._outputs(outs, raw, wanted, region, shapes_key, fmt), version
        finally:
            if keep:
                self._give(region)
            else:
                self._unregister(region)

    def _outputs(self, outs, raw, wanted, region: Region, shapes_key, fmt) -> list:
        # raw_output_contents lines up with the outputs (an empty entry for one in the
        # region), or is empty when every output is in the region (docs/oip.md).
        results, sizes = [], []
        for i, o in enumerate(outs):
            what = f"output {i}"
            dtype: DType | None = BY_OIP_NAME.get(o.datatype)
            if dtype is None:
                raise ValueError(f"{what}: datatype {o.datatype!r} is not known")
            nbytes = dtype.itemsize
            for d in o.shape:
                nbytes *= d
            if o.in_region and i < len(wanted):
                at = wanted[i][1]
                data = np.empty(nbytes, np.uint8)  # the region is reused: copied out
                copy_bytes(memoryview(data), region.buf[at : at + nbytes])
            elif len(raw) == len(outs):
                data = raw[i]
            else:
                raise ValueError(f"{what}: the response carries no bytes for it")
            results.append(decode_bytes(data, dtype, o.shape, fmt, what))
            sizes.append(nbytes)
        with self._lock:
            self._out_sizes[shapes_key] = sizes
            self._out_sizes.move_to_end(shapes_key)
            while len(self._out_sizes) > _LEARNED_SHAPES:
                self._out_sizes.popitem(last=False)
        return results

    def _model_names(self, model: str) -> tuple[list[str], list[str]] | None:
        names = self._names.get(model)
        if names is None:
            try:
                names = self._names_of(model)
            except Exception:  # noqa: BLE001 (the request path reports what is wrong)
                return None
            self._names[model] = names
        return names

    def _forget(self, model: str) -> None:
        self._names.pop(model, None)
        with self._lock:
            for k in [k for k in self._out_sizes if k[0] == model]:
                del self._out_sizes[k]
