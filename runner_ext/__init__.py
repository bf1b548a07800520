"""GIL-free bindings of torch's AOTInductor model container runners.

The classes mirror ``torch._C._aoti`` name for name and argument for argument,
but every call that does real work releases the GIL, so threads calling
``run`` on one runner actually run in parallel. :func:`load_package` opens a
``.pt2`` package (or a bare ``.so``) on a chosen device.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from ._build_check import check_torch_matches_build

check_torch_matches_build()

from . import _C  # noqa: E402,F401  (must follow the torch check: ABI)
from ._C import (  # noqa: E402
    alloc_tensor_by_stealing_from_void_ptr,
    alloc_tensors_by_stealing_from_void_ptrs,
    core_spread_stats,
    cpu_block_cache_stats,
    empty_cpu_block_cache,
    install_cpu_block_cache,
    set_core_spread,
    trim_cpu_block_cache,
    unsafe_alloc_void_ptr_from_tensor,
    unsafe_alloc_void_ptrs_from_tensors,
)
from .backends import (  # noqa: E402
    AOTIModelContainerRunnerCpu,
    AOTIModelContainerRunnerCuda,
    AOTIModelContainerRunnerMps,
    AOTIModelContainerRunnerXpu,
    compiled_backends,
    runner_class_for,
)

# The daemon's one port (gRPC C++): server/port.py and server/bridge.py drive it.
PortServer = _C.PortServer
PortStats = _C.PortStats
BridgeCall = _C.BridgeCall
port_set_dtypes = _C.port_set_dtypes
# A cudaIpcMemHandle_t's memory as a uint8 tensor (OIP CUDA shared memory); None without CUDA.
open_cuda_ipc = getattr(_C, "open_cuda_ipc", None)
# A CPU tensor's pages locked for DMA to the GPU (cudaHostRegister); None without CUDA.
pin_host_memory = getattr(_C, "pin_host_memory", None)
FileWindow = _C.FileWindow
FileTruncated = _C.FileTruncated
# OIP system shared memory: a client's object mapped as a uint8 tensor; reads zeros past its
# end if the client shrinks it (no SIGBUS), and shared_memory_faulted() says so.
map_shared_memory = _C.map_shared_memory
shared_memory_faulted = _C.shared_memory_faulted


from .package import (  # noqa: E402
    LoadedModel,
    PackageError,
    list_package_models,
    load_model,
    read_package_metadata,
)

__all__ = [
    "AOTIModelContainerRunnerCpu",
    "AOTIModelContainerRunnerCuda",
    "AOTIModelContainerRunnerMps",
    "AOTIModelContainerRunnerXpu",
    "LoadedModel",
    "BridgeCall",
    "PackageError",
    "PortServer",
    "PortStats",
    "alloc_tensor_by_stealing_from_void_ptr",
    "alloc_tensors_by_stealing_from_void_ptrs",
    "compiled_backends",
    "core_spread_stats",
    "cpu_block_cache_stats",
    "empty_cpu_block_cache",
    "install_cpu_block_cache",
    "list_package_models",
    "load_model",
    "map_shared_memory",
    "open_cuda_ipc",
    "pin_host_memory",
    "port_set_dtypes",
    "read_package_metadata",
    "runner_class_for",
    "set_core_spread",
    "shared_memory_faulted",
    "trim_cpu_block_cache",
    "unsafe_alloc_void_ptr_from_tensor",
    "unsafe_alloc_void_ptrs_from_tensors",
]
