"""Server-side weight pulls: a safetensors file (or sharded folder) on the server's disk
into the inactive buffer, validated and hashed exactly as an upload is.

The file's header becomes an upload header (``weights.StagingUpload`` validates names or
FQNs, dtypes, shapes, full or partial, before anything is touched), the inactive buffer
is claimed as for an upload (written in place), and the tensors' bytes are read straight
into it:

- CPU replica: copied from a mapping of the file (``safetensors_source.Window``) into
  the buffer's own memory, in windows of ``WINDOW`` bytes on a pool of
  background-priority threads (one per core), each 1 MiB piece hashed (the version's
  tree hash) right after it is copied;
- CUDA replicas only: each window is read into one of a few pinned host buffers (each
  1 MiB piece hashed right after it is copied, as above), then copied to every replica's
  device on a side stream (``non_blocking``); a pinned buffer is reused once its copies
  completed, so reads, hashing and host-to-device copies of different windows overlap
  (one buffer per core).

Every byte is hashed on the host (XXH3-128, the version's digest; see ``weights``), 1 MiB
at a time right after it is copied, while it is in the CPU's cache.

A failure anywhere (a bad header, a short read, a cancelled call) discards the staging:
nothing that serves changes.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import tensor_codec as codec
from .errors import Cancelled, InvalidArgument
from .model_types import DeclaredConstant, UploadHeader
from .safetensors_source import Entry, SafetensorsSource, windows
from .weights import (
    FOLDED_PREFIX,
    HASH_BLOCK,
    StagingUpload,
    background_priority,
    new_hash,
)

if TYPE_CHECKING:
    from .served_model import ServedModel

log = logging.getLogger(__name__)

# Bytes read per task (one mapping each): whole hash blocks (so each task hashes what
# it read), large enough that a task's overhead (the mapping too) is nothing against its
# copy, small enough that 1 GiB spreads over every core and the mapped pages stay few.
WINDOW = 4 * HASH_BLOCK
# Pinned host buffers on the way to a GPU, each of CUDA_WINDOW bytes, one per reading
# thread: a buffer is busy while it is read into, copied to the device and hashed (the
# host side's work, overlapping the copies), so every core works on one.
CUDA_WINDOW = 4 * HASH_BLOCK
# Bytes read, then hashed, at a time on a CPU replica: small enough to stay in the cache
# between the two (measured: +15% over reading a window, then hashing it).
READ_PIECE = 1 << 20
PINNED_BUFFERS = max(2, os.cpu_count() or 2)

_pool = cf.ThreadPoolExecutor(
    max_workers=max(2, os.cpu_count() or 2),
    thread_name_prefix="aotiserve-pull",
    initializer=background_priority,
)


def upload_header(
    model_name: str, source: SafetensorsSource, validate_full: bool, description: str
) -> tuple[UploadHeader, dict[str, Entry]]:
    """The upload header a file's tensors make (``_FOLDED_CONST_*`` keys are skipped, as
    the client's push skips them), and the entries by key."""
    specs, by_key, skipped = [], {}, []
    for entry in source.entries:
        if entry.key.startswith(FOLDED_PREFIX):
            skipped.append(entry.key)
            continue
        specs.append(DeclaredConstant(entry.key, codec.wire_dtype(entry.dtype), tuple(entry.shape)))
        by_key[entry.key] = entry
    if not specs:
        more = ", ..." if len(skipped) > 3 else ""
        why = (
            f"only folded constants ({', '.join(skipped[:3])}{more}), which are computed "
            "from the weights, never loaded"
            if skipped
            else "no tensors"
        )
        raise InvalidArgument(f"{source.description}: the file holds {why}")
    header = UploadHeader(
        model=model_name,
        use_inactive=True,
        validate_full_updates=validate_full,
        constants=tuple(specs),
        description=description or source.description,
    )
    return header, by_key


class _PinnedSlot:
    """A pinned host buffer and, per device, the stream its copies go on."""

    def __init__(self, nbytes: int):
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.events: list[torch.cuda.Event] = []

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        s = self.streams.get(device)
        if s is None:
            s = self.streams[device] = torch.cuda.Stream(device=device)
        return s

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()
        self.events = []


def fill(staging: StagingUpload, entries: dict[str, Entry], is_active: Callable[[], bool]) -> None:
    """Reads every declared constant from its entry into the staging tensors (the
    inactive buffer), hashing as it goes; raises on the first failure (the caller
    discards the staging). ``is_active()`` false (the call was cancelled) stops it."""
    model = staging.model
    by_fqn = {fqn: entries[wire_name] for fqn, (_info, wire_name) in staging.declared.items()}
    first = next(iter(staging.staged.values()), None)
    if first is None:
        return
    host_side = first.cpu_index is not None
    slots: queue.Queue[_PinnedSlot] | None = None
    if not host_side:
        slots = queue.Queue()
        for _ in range(PINNED_BUFFERS):
            slots.put(_PinnedSlot(CUDA_WINDOW))
    window = WINDOW if host_side else CUDA_WINDOW
    tasks = []
    for fqn, st in staging.staged.items():
        for start, end in windows(st.info.nbytes, window):
            tasks.append((fqn, start, end))
    # Largest first would balance better, but file order reads the disk sequentially.
    stop = threading.Event()

    def one(fqn: str, start: int, end: int) -> None:
        if stop.is_set():
            return
        if not is_active():
            stop.set()
            raise Cancelled("the call was cancelled; nothing was staged")
        st = staging.staged[fqn]
        entry = by_fqn[fqn]
        with model.using_buffers():
            if host_side:
                digests = _fill_host(st, entry, start, end, model)
            else:
                digests = _fill_devices(st, entry, start, end, slots)
        staging.written(fqn, start, end, digests)

    futures = [_pool.submit(one, *t) for t in tasks]
    try:
        for f in cf.as_completed(futures):
            f.result()
    except BaseException:
        stop.set()
        for f in futures:
            f.cancel()
        cf.wait(futures)  # nothing may write the buffer once the caller discards it
        raise


def _read_hashing(entry: Entry, host: torch.Tensor, start: int, end: int) -> dict[int, bytes]:
    """Reads bytes [start, end) of ``entry`` into ``host`` (flat uint8, exactly those
    bytes; ``start`` on a hash block boundary) and returns the digests of the hash blocks
    they cover, each piece hashed right after it is copied, while it is still in the CPU's
    cache (hashing a whole window after copying it reads it back from memory)."""
    dst = memoryview(host.numpy())
    digests = {}
    with entry.window(start, end) as window:
        for lo in range(0, end - start, HASH_BLOCK):
            hi = min(end - start, lo + HASH_BLOCK)
            h = new_hash()
            for p in range(lo, hi, READ_PIECE):
                piece = dst[p : min(hi, p + READ_PIECE)]
                window.copy_into(p, piece)
                h.update(piece)
            digests[(start + lo) // HASH_BLOCK] = h.digest()
    return digests


def _fill_host(st, entry: Entry, start: int, end: int, model: ServedModel) -> dict[int, bytes]:
    host = st.views[st.cpu_index][start:end]
    digests = _read_hashing(entry, host, start, end)
    src = None
    for i, (replica, view) in enumerate(zip(model.replicas, st.views)):
        if i == st.cpu_index:
            continue
        if view.device.type == "cpu":
            np.copyto(view[start:end].numpy(), host.numpy())
        else:  # a CPU replica beside device ones: copy the host bytes over
            src = host if src is None else src
            replica.pool.run_in_stream(lambda v=view, s=src: v[start:end].copy_(s))
    return digests


def _fill_devices(
    st, entry: Entry, start: int, end: int, slots: queue.Queue[_PinnedSlot]
) -> dict[int, bytes]:
    slot = slots.get()
    try:
        host = slot.host[: end - start]
        digests = _read_hashing(entry, host, start, end)
        for view in st.views:
            stream = slot.stream(view.device)
            with torch.cuda.stream(stream):
                view[start:end].copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            slot.events.append(event)
        slot.wait()
        return digests
    except BaseException:
        with contextlib.suppress(Exception):
            slot.wait()
        raise
    finally:
        slots.put(slot)
