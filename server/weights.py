"""Weight versions and streamed staging of new weights.

A :class:`StagingUpload` receives one ``UpdateConstantBuffer`` stream: the
header declares every constant (validated against the model before anything
is allocated), then chunks are written straight into tensors preallocated on
each replica's device. Only a complete, valid upload is handed to the
runners; anything else drops the staging tensors and leaves both buffers as
they were.

The version's digest is ``xxh3:`` + hex XXH3-128 over, for each written constant in
sorted original-FQN order, ``fqn \\0 dtype \\0 shape \\0`` followed by the constant's
digest; a constant's digest is XXH3-128 over the XXH3-128 digests of its bytes cut into
4 MiB blocks (a tree hash: blocks are hashed on a thread pool as soon as their bytes
have all arrived, in any chunk order, overlapping the upload). XXH3 runs at memory
speed (about 30 GB/s a core), so hashing adds next to nothing to staging; the digest
tells versions apart (128 bits: no accidental collision), it does not authenticate
them: who may stage weights is decided by the admin token and TLS.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import xxhash

from . import tensor_codec as codec
from .errors import InvalidArgument, ResourceExhausted, Unavailable
from .model_types import ConstantInfo, UploadHeader, WeightsVersion

log = logging.getLogger(__name__)

FOLDED_PREFIX = "_FOLDED_CONST_"
INITIAL = "initial"


class _Model(Protocol):
    """What staging uses of its ``served_model.ServedModel``."""

    name: str
    replicas: list[Any]  # served_model.Replica: .pool (device, run_in_stream)
    constants: dict[str, ConstantInfo]  # by original FQN
    constants_by_name: dict[str, ConstantInfo]
    folded_names: set[str]

    def using_buffers(self) -> AbstractContextManager[None]: ...


_ids = itertools.count(1)


def digest_hex(digest: str) -> str:
    """The hex part of a ``"<algorithm>:<hex>"`` digest."""
    return digest.rpartition(":")[2]


def new_version(digest: str, author: str, description: str) -> WeightsVersion:
    now = time.time()
    vid = (
        f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-{digest_hex(digest)[:8]}-{next(_ids)}"
    )
    return WeightsVersion(vid, digest, int(now * 1000), author, description)


def _digest_header(info: ConstantInfo) -> bytes:
    return f"{info.fqn}\0{codec.dtype_name(info.dtype)}\0{list(info.shape)}\0".encode()


ALGORITHM = "xxh3"
new_hash = xxhash.xxh3_128  # the digests' hash (see the module doc)


def content_digest(items: Iterable[tuple[ConstantInfo, bytes]], algorithm: str = ALGORITHM) -> str:
    """The version digest from (constant, per-constant digest) pairs: ``"xxh3:<hex>"``
    (``algorithm`` names what the per-constant digests are, e.g. a GPU fingerprint)."""
    h = new_hash()
    for info, digest in sorted(items, key=lambda it: it[0].fqn):
        h.update(_digest_header(info))
        h.update(digest)
    return f"{algorithm}:{h.hexdigest()}"


def file_digest(path: os.PathLike[str] | str) -> str:
    """``"xxh3:<hex>"`` of a file's bytes (a blob version's digest)."""
    h = new_hash()
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return f"{ALGORITHM}:{h.hexdigest()}"


HASH_BLOCK = 4 << 20


def background_priority() -> None:
    """Lowest CPU priority for the calling thread (a pool initializer): weight transfers
    and hashing yield the cores to Runs whenever both want them."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


_hash_pool = cf.ThreadPoolExecutor(
    max_workers=max(1, (os.cpu_count() or 2)),
    thread_name_prefix="aotiserve-hash",
    initializer=background_priority,
)


def _block_hash(view: torch.Tensor, start: int, end: int) -> bytes:
    return new_hash(memoryview(view[start:end].numpy())).digest()


def _combine(block_digests: Iterable[bytes]) -> bytes:
    h = new_hash()
    for d in block_digests:
        h.update(d)
    return h.digest()


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """A constant's tree digest (see the module doc)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    view = codec.byte_view(t.contiguous())
    size = view.numel()
    futures = [
        _hash_pool.submit(_block_hash, view, b, min(size, b + HASH_BLOCK))
        for b in range(0, size, HASH_BLOCK)
    ]
    return _combine(f.result() for f in futures)


def map_digest(constants: Mapping[str, ConstantInfo], tensors: Mapping[str, torch.Tensor]) -> str:
    """The digest of a {fqn: tensor} map (e.g. the packaged weights) of ``constants`` (by FQN)."""
    return content_digest(
        (constants[fqn], tensor_digest(t)) for fqn, t in tensors.items() if fqn in constants
    )


def resolve_constant(model: _Model, name: str) -> ConstantInfo:
    """The updatable constant called ``name`` (original FQN or constant name)."""
    info = model.constants.get(name) or model.constants_by_name.get(name)
    if info is not None:
        return info
    if name.startswith(FOLDED_PREFIX) or name in model.folded_names:
        raise InvalidArgument(
            f"constant {name!r} is computed from other weights at run time "
            "(runtime constant folding) and cannot be set; send the weights it is folded from"
        )
    raise InvalidArgument(
        f"{name!r} is not an updatable constant of model {model.name!r}; if it is a weight of "
        "the original module, the package folded it into code at compile time: recompile with "
        "aot_inductor.use_runtime_constant_folding=True (aotiserve.server.packaging.pack does)"
    )


@dataclass
class _Staged:
    info: ConstantInfo
    tensors: list[torch.Tensor]  # one per replica, on its device
    views: list[torch.Tensor]  # flat uint8 views of tensors
    cpu_index: int | None  # which replica tensor is on the host (for hashing), if any
    intervals: list[tuple[int, int]] = field(default_factory=list)  # sorted, disjoint
    received: int = 0
    block_filled: list[int] = field(default_factory=list)  # bytes received per hash block
    block_hashes: dict[int, cf.Future[bytes]] = field(default_factory=dict)


class StagingUpload:
    """One upload in progress. Call :meth:`add_chunk` per chunk, then :meth:`finish`."""

    def __init__(
        self,
        model: _Model,
        header: UploadHeader,
        max_upload_bytes: int,
        limits: codec.Limits,
        on_bytes: Callable[[int], None] | None = None,
    ):
        self.model = model
        self.header = header
        self.use_inactive = header.use_inactive
        self.validate_full = header.validate_full_updates
        declared: dict[str, tuple[ConstantInfo, str]] = {}
        total = 0
        if not header.constants:
            raise InvalidArgument("the upload header declares no constants")
        for spec in header.constants:
            info = resolve_constant(model, spec.name)
            what = f"constant {spec.name!r}"
            if info.fqn in declared:
                raise InvalidArgument(f"{what} is declared twice in the header")
            dtype = codec.torch_dtype(spec.dtype, what)
            shape = tuple(spec.shape)
            codec.checked_numel(shape, what, limits)
            if dtype != info.dtype:
                raise InvalidArgument(
                    f"{what}: dtype must be {codec.dtype_name(info.dtype)} (as the model's), "
                    f"got {codec.dtype_name(dtype)}"
                )
            if shape != info.shape:
                raise InvalidArgument(
                    f"{what}: shape must be {list(info.shape)} (as the model's), got {list(shape)}"
                )
            declared[info.fqn] = (info, spec.name)
            total += info.nbytes
        if self.validate_full:
            missing = sorted(set(model.constants) - set(declared))
            if missing:
                raise InvalidArgument(
                    "validate_full_updates is set but the upload misses constants: "
                    + ", ".join(missing)
                )
        if total > max_upload_bytes:
            raise ResourceExhausted(
                f"upload of {total} bytes exceeds the limit of {max_upload_bytes} bytes"
            )
        self.total_bytes = total
        self.bytes_received = 0
        self.declared = declared
        # The wire may name a constant by FQN or by constant name: map both.
        self._by_wire_name: dict[str, _Staged] = {}
        self.staged: dict[str, _Staged] = {}
        self._on_bytes = on_bytes
        self._held = 0
        self.in_place = False
        self.pools: list = []  # each replica's device pool, read once by allocate()
        self._written_lock = threading.Lock()

    def allocate(self, targets: list[Mapping[str, torch.Tensor]] | None = None) -> None:
        """Where chunks go: ``targets`` (per replica {fqn: tensor}, e.g. views of the
        inactive buffer, written in place) or new tensors, one per replica, on its device."""
        model = self.model
        # Read once: an unload closing the model meanwhile empties ``model.replicas``
        # (the staging then holds tensors for replicas that are gone, and the commit is
        # refused because the model is no longer ready).
        self.pools = [r.pool for r in model.replicas]
        if not self.pools:  # closed by an unload since the upload began
            raise Unavailable(f"model {model.name!r} is unloading; nothing was staged")
        self.in_place = targets is not None
        if not self.in_place:
            self._held = self.total_bytes * len(self.pools)
            if self._on_bytes:
                self._on_bytes(self._held)
        for fqn, (info, wire_name) in self.declared.items():
            if targets is not None:
                tensors = [t[fqn] for t in targets]
            else:
                tensors = [
                    torch.empty(info.shape, dtype=info.dtype, device=pool.device)
                    for pool in self.pools
                ]
            cpu_index = next((i for i, t in enumerate(tensors) if t.device.type == "cpu"), None)
            st = _Staged(info, tensors, [codec.byte_view(t) for t in tensors], cpu_index)
            st.block_filled = [0] * (-(-info.nbytes // HASH_BLOCK))
            self.staged[fqn] = st
            for key in (fqn, info.name, wire_name):
                self._by_wire_name[key] = st

    def add_chunk(self, name: str, offset: int, data: bytes | memoryview) -> None:
        """Writes ``data``, bytes ``offset``.. of constant ``name``, to every replica."""
        st = self._by_wire_name.get(name)
        what = f"constant {name!r}"
        if st is None:
            raise InvalidArgument(f"chunk for {what}, which the header did not declare")
        n = len(data)
        start = offset
        end = start + n
        size = st.info.nbytes
        if start < 0 or end > size:
            raise InvalidArgument(
                f"{what}: chunk [{start}, {end}) lies beyond the constant's {size} bytes"
            )
        if n == 0:
            return
        i = bisect.bisect_left(st.intervals, (start, end))
        if (i > 0 and st.intervals[i - 1][1] > start) or (
            i < len(st.intervals) and st.intervals[i][0] < end
        ):
            raise InvalidArgument(f"{what}: chunk [{start}, {end}) overlaps bytes already received")
        src = np.frombuffer(data, dtype=np.uint8)
        dev_src = None  # the same bytes as a tensor, for device replicas
        with self._buffers():
            for pool, view in zip(self.pools, st.views):
                if view.device.type == "cpu":
                    # One plain memcpy on this thread: torch's copy_ would split a chunk
                    # over its intra-op threads, whose spinning costs more than the copy.
                    np.copyto(view[start:end].numpy(), src)
                else:
                    if dev_src is None:
                        dev_src = torch.frombuffer(data, dtype=torch.uint8)
                    pool.run_in_stream(
                        lambda v=view, s=dev_src: v[start:end].copy_(s, non_blocking=False)
                    )
        st.intervals.insert(i, (start, end))
        st.received += n
        self.bytes_received += n
        if st.cpu_index is not None:
            self._hash_complete_blocks(st, start, end)

    def written(self, fqn: str, start: int, end: int, block_digests: Mapping[int, bytes]) -> None:
        """Bytes [start, end) of constant ``fqn`` were written into every replica's tensor
        by the caller (a server-side pull), with the digests of the hash blocks (by block
        number) they cover, which must be whole blocks: ``start`` on a block boundary,
        ``end`` on one or at the constant's end. Non-overlapping calls, any order."""
        st = self.staged[fqn]
        with self._written_lock:  # called from several reading threads at once
            i = bisect.bisect_left(st.intervals, (start, end))
            st.intervals.insert(i, (start, end))
            st.received += end - start
            self.bytes_received += end - start
        for b, digest in block_digests.items():
            done: cf.Future[bytes] = cf.Future()
            done.set_result(digest)
            st.block_hashes[b] = done
            st.block_filled[b] = min(st.info.nbytes, (b + 1) * HASH_BLOCK) - b * HASH_BLOCK

    def _buffers(self):
        """In place, the runner's buffer is written: keep the model from closing meanwhile."""
        return self.model.using_buffers() if self.in_place else contextlib.nullcontext()

    def _guarded_block_hash(self, view: torch.Tensor, start: int, end: int) -> bytes:
        with self._buffers():
            return _block_hash(view, start, end)

    def _hash_complete_blocks(self, st: _Staged, start: int, end: int) -> None:
        size = st.info.nbytes
        view = st.views[st.cpu_index]
        for b in range(start // HASH_BLOCK, (end - 1) // HASH_BLOCK + 1):
            lo, hi = b * HASH_BLOCK, min(size, (b + 1) * HASH_BLOCK)
            st.block_filled[b] += min(end, hi) - max(start, lo)
            if st.block_filled[b] == hi - lo:
                st.block_hashes[b] = _hash_pool.submit(self._guarded_block_hash, view, lo, hi)

    def finish(self, digest: str | None = None) -> tuple[dict[str, list[torch.Tensor]], str]:
        """Checks completeness; returns ({fqn: per-replica tensors}, digest). ``digest``
        given (a gpu-direct hand-off fingerprints on the device): no tree hash."""
        for fqn, st in sorted(self.staged.items()):
            if st.received != st.info.nbytes:
                raise InvalidArgument(
                    f"constant {fqn!r}: received {st.received} of {st.info.nbytes} bytes; "
                    "the upload ended early"
                )
        if digest is not None:
            return {fqn: st.tensors for fqn, st in self.staged.items()}, digest
        digests = []
        with self._buffers():
            for st in self.staged.values():
                if st.cpu_index is not None or st.block_hashes:
                    digest = _combine(
                        st.block_hashes[b].result() for b in range(len(st.block_filled))
                    )
                else:
                    digest = tensor_digest(st.tensors[0])  # device-only replicas: a host copy
                digests.append((st.info, digest))
        return {fqn: st.tensors for fqn, st in self.staged.items()}, content_digest(digests)

    def discard(self) -> None:
        """Drops the staging tensors (idempotent)."""
        self.staged.clear()
        self._by_wire_name.clear()
        if self._held and self._on_bytes:
            self._on_bytes(-self._held)
        self._held = 0
