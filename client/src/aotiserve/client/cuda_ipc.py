"""GPU-direct hand-off, the client's side: CUDA tensors shared with torch's own CUDA IPC.

``share(tensor_map)`` turns CUDA tensors into ``CudaIpcTensor`` messages (the fields of
``torch.multiprocessing.reductions.reduce_tensor``); the daemon opens the handles, copies
device to device into its inactive buffer and releases them before it answers, so the
tensors only need to stay alive (and unchanged) for the duration of the call. Needs torch
with CUDA; imported only when CUDA tensors are handed over.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aotiserve.client.dtypes import BY_TORCH_NAME
from aotiserve.v1 import model_runner_pb2 as pb

BOOT_ID = "/proc/sys/kernel/random/boot_id"


def host_id() -> str:
    """This host's identity as CUDA IPC sees it (the kernel's boot id)."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


def all_cuda(tensor_map: Mapping[str, Any]) -> bool:
    """Whether every value is a torch CUDA tensor, all on one device."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not tensor_map:
        return False
    devices = set()
    for value in tensor_map.values():
        if not isinstance(value, torch.Tensor) or value.device.type != "cuda":
            return False
        devices.add(value.device)
    return len(devices) == 1


def why_not_shareable(tensor_map: Mapping[str, Any]) -> str | None:
    """None when ``tensor_map`` can be handed over; else the reason."""
    if not tensor_map:
        return "no tensors"
    if not all_cuda(tensor_map):
        return "GPU-direct hand-off takes torch CUDA tensors, all on one device"
    return None


HOST_ID_KEY = "aotiserve.host_id"
CUDA_UUIDS_KEY = "aotiserve.cuda_uuids"


def reachable(metadata: Mapping[str, str], tensor_map: Mapping[str, Any]) -> bool:
    """Whether a daemon whose model has this ListModels ``metadata`` can take
    ``tensor_map`` GPU-direct: it runs on this host and has a replica on their GPU."""
    import torch

    if metadata.get(HOST_ID_KEY, "") != host_id() or not host_id():
        return False
    device = next(iter(tensor_map.values())).device
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid in metadata.get(CUDA_UUIDS_KEY, "").split(",")


def share(
    model: str, tensor_map: Mapping[str, Any], *, validate_full_updates: bool, description: str = ""
) -> pb.LoadWeightsFromCudaRequest:
    """The ``LoadWeightsFromCuda`` request handing over ``tensor_map`` (CUDA tensors)."""
    import torch

    why = why_not_shareable(tensor_map)
    if why is not None:
        raise ValueError(why)
    device = next(iter(tensor_map.values())).device
    request = pb.LoadWeightsFromCudaRequest(
        model=model,
        host_id=host_id(),
        device_uuid=str(torch.cuda.get_device_properties(device).uuid),
        validate_full_updates=validate_full_updates,
        description=description,
    )
    # One share per storage: torch's sharing gives each call its own reference counter
    # and event, and the daemon opens each storage once, so views of one allocation (a
    # flat parameter buffer) travel as one handle.
    shared: dict[int, dict] = {}
    for name, tensor in tensor_map.items():
        dtype = BY_TORCH_NAME.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"weight {name!r}: dtype {tensor.dtype} cannot be sent")
        tensor = tensor.detach()
        at = tensor.untyped_storage().data_ptr()
        storage = shared.get(at)
        if storage is None:
            storage = shared[at] = _share_storage(name, tensor)
        request.tensors.append(
            pb.CudaIpcTensor(
                name=str(name),
                dtype=dtype.wire,
                shape=list(tensor.shape),
                stride=list(tensor.stride()),
                storage_offset=tensor.storage_offset(),
                **storage,
            )
        )
    return request


def _share_storage(name: str, tensor: Any) -> dict:
    """The ``CudaIpcTensor`` fields of ``tensor``'s storage (torch's CUDA IPC sharing)."""
    from torch.multiprocessing.reductions import reduce_tensor

    try:
        _rebuild, args = reduce_tensor(tensor)
    except RuntimeError as exc:  # e.g. memory from an allocator CUDA IPC cannot share
        raise ValueError(f"weight {name!r} cannot be shared by CUDA IPC: {exc}") from None
    handle, size, offset, _grad, ref_handle, ref_offset, event_handle, event_sync = args[7:]
    return {
        "storage_handle": handle or b"",
        "storage_size_bytes": size,
        "storage_offset_bytes": offset,
        "ref_counter_handle": ref_handle or b"",
        "ref_counter_offset": ref_offset or 0,
        "event_handle": event_handle or b"",
        "event_sync_required": bool(event_sync),
    }
