"""GPU-direct weight hand-off: CUDA tensors of a colocated process (a trainer) copied
device to device into the inactive buffer, with no host round trip.

The client shares each tensor's storage with torch's own CUDA IPC
(``torch.multiprocessing.reductions.reduce_tensor``: a ``cudaIpcMemHandle`` of the
allocation, the storage's offset and size in it, the sender's reference counter and an
event to wait on) and sends those fields in ``LoadWeightsFromCuda``. The server:

1. refuses with FAILED_PRECONDITION, before opening anything, handles from another host
   (boot id), from a GPU that is not one of its own (device UUID, so differing
   ``CUDA_VISIBLE_DEVICES`` numberings do not matter) or that holds no replica of the
   model, and on a server without CUDA;
2. validates the declared names, dtypes and shapes exactly as an upload header, and each
   tensor's strides and offset against the storage size it declares (INVALID_ARGUMENT);
3. claims the inactive buffer, opens each storage once however many tensors it holds
   (``rebuild_cuda_tensor``; a handle that cannot be opened, e.g. freed by a sender that
   exited, is FAILED_PRECONDITION), checks it lies inside the allocation the driver
   mapped (``cuMemGetAddressRange``), copies each tensor into every replica's staging
   tensor on a side stream (into the replica on the sender's GPU with the extension's
   ``copy_fingerprint``, which fingerprints the bytes in the same pass), and
4. synchronizes and drops every opened tensor before answering, so the sender may free
   or overwrite its tensors as soon as the call returns.

A gpu-direct version's digest, ``gpu-fingerprint:<hex>``, is not the content digest of
the bytes (that needs every byte on the host, which is what this path avoids): per
constant it hashes the FQN, dtype, shape and a device-side fingerprint (SHA-256 of the
int64 sums of the constant's 32-bit words, all and even-indexed, and of its bytes past
the last whole word: 24 bytes a constant, computed while the bytes are copied and sent
to the host for all constants in one transfer), and the version's digest is XXH3-128
over those, combined as the content digest is. It tells versions apart; use a file or an
upload where a content digest that other servers recompute is required (fleet rollout
compares them).

The client shares each storage once (views of one allocation, e.g. a trainer's flat
parameter buffer, travel as one handle): opening a handle costs the driver far more
than copying a constant, so fewer allocations hand over faster.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from aotiserve import runner_ext

from . import tensor_codec as codec
from .errors import FailedPrecondition, InvalidArgument
from .model_types import CudaHandoff, CudaIpcTensor, DeclaredConstant, UploadHeader
from .weights import StagingUpload, content_digest

if TYPE_CHECKING:
    from .served_model import ServedModel

log = logging.getLogger(__name__)

BOOT_ID = "/proc/sys/kernel/random/boot_id"
# ListModels metadata of a model with CUDA replicas: where GPU-direct can reach it.
HOST_ID_KEY = "aotiserve.host_id"
CUDA_UUIDS_KEY = "aotiserve.cuda_uuids"


def handoff_metadata(devices: list[torch.device]) -> dict[str, str]:
    """ListModels metadata saying where a client's CUDA tensors can be handed over
    GPU-direct to a model on ``devices`` (nothing for a model off CUDA)."""
    cuda = [d for d in devices if d.type == "cuda"]
    if not cuda:
        return {}
    uuids = ",".join(str(torch.cuda.get_device_properties(d).uuid) for d in cuda)
    return {HOST_ID_KEY: host_id(), CUDA_UUIDS_KEY: uuids}


@functools.cache
def host_id() -> str:
    """This host's identity as CUDA IPC sees it: the kernel's boot id (shared by every
    container of the host)."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


def device_index_of(uuid: str) -> int | None:
    """The local CUDA index of the GPU with ``uuid`` (None: not visible here)."""
    if not torch.cuda.is_available():
        return None
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    return None


def upload_header(request: CudaHandoff) -> UploadHeader:
    return UploadHeader(
        model=request.model,
        use_inactive=True,
        validate_full_updates=request.validate_full_updates,
        constants=tuple(DeclaredConstant(t.name, t.dtype, tuple(t.shape)) for t in request.tensors),
        description=request.description or "gpu-direct",
    )


def check_placement(model: ServedModel, request: CudaHandoff) -> int:
    """Where the handles can be opened: the local device index (FAILED_PRECONDITION with
    the reason otherwise)."""
    here = host_id()
    if not request.host_id or request.host_id != here:
        raise FailedPrecondition(
            f"GPU-direct hand-off needs the sender on this server's host: the tensors are on "
            f"host {request.host_id or '?'}, the server on {here or '?'} (CUDA IPC works only "
            "between processes of one host); send them with UpdateConstantBuffer instead"
        )
    if not torch.cuda.is_available():
        raise FailedPrecondition("GPU-direct hand-off needs CUDA, and this server has none")
    index = device_index_of(request.device_uuid)
    if index is None:
        raise FailedPrecondition(
            f"the tensors are on GPU {request.device_uuid or '?'}, which this server does not "
            "see (not among its CUDA_VISIBLE_DEVICES)"
        )
    device = torch.device("cuda", index)
    if not any(r.pool.device == device for r in model.replicas):
        raise FailedPrecondition(
            f"the tensors are on {device} (GPU {request.device_uuid}), where model "
            f"{model.name!r} has no replica (it is on {', '.join(model.devices)}); "
            "GPU-direct hand-off copies within one GPU"
        )
    return index


def check_extents(request: CudaHandoff) -> None:
    """Each tensor's elements lie inside the storage it declares."""
    for t in request.tensors:
        what = f"tensor {t.name!r}"
        dtype = codec.torch_dtype(t.dtype, what)
        shape, stride = list(t.shape), list(t.stride)
        if len(stride) != len(shape):
            raise InvalidArgument(f"{what}: {len(stride)} strides for {len(shape)} dimensions")
        if t.storage_offset < 0 or t.storage_offset_bytes < 0 or t.storage_size_bytes < 0:
            raise InvalidArgument(f"{what}: negative storage offset or size")
        if any(s < 0 for s in stride):
            raise InvalidArgument(f"{what}: negative stride")
        if 0 in shape:
            continue
        last = t.storage_offset + sum((n - 1) * s for n, s in zip(shape, stride))
        if (last + 1) * dtype.itemsize > t.storage_size_bytes:
            raise InvalidArgument(
                f"{what}: its elements reach byte {(last + 1) * dtype.itemsize} of a storage "
                f"of {t.storage_size_bytes} bytes"
            )
        if not t.storage_handle:
            raise InvalidArgument(f"{what}: no storage handle")


def _storage_key(t: CudaIpcTensor) -> tuple:
    """What identifies one shared reference: tensors with the same key (views of one
    storage the client shared once) are opened once and released once."""
    return (
        bytes(t.storage_handle),
        t.storage_offset_bytes,
        t.storage_size_bytes,
        bytes(t.ref_counter_handle),
        t.ref_counter_offset,
        bytes(t.event_handle),
        t.event_sync_required,
    )


def _open_storage(t: CudaIpcTensor, index: int) -> torch.Tensor:
    """The storage ``t`` declares, opened from its handle, as a flat uint8 tensor."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    try:
        with torch.cuda.device(index):
            return rebuild_cuda_tensor(
                torch.Tensor,
                torch.Size([t.storage_size_bytes]),
                (1,),
                0,
                torch.storage.TypedStorage,
                torch.uint8,
                index,
                bytes(t.storage_handle),
                t.storage_size_bytes,
                t.storage_offset_bytes,
                False,
                bytes(t.ref_counter_handle),
                t.ref_counter_offset,
                bytes(t.event_handle),
                t.event_sync_required,
            )
    except (RuntimeError, OSError, ValueError, TypeError) as exc:
        raise FailedPrecondition(
            f"tensor {t.name!r}: its CUDA IPC handle could not be opened ({exc}); the sending "
            "process may have freed the tensor or exited"
        ) from None


def _view(storage: torch.Tensor, t: CudaIpcTensor) -> torch.Tensor:
    """Tensor ``t`` (its dtype, shape, strides and offset) over an opened storage."""
    dtype = codec.torch_dtype(t.dtype, f"tensor {t.name!r}")
    try:
        return torch.empty(0, dtype=dtype, device=storage.device).set_(
            storage.untyped_storage(), t.storage_offset, tuple(t.shape), tuple(t.stride)
        )
    except RuntimeError as exc:
        raise InvalidArgument(
            f"tensor {t.name!r}: does not fit the storage it declares ({exc})"
        ) from None


@functools.cache
def _cu_mem_get_address_range():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuMemGetAddressRange_v2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_uint64,
    ]
    fn.restype = ctypes.c_int
    return fn


def _check_allocation(tensor: torch.Tensor, t: CudaIpcTensor) -> None:
    """The declared storage lies inside the allocation the handle mapped (a sender that
    declared a larger storage would have the copy read past it)."""
    fn = _cu_mem_get_address_range()
    if fn is None or t.storage_size_bytes == 0:
        return
    ptr = tensor.untyped_storage().data_ptr()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    with torch.cuda.device(tensor.device):
        rc = fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise FailedPrecondition(
            f"tensor {t.name!r}: the driver does not know its memory "
            f"(cuMemGetAddressRange error {rc})"
        )
    if ptr + t.storage_size_bytes > base.value + size.value:
        raise InvalidArgument(
            f"tensor {t.name!r}: its storage of {t.storage_size_bytes} bytes at offset "
            f"{ptr - base.value} overruns the shared allocation of {size.value} bytes"
        )


FINGERPRINT = "gpu-fingerprint"  # the version digest's algorithm name on this path


def fingerprint_into(sums: torch.Tensor, tensor: torch.Tensor) -> None:
    """Adds a contiguous tensor's fingerprint sums (its 32-bit words as int32 at even and
    at odd indices, its bytes past the last whole word as uint8; each summed in int64)
    into ``sums`` (3 int64 on the tensor's device): what the extension's
    ``copy_fingerprint`` computes while it copies."""
    flat = codec.byte_view(tensor)
    n = flat.numel()
    words = flat[: n - n % 4].view(torch.int32)
    sums += torch.stack(
        [
            words[::2].sum(dtype=torch.int64),
            words[1::2].sum(dtype=torch.int64),
            flat[n - n % 4 :].sum(dtype=torch.int64),
        ]
    )


def fingerprint(sums: np.ndarray) -> bytes:
    """A constant's fingerprint from its sums (see the module doc): all words, even-indexed
    words, the tail bytes."""
    even, odd, tail = (np.int64(x) for x in sums)
    with np.errstate(over="ignore"):
        words = np.array([even + odd, even, tail], dtype=np.int64)
    return hashlib.sha256(b"gpu-direct\0" + words.tobytes()).digest()


def _copy_fingerprinted(dst: torch.Tensor, src: torch.Tensor, sums: torch.Tensor) -> None:
    """src into dst (on dst's device, the current stream), its fingerprint into ``sums``:
    in one pass where the extension can (contiguous, 16-byte aligned), else a copy, then
    the sums of what landed."""
    fused = getattr(runner_ext, "copy_fingerprint", None)  # CUDA builds
    if fused is not None and src.is_contiguous() and dst.is_contiguous() and fused(dst, src, sums):
        return
    dst.copy_(src, non_blocking=True)
    fingerprint_into(sums, dst)


def release_unopened(request: CudaHandoff, opened: set[str]) -> None:
    """Gives the sender back the reference torch's sharing counted for each handle this
    server did not open (an opened one is given back when its tensor is dropped): without
    it, the sender's memory would stay reserved for a reader that never comes. Tensors
    that share one reference (one storage shared once) give it back once."""
    released = set()
    for t in request.tensors:
        key = _storage_key(t)
        if t.name in opened or not t.ref_counter_handle or key in released:
            continue
        released.add(key)
        try:
            torch.UntypedStorage._release_ipc_counter_cuda(
                bytes(t.ref_counter_handle), t.ref_counter_offset
            )
        except (RuntimeError, OSError, ValueError, TypeError) as exc:
            log.debug(
                "tensor %r: its sender's reference counter could not be released: %s", t.name, exc
            )


def _copy_to_replicas(
    src: torch.Tensor,
    replicas: list[torch.Tensor],
    device: torch.device,
    sums: torch.Tensor,
    stream_of: Callable[[torch.device], torch.cuda.Stream | None],
    wait: bool,
) -> None:
    """``src`` (on ``device``) into each replica's staging tensor, on that device's side
    stream; the copy on ``device`` adds the fingerprint into ``sums``. ``wait``: the side
    streams first wait for ``device``'s current stream (where the source's storage was
    just opened: the sender's event is waited on there)."""
    local = next(i for i, d in enumerate(replicas) if d.device == device)
    for i, dst in enumerate(replicas):
        stream = stream_of(dst.device)
        if stream is None:  # a CPU replica beside the GPU ones
            dst.copy_(src)
            continue
        if wait:
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            if i == local:
                _copy_fingerprinted(dst, src, sums)
            else:
                dst.copy_(src, non_blocking=True)


def fill(
    staging: StagingUpload,
    request: CudaHandoff,
    index: int,
    is_active: Callable[[], bool],
    opened_names: set[str],
) -> str:
    """Opens, copies and releases every handle; returns the version's digest. The names
    of the tensors whose storage it opened go into ``opened_names``.

    Each storage is opened once, however many tensors it holds. The copy into the
    replica on the sender's GPU fingerprints the bytes as it copies them (one pass; the
    sums of every constant come back in one transfer at the end); other replicas copy
    the same source."""
    model = staging.model
    by_name = {t.name: t for t in request.tensors}
    device = torch.device("cuda", index)
    names_of: dict[tuple, list[str]] = {}
    for t in request.tensors:
        names_of.setdefault(_storage_key(t), []).append(t.name)
    storages: dict[tuple, torch.Tensor] = {}
    streams: dict[torch.device, torch.cuda.Stream | None] = {}
    fqns = list(staging.staged)
    sums = torch.zeros((len(fqns), 3), dtype=torch.int64, device=device)

    def stream_of(dev: torch.device) -> torch.cuda.Stream | None:
        if dev not in streams:
            streams[dev] = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        return streams[dev]

    try:
        with model.using_buffers():
            for row, fqn in enumerate(fqns):
                st = staging.staged[fqn]
                if st.info.nbytes == 0:
                    continue
                t = by_name[staging.declared[fqn][1]]
                key = _storage_key(t)
                storage = storages.get(key)
                opened = storage is None
                if opened:
                    storage = storages[key] = _open_storage(t, index)
                    # Opened: its reference goes back to the sender when it is dropped.
                    opened_names.update(names_of[key])
                    _check_allocation(storage, t)
                src = _view(storage, t)
                _copy_to_replicas(src, st.tensors, device, sums[row], stream_of, opened)
                staging.written(fqn, 0, st.info.nbytes, {})
                if not is_active():
                    break
            stream = stream_of(device)
            torch.cuda.current_stream(device).wait_stream(stream)
            host = sums.cpu().numpy()  # waits for every copy on the sender's GPU
            for other in streams.values():
                if other is not None:
                    other.synchronize()
            digests = [
                (staging.staged[fqn].info, fingerprint(host[row])) for row, fqn in enumerate(fqns)
            ]
    finally:
        # No copy may still read an opened handle when it is closed (on a failure midway
        # copies can be in flight): wait for them, then release every handle before the
        # call returns, so the sender may free its tensors then.
        for stream in streams.values():
            if stream is not None:
                try:
                    stream.synchronize()
                except RuntimeError:
                    log.exception("waiting for the GPU-direct copies failed")
        storages.clear()
        src = storage = None  # noqa: F841 (drops the last opened storage now, not with the frame)
        torch.cuda.ipc_collect()
    return content_digest(digests, FINGERPRINT)
