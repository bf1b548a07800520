// CUDA backend: built only when torch was built with CUDA and nvcc is found.
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cuda.h>

#include "runner_bindings.h"

namespace aotiserve {
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
