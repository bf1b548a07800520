// XPU backend: built only when torch was built with XPU support.
#include <torch/csrc/inductor/aoti_runner/model_container_runner_xpu.h>

#include "runner_bindings.h"

namespace aotiserve {
namespace {

const BackendRegistrar registrar("xpu", [](py::module_& m) {
  bind_runner<torch::inductor::AOTIModelContainerRunnerXpu>(
      m, "AOTIModelContainerRunnerXpu")
      .def(
          py::init<const std::string&, size_t, const std::string&,
                   const std::string&, bool>(),
          py::arg("model_so_path"),
          py::arg("num_models") = 1,
          py::arg("device_str") = "xpu",
          py::arg("kernel_bin_dir") = "",
          py::arg("run_single_threaded") = false,
          py::call_guard<py::gil_scoped_release>());
});

}  // namespace
}  // namespace aotiserve
