// Shared binding code for every AOTI backend. Nothing in here knows about a
// particular device: each backend lives in its own source file (cpu.cpp,
// cuda.cpp, xpu.cpp, mps.cpp), which setup.py compiles only when the
// installed torch has that backend, and which registers itself through
// BackendRegistrar.
#pragma once

#include <ATen/DynamicLibrary.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner.h>
#include <torch/extension.h>

#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

namespace aotiserve {

namespace py = pybind11;

using BackendBinder = std::function<void(py::module_&)>;

// Backends register a binder at static-initialisation time; the module init
// runs every registered binder. This keeps device #ifdefs out of shared code.
struct BackendRegistrar {
  BackendRegistrar(const char* name, BackendBinder binder);
};

std::vector<std::pair<std::string, BackendBinder>>& backend_registry();

// Drops the C++ backtrace that c10 appends to error text.
std::string without_backtrace(const std::string& what);

// Adds the runner introspection torch's runner keeps protected: input and
// output counts and names, read straight from the model container. The
// server uses them to reject a wrong input count before it reaches the
// model (which would read past its input array).
template <class Base>
class Runner : public Base {
 public:
  using Base::Base;

  size_t num_inputs() const {
    size_t n = 0;
    check(sym<decltype(&AOTInductorModelContainerGetNumInputs)>(
              "AOTInductorModelContainerGetNumInputs")(
              this->container_handle_, &n),
          "get_num_inputs");
    return n;
  }

  size_t num_outputs() const {
    size_t n = 0;
    check(this->get_num_outputs_func_(this->container_handle_, &n),
          "get_num_outputs");
    return n;
  }

  std::vector<std::string> input_names() const {
    return names(
        num_inputs(),
        sym<decltype(&AOTInductorModelContainerGetInputName)>(
            "AOTInductorModelContainerGetInputName"));
  }

  std::vector<std::string> output_names() const {
    return names(
        num_outputs(),
        sym<decltype(&AOTInductorModelContainerGetOutputName)>(
            "AOTInductorModelContainerGetOutputName"));
  }

  // Runs after checking the input count: the generated model indexes its
  // input array without a bound check.
  std::vector<at::Tensor> checked_run(
      const std::vector<at::Tensor>& inputs,
      void* stream_handle) {
    const size_t expected = num_inputs();
    TORCH_CHECK_VALUE(
        inputs.size() == expected,
        "run: the model takes ",
        expected,
        " input tensor(s), got ",
        inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
      TORCH_CHECK_VALUE(
          inputs[i].defined(), "run: input ", i, " is an undefined tensor");
    }
    return this->run(inputs, stream_handle);
  }

 private:
  template <class Fn>
  Fn sym(const char* name) const {
    return reinterpret_cast<Fn>(this->model_so_->sym(name));
  }

  static void check(AOTIRuntimeError err, const char* what) {
    TORCH_CHECK(err == AOTI_RUNTIME_SUCCESS, "AOTI container call ", what,
                " failed");
  }

  template <class NameFn>
  std::vector<std::string> names(size_t n, NameFn fn) const {
    std::vector<std::string> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const char* name = nullptr;
      check(fn(this->container_handle_, i, &name), "get_io_name");
      out.emplace_back(name ? name : "");
    }
    return out;
  }
};

// torch's binding takes a capsule (void*); users usually hold the stream as an
// int (torch.cuda.Stream.cuda_stream). Accept None, an int, or a capsule.
inline void* stream_pointer(const py::object& handle) {
  if (handle.is_none()) {
    return nullptr;
  }
  if (py::isinstance<py::int_>(handle)) {
    return PyLong_AsVoidPtr(handle.ptr());
  }
  if (py::isinstance<py::capsule>(handle)) {
    return handle.cast<py::capsule>().get_pointer();
  }
  throw py::type_error(
      "run: stream_handle must be None, an int or a capsule, got " +
      std::string(py::str(py::type::handle_of(handle).attr("__name__"))));
}

// Binds the methods shared by every backend, mirroring torch's own binding
// (torch/csrc/inductor/aoti_runner/pybind.cpp) name for name, but releasing
// the GIL for every call that does real work. Backends add constructors.
template <class Base>
py::class_<Runner<Base>> bind_runner(py::module_& m, const char* name) {
  using R = Runner<Base>;
  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<R> cls(m, name, py::module_local());
  cls.def(
         "run",
         [](R& self,
            const std::vector<at::Tensor>& inputs,
            const py::object& stream_handle) {
           void* stream = stream_pointer(stream_handle);
           py::gil_scoped_release no_gil;
           return self.checked_run(inputs, stream);
         },
         py::arg("inputs"),
         py::arg("stream_handle") = py::none())
      .def("get_call_spec", &R::get_call_spec, release())
      .def(
          "get_constant_names_to_original_fqns",
          &R::getConstantNamesToOriginalFQNs,
          release())
      .def(
          "get_constant_names_to_dtypes",
          &R::getConstantNamesToDtypes,
          release())
      .def(
          "extract_constants_map",
          [](const R& self, bool use_inactive) {
            auto map = self.extract_constants_map(use_inactive);
            return std::unordered_map<std::string, at::Tensor>(
                map.begin(), map.end());
          },
          py::arg("use_inactive"),
          release())
      .def(
          "update_constant_buffer",
          static_cast<void (R::*)(
              std::unordered_map<std::string, at::Tensor>&, bool, bool, bool)>(
              &R::update_constant_buffer),
          py::arg("tensor_map"),
          py::arg("use_inactive"),
          py::arg("validate_full_updates"),
          py::arg("user_managed") = false,
          release())
      .def("swap_constant_buffer", &R::swap_constant_buffer, release())
      .def(
          "free_inactive_constant_buffer",
          &R::free_inactive_constant_buffer,
          release())
      .def(
          "update_constant_buffer_from_blob",
          &R::update_constant_buffer_from_blob,
          py::arg("weights_path"),
          release())
      // Extensions beyond torch's binding: container introspection.
      .def("get_num_inputs", &R::num_inputs)
      .def("get_num_outputs", &R::num_outputs)
      .def("get_input_names", &R::input_names)
      .def("get_output_names", &R::output_names);
  return cls;
}

}  // namespace aotiserve
