// Module entry point: error translation, torch's four handle helpers, and
// every backend that registered itself at static-initialisation time.
#include <torch/csrc/inductor/aoti_torch/tensor_converter.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

#include "runner_bindings.h"
#include "port.h"
#include "slot_thread.h"

#include <fstream>
#include <map>
#include <mutex>

namespace aotiserve {

std::vector<std::pair<std::string, BackendBinder>>& backend_registry() {
  static std::vector<std::pair<std::string, BackendBinder>> registry;
  return registry;
}

BackendRegistrar::BackendRegistrar(const char* name, BackendBinder binder) {
  backend_registry().emplace_back(name, std::move(binder));
}

std::string without_backtrace(const std::string& what) {
  std::string msg = what.substr(0, what.find("\nException raised from"));
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) {
    msg.pop_back();
  }
  return msg;
}

bool library_mentions(const std::string& path, const std::string& word) {
  static std::mutex mu;
  static std::map<std::string, bool> known;  // by library file: each is read once
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(path);
  if (it != known.end()) return it->second;
  bool found = false;
  std::ifstream file(path, std::ios::binary);
  // In chunks, each overlapping the last by the word's length: the library may hold the
  // model's weights; the name sits near its start (the dynamic symbol table) when it is there.
  std::string window;
  std::vector<char> chunk(size_t{1} << 20);
  while (!found && file.read(chunk.data(), std::streamsize(chunk.size())).gcount() > 0) {
    window.append(chunk.data(), size_t(file.gcount()));
    found = window.find(word) != std::string::npos;
    window.erase(0, window.size() > word.size() ? window.size() - word.size() : 0);
  }
  return known[path] = found;
}

namespace {

void bind_handle_helpers(py::module_& m) {
  namespace aot = torch::aot_inductor;
  m.def(
      "unsafe_alloc_void_ptrs_from_tensors",
      [](const std::vector<at::Tensor>& tensors) {
        std::vector<AtenTensorHandle> handles =
            aot::unsafe_alloc_new_handles_from_tensors(tensors);
        return std::vector<void*>(
            reinterpret_cast<void**>(handles.data()),
            reinterpret_cast<void**>(handles.data()) + handles.size());
      },
      py::arg("tensors"));
  m.def(
      "unsafe_alloc_void_ptr_from_tensor",
      [](at::Tensor& tensor) {
        return reinterpret_cast<void*>(aot::new_tensor_handle(std::move(tensor)));
      },
      py::arg("tensor"));
  m.def(
      "alloc_tensors_by_stealing_from_void_ptrs",
      [](std::vector<void*>& raw_handles) {
        return aot::alloc_tensors_by_stealing_from_handles(
            reinterpret_cast<AtenTensorHandle*>(raw_handles.data()),
            raw_handles.size());
      },
      py::arg("raw_handles"));
  m.def(
      "alloc_tensor_by_stealing_from_void_ptr",
      [](void* raw_handle) {
        return *aot::tensor_handle_to_tensor_pointer(
            reinterpret_cast<AtenTensorHandle>(raw_handle));
      },
      py::arg("raw_handle"));
}

}  // namespace

}  // namespace aotiserve

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  m.doc() = "GIL-free bindings of torch's AOTInductor model container runners";

  // Turn on AOTInductor's own input guards (dtype, shape, dynamic-dim bounds,
  // strides, device), which generated models skip unless this variable is
  // set: without them a mis-shaped input makes kernels read out of bounds.
  // An explicit setting by the user wins (overwrite = 0).
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);

  // c10::Error carries a C++ backtrace in what(); users want torch's message.
  // Value errors (bad input count) become ValueError, as in torch.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const py::error_already_set&) {
      throw;
    } catch (const py::builtin_exception&) {
      throw;
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    } catch (const std::exception& e) {
      // The runner rethrows model errors as std::runtime_error whose text
      // embeds a c10 backtrace; keep the message, drop the backtrace.
      PyErr_SetString(PyExc_RuntimeError, aotiserve::without_backtrace(e.what()).c_str());
    }
  });

  py::list built;
  for (auto& [name, bind] : aotiserve::backend_registry()) {
    bind(m);
    built.append(name);
  }
  m.attr("_compiled_backends") = py::tuple(built);
  m.attr("_torch_version") = AOTISERVE_TORCH_VERSION;
  aotiserve::bind_handle_helpers(m);
  aotiserve::bind_cpu_cache(m);
  aotiserve::bind_file_window(m);
  aotiserve::bind_shared_mapping(m);
  aotiserve::bind_core_spread(m);
  aotiserve::bind_slot_thread(m);
  aotiserve::bind_port(m);
}
