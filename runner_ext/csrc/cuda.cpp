// CUDA backend: built only when torch was built with CUDA and nvcc is found.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cuda.h>

#include <unordered_map>

#include "runner_bindings.h"

namespace aotiserve {

using CudaRunner = Runner<torch::inductor::AOTIModelContainerRunnerCuda>;

// The port's hot path on a GPU: each grpc worker thread takes one stream per device
// from torch's pool, once, so concurrent requests copy and compute side by side.
// Inputs go host -> device on that stream (from the request's bytes; the call returns
// once CUDA has them), the model runs on it, outputs come back into pinned host
// tensors, and one synchronize ends the request.
template <>
RunFn hot_run_fn(CudaRunner& self, const std::string& device_str) {
  const c10::Device device(device_str);
  TORCH_CHECK_VALUE(device.is_cuda() && device.has_index(),
                    "hot path: '", device_str, "' is not a cuda:N device");
  return [&self, device](const std::vector<at::Tensor>& host) {
    thread_local std::unordered_map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;
    auto it = streams.find(device.index());
    if (it == streams.end()) {
      it = streams.emplace(device.index(), c10::cuda::getStreamFromPool(false, device.index()))
               .first;
    }
    c10::cuda::CUDAStreamGuard on_stream(it->second);
    std::vector<at::Tensor> inputs;
    inputs.reserve(host.size());
    for (const auto& t : host) inputs.push_back(t.to(device, /*non_blocking=*/true));
    std::vector<at::Tensor> outputs = self.checked_run(inputs, it->second.stream());
    std::vector<at::Tensor> back;
    back.reserve(outputs.size());
    for (const auto& o : outputs) {
      back.push_back(at::empty(o.sizes(), o.options().device(at::kCPU).pinned_memory(true)));
      back.back().copy_(o, /*non_blocking=*/true);
    }
    it->second.synchronize();
    return back;
  };
}

namespace {

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
});

}  // namespace
}  // namespace aotiserve
