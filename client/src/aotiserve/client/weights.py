"""Weights in files and across fleets: safetensors push/pull and two-phase rollout.

What the ``aotiserve weights`` commands do, as functions (the CLI only parses
flags and prints). safetensors is an optional extra of the client; torch is
needed only for dtypes numpy lacks (bfloat16, float8).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aotiserve.client.client import Client, ProgressCallback
from aotiserve.client.dtypes import BY_SCALAR_TYPE, BY_TORCH_NAME, DType
from aotiserve.client.errors import ClientError
from aotiserve.client.model_info import WeightsVersion
from aotiserve.client.tensor_codec import UploadItem, is_torch_tensor, to_wire, torch_available

#: safetensors dtype names -> torch names.
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

FOLDED_PREFIX = "_FOLDED_CONST_"


def _numpy_lacks(safetensors_dtype: str) -> bool:
    dtype = BY_TORCH_NAME.get(_SAFETENSORS_DTYPES.get(safetensors_dtype, ""))
    return dtype is not None and dtype.numpy_name is None


class WeightsFileError(ValueError):
    """The weights file cannot be used for this model (unknown keys, dtypes, missing extra)."""


def _safetensors():
    try:
        import safetensors
    except ImportError:
        raise WeightsFileError(
            "reading and writing weights files needs safetensors: "
            "pip install 'aotiserve-client[safetensors]'"
        ) from None
    return safetensors


# ---------------------------------------------------------------- key mapping


@dataclass(frozen=True)
class KeyMapping:
    """File key -> the constant's original FQN (what the runner's update takes)."""

    targets: dict[str, str]
    skipped: tuple[str, ...] = ()  # _FOLDED_CONST_* entries: computed by the server, never uploaded


def map_keys(keys: Sequence[str], names_to_fqns: dict[str, str]) -> KeyMapping:
    """Maps file keys that are original FQNs or constant names onto constants.

    Raises WeightsFileError naming every unknown key, or two keys for one constant.
    """
    by_key: dict[str, str] = {}
    for name, fqn in names_to_fqns.items():
        by_key.setdefault(fqn, fqn)
        by_key.setdefault(name, fqn)
    targets, skipped, unknown = {}, [], []
    seen: dict[str, str] = {}
    for key in keys:
        if key.startswith(FOLDED_PREFIX):
            skipped.append(key)
            continue
        fqn = by_key.get(key)
        if fqn is None:
            unknown.append(key)
            continue
        if fqn in seen:
            raise WeightsFileError(f"keys {seen[fqn]!r} and {key!r} both name constant {fqn!r}")
        seen[fqn] = key
        targets[key] = fqn
    if unknown:
        known = sorted({fqn for fqn in names_to_fqns.values() if not fqn.startswith(FOLDED_PREFIX)})
        raise WeightsFileError(
            f"{len(unknown)} key(s) match no constant of the model: "
            f"{', '.join(sorted(unknown)[:10])}"
            f"{' ...' if len(unknown) > 10 else ''} (the model's weights: {', '.join(known[:20])}"
            f"{' ...' if len(known) > 20 else ''})"
        )
    return KeyMapping(targets, tuple(skipped))


# ---------------------------------------------------------------- safetensors files


def file_upload_items(path: str | os.PathLike, names_to_fqns: dict[str, str]) -> list[UploadItem]:
    """Upload items for the tensors of a safetensors file, read lazily one at a time."""
    safetensors = _safetensors()
    # numpy unless a dtype needs torch: importing torch costs seconds.
    framework = "numpy"
    if not Path(path).is_file():
        raise WeightsFileError(f"{os.fspath(path)!r} is not a file (a .safetensors file is)")
    try:
        with safetensors.safe_open(os.fspath(path), framework="numpy") as f:
            st_dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors' SafetensorError: a truncated or corrupt file
        raise WeightsFileError(
            f"{os.fspath(path)!r} is not a readable safetensors file: {exc}"
        ) from None
    if any(_numpy_lacks(d) for d in st_dtypes) and torch_available():
        framework = "pt"
    # Not closed explicitly: gRPC reads the items on its own thread, which may
    # still be inside get_tensor when a refused upload returns here; the file
    # is closed when the last item is dropped.
    f = safetensors.safe_open(os.fspath(path), framework=framework)
    mapping = map_keys(list(f.keys()), names_to_fqns)
    items = []
    for key, fqn in mapping.targets.items():
        s = f.get_slice(key)
        st_dtype = s.get_dtype()
        torch_name = _SAFETENSORS_DTYPES.get(st_dtype)
        dtype: DType | None = BY_TORCH_NAME.get(torch_name) if torch_name else None
        if dtype is None:
            raise WeightsFileError(f"{key!r}: safetensors dtype {st_dtype} is not supported")
        if dtype.numpy_name is None and framework == "numpy":
            raise WeightsFileError(f"{key!r} is {dtype.torch_name}: install torch to upload it")
        items.append(
            UploadItem(
                fqn,
                dtype,
                tuple(s.get_shape()),
                lambda key=key: to_wire(f.get_tensor(key), f"weight {key!r}"),
            )
        )
    return items


def save_safetensors(
    tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Writes ``tensors`` (numpy or torch) atomically: temp file, fsync, rename."""
    _safetensors()
    path = Path(path)
    if any(is_torch_tensor(v) for v in tensors.values()):
        from safetensors.torch import save

        tensors = {k: v.contiguous() for k, v in tensors.items()}
    else:
        from safetensors.numpy import save
    folder = path.parent or Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist"
        )
    data = save(tensors, metadata=metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- push / pull


def push(
    client: Client,
    model: str,
    path: str | os.PathLike,
    *,
    partial: bool = False,
    swap: bool = True,
    description: str = "",
    chunk_bytes: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[WeightsVersion | None, WeightsVersion | None]:
    """Stages the file's weights in the inactive buffer (validated), then swaps.

    Returns (staged version, version serving after). If the swap fails, the
    staged weights are discarded and the served ones are untouched.
    """
    handle = client.model(model)
    fqns = handle.get_constant_names_to_original_fqns()
    staged = handle.stream_constants(
        file_upload_items(path, fqns),
        use_inactive=True,
        validate_full_updates=not partial,
        description=description or Path(path).name,
        chunk_bytes=chunk_bytes,
        progress=progress,
    )
    if not swap:
        return staged, None
    try:
        active = handle.swap_constant_buffer()
    except ClientError:
        with contextlib.suppress(ClientError):
            handle.free_inactive_constant_buffer()
        raise
    return staged, active


def load(
    client: Client,
    model: str,
    path: str | os.PathLike,
    *,
    partial: bool = True,
    swap: bool = False,
    description: str = "",
) -> tuple[WeightsVersion | None, WeightsVersion | None]:
    """Has the server stage a safetensors file (or sharded folder) from its own disk,
    then optionally swaps. Returns (staged version, version serving after the swap or
    None). If the swap fails, the staged weights are discarded."""
    handle = client.model(model)
    staged = handle.load_weights(path, validate_full_updates=not partial, description=description)
    if not swap:
        return staged, None
    try:
        active = handle.swap_constant_buffer()
    except ClientError:
        with contextlib.suppress(ClientError):
            handle.free_inactive_constant_buffer()
        raise
    return staged, active


def pull(
    client: Client, model: str, path: str | os.PathLike, *, use_inactive: bool = False
) -> tuple[WeightsVersion | None, int]:
    """Downloads the model's weights into a safetensors file. Returns (version, tensor count)."""
    handle = client.model(model)
    info = handle.info()
    # The inactive buffer holds the staged weights, or after a swap the previous ones.
    version = (
        (info.staged_version or info.previous_version) if use_inactive else info.active_version
    )
    # numpy unless a constant needs torch (bfloat16...): importing torch costs seconds.
    codes = handle.get_constant_names_to_dtypes().values()
    needs_torch = any(
        BY_SCALAR_TYPE.get(c) is not None and BY_SCALAR_TYPE[c].numpy_name is None for c in codes
    )
    tensors = handle.extract_constants_map(
        use_inactive, output_format="auto" if needs_torch else "numpy"
    )
    metadata = {"aotiserve.model": model}
    if version is not None:
        metadata["aotiserve.weights_version"] = version.id
        metadata["aotiserve.weights_digest"] = version.digest
    save_safetensors(tensors, path, metadata)
    return version, len(tensors)


# ---------------------------------------------------------------- fleet rollout


def _split_host_port(target: str) -> tuple[str, str]:
    if target.startswith("["):
        host, _, port = target[1:].partition("]:")
        return host, port
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target {target!r} is not host:port")
    return host, port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def resolve_targets(spec: str, resolver: Callable = socket.getaddrinfo) -> list[str]:
    """``a:port,b:port,...`` as given; a single ``name:port`` expanded to every
    address of the name (a Kubernetes headless Service gives one per pod).

    A name is expanded to its IPv4 addresses, or to its IPv6 ones when it has
    none: a dual-stack pod has one of each, and using both would address every
    pod twice.
    """
    entries = list(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))
    if not entries:
        raise ValueError("no targets given")
    for entry in entries:
        _split_host_port(entry)
    if len(entries) > 1:
        return entries
    host, port = _split_host_port(entries[0])
    if _is_ip(host):
        return entries
    try:
        infos = resolver(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {host!r}: {e.strerror}") from None
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET}, key=ipaddress.ip_address)
    v6 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET6}, key=ipaddress.ip_address)
    if v4:
        return [f"{a}:{port}" for a in v4]
    if v6:
        return [f"[{a}]:{port}" for a in v6]
    raise ValueError(f"{host!r} resolved to no addresses")


@dataclass
class TargetOutcome:
    """What happened on one target during a rollout."""

    target: str
    stage: str = "pending"  # ok | failed | skipped
    swap: str = "pending"  # ok | failed | skipped | rolled back | discarded
    version: str = ""  # version serving at the end, when known
    error: str = ""
    staged: WeightsVersion | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, str]:
        return {
            "target": self.target,
            "stage": self.stage,
            "swap": self.swap,
            "version": self.version,
            "error": self.error,
        }


def _error_text(e: BaseException) -> str:
    return str(e) if isinstance(e, (ClientError, WeightsFileError)) else f"{type(e).__name__}: {e}"


def rollout(
    targets: Sequence[str],
    model: str,
    path: str | os.PathLike,
    client_factory: Callable[[str], Client],
    *,
    partial: bool = False,
    description: str = "",
    chunk_bytes: int | None = None,
) -> tuple[bool, list[TargetOutcome]]:
    """Two-phase weights rollout across daemons.

    Phase 1 stages the file on every target at once (inactive buffers,
    validated). Only if every target staged the same content does phase 2
    swap every target. On a staging failure the staged weights are freed
    everywhere and no target changes version; if a swap fails, the targets
    that already swapped are rolled back. Returns (success, outcomes).
    """
    outcomes = [TargetOutcome(t) for t in targets]
    clients = {t: client_factory(t) for t in targets}
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(targets)))) as pool:

            def stage(o: TargetOutcome) -> None:
                try:
                    handle = clients[o.target].model(model)
                    fqns = handle.get_constant_names_to_original_fqns()
                    o.staged = handle.stream_constants(
                        file_upload_items(path, fqns),
                        use_inactive=True,
                        validate_full_updates=not partial,
                        description=description or Path(path).name,
                        chunk_bytes=chunk_bytes,
                    )
                    o.stage = "ok"
                except Exception as e:  # every failure is reported per target
                    o.stage, o.error = "failed", _error_text(e)

            list(pool.map(stage, outcomes))
            digests = {o.staged.digest for o in outcomes if o.stage == "ok" and o.staged}
            if all(o.stage == "ok" for o in outcomes) and len(digests) > 1:
                for o in outcomes:
                    o.error = o.error or "targets staged different content (their digests differ)"
                    o.stage = "failed"

            if not all(o.stage == "ok" for o in outcomes):

                def discard(o: TargetOutcome) -> None:
                    o.swap = "skipped"
                    if o.stage != "ok":
                        return
                    try:
                        clients[o.target].model(model).free_inactive_constant_buffer()
                        o.swap = "discarded"
                    except Exception as e:
                        o.error = f"discarding staged weights failed: {_error_text(e)}"

                list(pool.map(discard, outcomes))
                _fill_versions(outcomes, clients, model, pool)
                return False, outcomes

            def swap(o: TargetOutcome) -> None:
                try:
                    active = clients[o.target].model(model).swap_constant_buffer()
                    o.swap, o.version = "ok", active.id if active else ""
                except Exception as e:
                    o.swap, o.error = "failed", _error_text(e)

            list(pool.map(swap, outcomes))
            if all(o.swap == "ok" for o in outcomes):
                return True, outcomes

            def undo(o: TargetOutcome) -> None:
                handle = clients[o.target].model(model)
                try:
                    if o.swap == "ok":
                        handle.rollback_constant_buffer()
                        o.swap = "rolled back"
                    else:
                        handle.free_inactive_constant_buffer()
                except Exception as e:
                    o.error = (o.error + "; " if o.error else "") + f"undo failed: {_error_text(e)}"

            list(pool.map(undo, outcomes))
            _fill_versions(outcomes, clients, model, pool)
            return False, outcomes
    finally:
        for c in clients.values():
            c.close()


def _fill_versions(outcomes, clients, model, pool) -> None:
    def fill(o: TargetOutcome) -> None:
        try:
            active = clients[o.target].model(model).info().active_version
            o.version = active.id if active else ""
        except Exception:
            o.version = "?"

    list(pool.map(fill, outcomes))
