"""OIP's system and CUDA shared-memory RPCs (register, status, unregister) over the data
plane's region registry (``shared_memory.SharedMemoryRegions``). Part of ``OipServicer``."""

from __future__ import annotations

from typing import Any


class SharedMemoryRpcs:
    """``inference.GRPCInferenceService``'s ``SystemSharedMemory*`` and ``CudaSharedMemory*``."""

    plane: Any  # dataplane.DataPlane
    pb: Any  # the OIP messages

    def SystemSharedMemoryRegister(self, request, context):
        self.plane.shared_memory.register_system(
            request.name, request.key, request.offset, request.byte_size, context.peer()
        )
        return self.pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryStatus(self, request, context):
        response = self.pb.SystemSharedMemoryStatusResponse()
        for r in self.plane.shared_memory.status("system", request.name):
            response.regions[r.name].CopyFrom(
                response.RegionStatus(
                    name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                )
            )
        return response

    def SystemSharedMemoryUnregister(self, request, context):
        self.plane.shared_memory.unregister("system", request.name)
        return self.pb.SystemSharedMemoryUnregisterResponse()

    def CudaSharedMemoryRegister(self, request, context):
        self.plane.shared_memory.register_cuda(
            request.name, request.raw_handle, request.device_id, request.byte_size, context.peer()
        )
        return self.pb.CudaSharedMemoryRegisterResponse()

    def CudaSharedMemoryStatus(self, request, context):
        response = self.pb.CudaSharedMemoryStatusResponse()
        for r in self.plane.shared_memory.status("cuda", request.name):
            response.regions[r.name].CopyFrom(
                response.RegionStatus(name=r.name, device_id=r.device_id, byte_size=r.byte_size)
            )
        return response

    def CudaSharedMemoryUnregister(self, request, context):
        self.plane.shared_memory.unregister("cuda", request.name)
        return self.pb.CudaSharedMemoryUnregisterResponse()
