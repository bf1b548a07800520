"""Safetensors weights on the server's disk, read with bounds (server-side weight pulls).

A source is one ``.safetensors`` file, or a folder of shards described by
``model.safetensors.index.json`` (``{"weight_map": {key: shard file}}``, the layout
Hugging Face writes). Every header is parsed by :func:`_parse_header` within bounds
(header size, entry count, rank, element count) and checked against the file's size
before anything is allocated, so a truncated or lying file is refused with
INVALID_ARGUMENT naming the key and the file.

Data is copied out of a read-only mapping of the file's window being read
(``runner_ext.FileWindow``: the page cache's pages mapped up front, then one copy
straight into the caller's memory, the staging buffer or a pinned host buffer on the way
to a GPU, with the GIL released). That copy runs at about twice ``preadv``'s speed (the
kernel's per-page lookup and copy-out are gone). A file truncated while it is mapped
would turn the next read of its lost pages into SIGBUS, which kills a process: the copy
runs under a SIGBUS trap instead, and a file that shrank while it was read is refused as
truncated (INVALID_ARGUMENT), as a short read would be. A window is unmapped as soon as
it is copied, so the pages it maps never add up in the daemon's RSS.

Every file is opened once and the path it was opened at is checked below the allowed
roots *after* opening (``/proc/self/fd``), so a symlink swapped in between the check
and the open cannot lead outside them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from aotiserve import runner_ext

from . import tensor_codec as codec
from .errors import InvalidArgument, PermissionDenied

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
# safetensors' own bound on a header (its Rust reader refuses larger ones).
MAX_HEADER_BYTES = 100 << 20
MAX_INDEX_BYTES = 64 << 20

#: safetensors dtype names -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)


class ShardFile:
    """One open safetensors file: its descriptor and where its data starts."""

    def __init__(self, path: Path, fd: int, size: int):
        self.path = path
        self.fd = fd
        self.size = size
        self.data_start = 0

    def window(self, offset: int, length: int, what: str) -> Window:
        """Bytes [offset, offset + length) of the file, mapped until the window closes."""
        return Window(self, offset, length, what)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Window:
    """A read-only mapping of bytes [offset, offset + length) of a shard (see the module
    doc); use it with ``with``."""

    def __init__(self, shard: ShardFile, offset: int, length: int, what: str):
        self._shard, self._offset, self._what = shard, offset, what
        self._map = runner_ext.FileWindow(shard.fd, offset, length)

    def copy_into(self, at: int, dst: memoryview) -> None:
        """Bytes [at, at + len(dst)) of the window into ``dst`` (GIL released)."""
        try:
            self._map.copy_into(at, dst)
        except runner_ext.FileTruncated:
            raise InvalidArgument(
                f"{self._what}: {self._shard.path.name} ended before byte "
                f"{self._offset + at + len(dst)} while it was read (truncated or rewritten "
                "meanwhile)"
            ) from None

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> Window:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Entry:
    """One tensor of a source: its key, dtype, shape and bytes in ``shard``."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: ShardFile
    start: int  # absolute file offset
    nbytes: int

    def window(self, start: int, end: int) -> Window:
        """Bytes [start, end) of this tensor, mapped until the window closes."""
        return self.shard.window(self.start + start, end - start, f"tensor {self.key!r}")


class SafetensorsSource:
    """The entries of a file or of a sharded folder; close it (or use ``with``)."""

    def __init__(self, entries: list[Entry], shards: list[ShardFile], description: str):
        self.entries = entries
        self.shards = shards
        self.description = description

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advise_sequential(self) -> None:
        """Tells the kernel the files are read through once (deeper read-ahead)."""
        for shard in self.shards:
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(shard.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _open_checked(path: Path, check: Callable[[Path], None], what: str) -> tuple[int, int]:
    """Opens ``path`` read-only and checks the file actually opened lies below the roots.
    Opened non-blocking (a named pipe or a device would otherwise block the open until a
    writer came) and refused unless it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InvalidArgument(f"{what}: {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{what}: {str(path)!r} is a folder, not a file") from None
    except OSError as exc:
        raise InvalidArgument(f"{what}: {str(path)!r} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{what}: {str(path)!r} is not a regular file")
        os.set_blocking(fd, True)
        opened = (
            Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists("/proc/self/fd") else path
        )
        check(opened)
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def _read_exact(fd: int, offset: int, n: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise InvalidArgument(
            f"the file ended after {offset + len(data)} bytes while its "
            f"header was read ({offset + n} expected)"
        )
    return data


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise InvalidArgument(f"key {key!r} appears twice")
        out[key] = value
    return out


def _parse_header(shard: ShardFile, limits: codec.Limits, max_entries: int) -> list[Entry]:
    name = shard.path.name
    if shard.size < 8:
        raise InvalidArgument(
            f"{name} is not a safetensors file ({shard.size} bytes, "
            "shorter than the 8-byte header length)"
        )
    n = int.from_bytes(_read_exact(shard.fd, 0, 8), "little")
    if n > MAX_HEADER_BYTES:
        raise InvalidArgument(
            f"{name}: header of {n} bytes exceeds the bound of "
            f"{MAX_HEADER_BYTES} bytes (not a safetensors file?)"
        )
    if 8 + n > shard.size:
        raise InvalidArgument(
            f"{name} is truncated: its header claims {n} bytes but the file "
            f"holds {shard.size - 8} after the length"
        )
    raw = _read_exact(shard.fd, 8, n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{name}: header {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{name}: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{name}: the header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > max_entries:
        raise InvalidArgument(
            f"{name} holds {len(header)} tensors, more than the "
            f"{max_entries} this server takes in one update"
        )
    shard.data_start = 8 + n
    data_size = shard.size - shard.data_start
    entries = []
    for key, spec in header.items():
        what = f"{name}: tensor {key!r}"
        if not isinstance(spec, dict):
            raise InvalidArgument(f"{what}: its header entry is not an object")
        st_dtype = spec.get("dtype")
        dtype = DTYPES.get(st_dtype) if isinstance(st_dtype, str) else None
        if dtype is None:
            raise InvalidArgument(f"{what}: dtype {st_dtype!r} is not supported")
        shape = spec.get("shape")
        offsets = spec.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidArgument(f"{what}: shape {shape!r} is not a list of sizes")
        if len(shape) > limits.max_rank:
            raise InvalidArgument(f"{what}: rank {len(shape)} exceeds {limits.max_rank}")
        numel = codec.checked_numel(tuple(shape), what, limits)
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise InvalidArgument(f"{what}: data_offsets {offsets!r} are not [begin, end]")
        begin, end = offsets
        nbytes = numel * dtype.itemsize
        if end - begin != nbytes:
            raise InvalidArgument(
                f"{what}: data_offsets span {end - begin} bytes but "
                f"{codec.dtype_name(dtype)}{shape} needs {nbytes}"
            )
        if end > data_size:
            raise InvalidArgument(
                f"{name} is truncated: tensor {key!r} needs bytes up to "
                f"{end} of the data but the file holds {data_size}"
            )
        entries.append(Entry(key, dtype, tuple(shape), shard, shard.data_start + begin, nbytes))
    return entries


def open_source(
    path: Path, check: Callable[[Path], None], limits: codec.Limits, max_entries: int
) -> SafetensorsSource:
    """Opens ``path`` (already resolved below a root): a ``.safetensors`` file, a folder
    holding ``model.safetensors.index.json``, or that index file. ``check(path)`` raises
    PermissionDenied for a path outside the roots; it is applied to every file opened."""
    what = "weights path"
    index = None
    if path.is_dir():
        index = path / INDEX_NAME
        if not index.exists():
            raise InvalidArgument(
                f"{what}: folder {str(path)!r} holds no {INDEX_NAME} (give a .safetensors file, "
                "or a folder of shards with their index)"
            )
    elif path.name.endswith(".index.json"):
        index = path
    shards: list[ShardFile] = []
    try:
        if index is None:
            fd, size = _open_checked(path, check, what)
            shard = ShardFile(path, fd, size)
            shards.append(shard)
            entries = _parse_header(shard, limits, max_entries)
            return SafetensorsSource(entries, shards, path.name)
        return _open_sharded(index, check, limits, max_entries, shards)
    except BaseException:
        for shard in shards:
            shard.close()
        raise


def _open_sharded(
    index: Path,
    check: Callable[[Path], None],
    limits: codec.Limits,
    max_entries: int,
    shards: list[ShardFile],
) -> SafetensorsSource:
    fd, size = _open_checked(index, check, "weights index")
    try:
        if size > MAX_INDEX_BYTES:
            raise InvalidArgument(
                f"{index.name}: {size} bytes exceeds the bound of "
                f"{MAX_INDEX_BYTES} bytes for an index"
            )
        raw = _read_exact(fd, 0, size)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicates)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{index.name}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{index.name} is not valid JSON ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidArgument(f'{index.name}: no "weight_map" of key -> shard file')
    if len(weight_map) > max_entries:
        raise InvalidArgument(
            f"{index.name} maps {len(weight_map)} tensors, more than the "
            f"{max_entries} this server takes in one update"
        )
    folder = index.parent
    by_shard: dict[str, list[str]] = {}
    for key, shard_name in weight_map.items():
        by_shard.setdefault(shard_name, []).append(key)
    entries: list[Entry] = []
    for shard_name, keys in by_shard.items():
        if not shard_name or "/" in shard_name or "\\" in shard_name or shard_name in (".", ".."):
            raise InvalidArgument(
                f"{index.name}: shard {shard_name!r} is not a file name in the index's folder"
            )
        shard_path = folder / shard_name
        fd, size = _open_checked(shard_path, check, f"shard {shard_name!r}")
        shard = ShardFile(shard_path, fd, size)
        shards.append(shard)
        found = {e.key: e for e in _parse_header(shard, limits, max_entries)}
        for key in keys:
            entry = found.get(key)
            if entry is None:
                raise InvalidArgument(
                    f"{index.name} maps {key!r} to {shard_name}, which does not hold it"
                )
            entries.append(entry)
    return SafetensorsSource(entries, shards, f"{index.parent.name}/{index.name}")


def windows(nbytes: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) pieces of at most ``size`` bytes covering ``nbytes``."""
    for start in range(0, nbytes, size):
        yield start, min(nbytes, start + size)


def check_below(roots: list[Path]) -> Callable[[Path], None]:
    """A ``check`` for :func:`open_source`: the path must lie below one of ``roots``
    (resolved)."""
    real_roots = [Path(os.path.realpath(r)) for r in roots]

    def check(path: Path) -> None:
        real = Path(os.path.realpath(path))
        if not any(real == r or r in real.parents for r in real_roots):
            raise PermissionDenied(
                f"weights path: {str(path)!r} is not below an allowed root of this server "
                "(configure --allowed-root)"
            )

    return check
