// MPS backend: built only on macOS when torch has MPS.
#include <torch/csrc/inductor/aoti_runner/model_container_runner_mps.h>

#include "runner_bindings.h"

namespace aotiserve {
namespace {

const BackendRegistrar registrar("mps", [](py::module_& m) {
  bind_runner<torch::inductor::AOTIModelContainerRunnerMps>(
      m, "AOTIModelContainerRunnerMps")
      .def(
          py::init<const std::string&, size_t, bool>(),
          py::arg("model_so_path"),
          py::arg("num_models") = 1,
          py::arg("run_single_threaded") = false,
          py::call_guard<py::gil_scoped_release>());
});

}  // namespace
}  // namespace aotiserve
