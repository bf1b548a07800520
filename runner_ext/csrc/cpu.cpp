// CPU backend: always built.
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cpu.h>

#include "runner_bindings.h"

namespace aotiserve {
namespace {

using Cpu = Runner<torch::inductor::AOTIModelContainerRunnerCpu>;

const BackendRegistrar registrar("cpu", [](py::module_& m) {
  bind_runner<torch::inductor::AOTIModelContainerRunnerCpu>(
      m, "AOTIModelContainerRunnerCpu")
      .def(
          py::init<const std::string&, size_t, bool>(),
          py::arg("model_so_path"),
          py::arg("num_models") = 1,
          py::arg("run_single_threaded") = false,
          py::call_guard<py::gil_scoped_release>());
});

}  // namespace
}  // namespace aotiserve
