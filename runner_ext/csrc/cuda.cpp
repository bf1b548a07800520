// CUDA backend: built only when torch was built with CUDA and nvcc is found.
#include <ATen/ops/from_blob.h>
#include <c10/core/InferenceMode.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cuda.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>

#include "cuda_fingerprint.h"
#include "runner_bindings.h"
#include "slot_thread.h"

namespace aotiserve {

using CudaRunner = Runner<torch::inductor::AOTIModelContainerRunnerCuda>;

constexpr int64_t kPinnedOutputBytes = 64 * 1024;

// The port's hot path on a GPU: each of the replica's run slots has a stream of its own
// (taken from torch's pool at the slot's first run), so concurrent requests copy and
// compute side by side. The caching allocator keeps freed blocks per stream, and the
// warm-up (Port::warm) runs every slot once, so a request finds its stream's memory, and
// the cuBLAS workspace for it, already there. Inputs go host -> device on that stream
// (from the request's bytes; the call returns once CUDA has them), the model runs on it,
// outputs come back into host tensors (pinned from 64 KiB), and one synchronize ends the
// request. With `slot_threads` (--gpu-slot-threads) each slot also has a thread (slot_thread.h),
// and the run is handed to it instead of running on the gRPC thread that received it.
template <>
RunFn hot_run_fn(CudaRunner& self, const std::string& device_str, bool slot_threads,
                 int spin_us) {
  const c10::Device device(device_str);
  TORCH_CHECK_VALUE(device.is_cuda() && device.has_index(),
                    "hot path: '", device_str, "' is not a cuda:N device");
  struct Slot {
    c10::cuda::CUDAStream stream;
    std::unique_ptr<SlotThread> thread;  // null without slot_threads
  };
  struct Slots {
    std::mutex mu;
    std::unordered_map<int, std::shared_ptr<Slot>> by_index;
  };
  auto slots = std::make_shared<Slots>();
  const std::chrono::microseconds spin(std::max(0, spin_us));
  return [&self, device, slots, slot_threads, spin](const std::vector<at::Tensor>& host,
                                                    int index) {
    std::shared_ptr<Slot> slot = [&] {
      std::lock_guard<std::mutex> lock(slots->mu);
      auto& s = slots->by_index[index];
      if (!s) {
        s = std::make_shared<Slot>(
            Slot{c10::cuda::getStreamFromPool(false, device.index()),
                 slot_threads ? std::make_unique<SlotThread>(
                                    [index = device.index()](const std::function<void()>& loop) {
                                      c10::cuda::CUDAGuard on_device(index);
                                      c10::InferenceMode no_autograd;
                                      loop();
                                    },
                                    spin)
                              : nullptr});
      }
      return s;
    }();
    auto run = [&] {
      c10::cuda::CUDAStreamGuard on_stream(slot->stream);
      std::vector<at::Tensor> inputs;
      inputs.reserve(host.size());
      for (const auto& t : host) inputs.push_back(t.to(device, /*non_blocking=*/true));
      std::vector<at::Tensor> outputs = self.checked_run(inputs, slot->stream.stream());
      std::vector<at::Tensor> back;
      back.reserve(outputs.size());
      for (const auto& o : outputs) {
        // Small outputs come back into pageable memory: as fast, and no pinned block of a
        // size not seen yet (cudaHostAlloc, milliseconds) on a request's path.
        bool pinned = o.numel() * int64_t(o.element_size()) >= kPinnedOutputBytes;
        back.push_back(at::empty(o.sizes(), o.options().device(at::kCPU).pinned_memory(pinned)));
        back.back().copy_(o, /*non_blocking=*/pinned);
      }
      slot->stream.synchronize();
      return back;
    };
    return slot->thread ? slot->thread->call(run) : run();
  };
}

namespace {

// The driver's cuMemGetAddressRange (libcuda, already loaded by torch); null if absent.
using AddressRangeFn = int (*)(unsigned long long*, size_t*, unsigned long long);
AddressRangeFn address_range() {
  static AddressRangeFn fn = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    return lib ? reinterpret_cast<AddressRangeFn>(dlsym(lib, "cuMemGetAddressRange_v2")) : nullptr;
  }();
  return fn;
}

const BackendRegistrar registrar("cuda", [](py::module_& m) {
  bind_runner<torch::inductor::AOTIModelContainerRunnerCuda>(
      m, "AOTIModelContainerRunnerCuda")
      .def(
          py::init<const std::string&, size_t, const std::string&,
                   const std::string&, bool>(),
          py::arg("model_so_path"),
          py::arg("num_models") = 1,
          py::arg("device_str") = "cuda",
          py::arg("cubin_dir") = "",
          py::arg("run_single_threaded") = false,
          py::call_guard<py::gil_scoped_release>());
  // OIP CUDA shared memory (server/shared_memory.py): another process's allocation,
  // opened from its cudaIpcMemHandle_t, as a uint8 tensor of `nbytes` on `device`; the
  // handle closes when the last view of the tensor goes.
  m.def(
      "open_cuda_ipc",
      [](const py::bytes& raw, int device, int64_t nbytes) {
        std::string bytes = raw;
        TORCH_CHECK_VALUE(bytes.size() == sizeof(cudaIpcMemHandle_t),
                          "a cudaIpcMemHandle_t has ", sizeof(cudaIpcMemHandle_t),
                          " bytes, got ", bytes.size());
        TORCH_CHECK_VALUE(nbytes > 0, "byte_size must be positive");
        cudaIpcMemHandle_t handle;
        std::memcpy(&handle, bytes.data(), sizeof(handle));
        py::gil_scoped_release no_gil;
        c10::cuda::CUDAGuard on_device(static_cast<c10::DeviceIndex>(device));
        void* ptr = nullptr;
        cudaError_t err = cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess);
        if (err != cudaSuccess) {
          cudaGetLastError();  // clear it: the error is this call's, not the next one's
          TORCH_CHECK_VALUE(false, cudaGetErrorString(err));
        }
        // The region must lie inside the allocation the handle maps (a larger byte_size
        // would let a request fault the GPU, and every model on it with the request).
        if (auto range = address_range()) {
          unsigned long long base = 0;
          size_t size = 0;
          if (range(&base, &size, reinterpret_cast<unsigned long long>(ptr)) == 0 &&
              reinterpret_cast<unsigned long long>(ptr) + uint64_t(nbytes) > base + size) {
            cudaIpcCloseMemHandle(ptr);
            TORCH_CHECK_VALUE(false, "byte_size ", nbytes, " is larger than the shared allocation (",
                              base + size - reinterpret_cast<unsigned long long>(ptr), " bytes)");
          }
        }
        auto close = [device](void* p) {
          c10::cuda::CUDAGuard g(static_cast<c10::DeviceIndex>(device));
          cudaIpcCloseMemHandle(p);
        };
        return at::from_blob(ptr, {nbytes}, close,
                             at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
      },
      py::arg("raw_handle"), py::arg("device"), py::arg("nbytes"));
  // A system shared-memory region read by GPU models (server/shared_memory.py): its pages
  // page-locked (cudaHostRegister), so an input read from it goes to the device by DMA
  // straight from the client's memory, as pinned memory does, instead of through a copy
  // into a pinned buffer per request. Returns a tensor over the same bytes that
  // unregisters them when its last view goes, and only then lets `host` go (its unmap).
  m.def(
      "pin_host_memory",
      [](const at::Tensor& host) {
        TORCH_CHECK_VALUE(host.device().is_cpu() && host.is_contiguous() && host.nbytes() > 0,
                          "pin_host_memory takes a non-empty contiguous CPU tensor");
        void* ptr = host.data_ptr();
        {
          py::gil_scoped_release no_gil;
          cudaError_t err = cudaHostRegister(ptr, host.nbytes(), cudaHostRegisterDefault);
          if (err != cudaSuccess) {
            cudaGetLastError();  // this call's error, not the next one's
            throw std::runtime_error(std::string("cudaHostRegister: ") + cudaGetErrorString(err));
          }
        }
        auto keep = std::make_shared<at::Tensor>(host);
        auto unpin = [keep](void* p) mutable {
          cudaHostUnregister(p);
          cudaGetLastError();
          keep.reset();
        };
        return at::from_blob(ptr, host.sizes(), host.strides(), unpin, host.options());
      },
      py::arg("host"));
  // GPU-direct weight hand-off (server/weights_ipc.py): src's bytes into dst on the current
  // stream, their fingerprint added into `sums` (3 int64 on the same device) in the same
  // pass. False, with nothing queued, when the tensors are not 16-byte aligned (the caller
  // copies and fingerprints with torch instead).
  m.def(
      "copy_fingerprint",
      [](at::Tensor& dst, const at::Tensor& src, at::Tensor& sums) {
        TORCH_CHECK_VALUE(dst.is_cuda() && src.device() == dst.device() &&
                              sums.device() == dst.device(),
                          "copy_fingerprint: dst, src and sums must be on one CUDA device");
        TORCH_CHECK_VALUE(dst.is_contiguous() && src.is_contiguous() &&
                              dst.nbytes() == src.nbytes(),
                          "copy_fingerprint: dst and src must be contiguous, of equal size");
        TORCH_CHECK_VALUE(sums.scalar_type() == at::kLong && sums.is_contiguous() &&
                              sums.numel() == 3,
                          "copy_fingerprint: sums must be 3 contiguous int64");
        if ((reinterpret_cast<uintptr_t>(src.data_ptr()) |
             reinterpret_cast<uintptr_t>(dst.data_ptr())) % 16 != 0) {
          return false;
        }
        py::gil_scoped_release no_gil;
        c10::cuda::CUDAGuard on_device(dst.device());
        int sm_count = 0;
        C10_CUDA_CHECK(
            cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dst.get_device()));
        const char* why = copy_fingerprint(src.data_ptr(), dst.data_ptr(),
                                           static_cast<int64_t>(dst.nbytes()),
                                           sums.data_ptr<int64_t>(), sm_count,
                                           c10::cuda::getCurrentCUDAStream(dst.get_device()));
        TORCH_CHECK(why == nullptr, "copy_fingerprint: ", why);
        return true;
      },
      py::arg("dst"), py::arg("src"), py::arg("sums"));
});

}  // namespace
}  // namespace aotiserve
