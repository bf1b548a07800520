// Shared binding code for every AOTI backend. Nothing in here knows about a
// particular device: each backend lives in its own source file (cpu.cpp,
// cuda.cpp, xpu.cpp, mps.cpp), which setup.py compiles only when the
// installed torch has that backend, and which registers itself through
// BackendRegistrar.
#pragma once

#include <ATen/DynamicLibrary.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cpu.h>
#include <torch/csrc/inductor/aoti_torch/tensor_converter.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/extension.h>

#include "core_spread.h"

#include <dlfcn.h>

#include <atomic>
#include <fstream>
#include <mutex>
#include <optional>
#include <set>
#include <functional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace aotiserve {

namespace py = pybind11;

using BackendBinder = std::function<void(py::module_&)>;

// A runner's checked run on host tensors, as the port's hot path calls it. `slot`
// (0 <= slot < the replica's capacity) is the run's place among the replica's concurrent
// runs: no two runs at once have the same slot, so a backend may keep state per slot
// (cuda.cpp: one stream each).
using RunFn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&, int slot)>;
using SwapFn = std::function<void()>;

// Backends register a binder at static-initialisation time; the module init
// runs every registered binder. This keeps device #ifdefs out of shared code.
struct BackendRegistrar {
  BackendRegistrar(const char* name, BackendBinder binder);
};

std::vector<std::pair<std::string, BackendBinder>>& backend_registry();

// Drops the C++ backtrace that c10 appends to error text.
std::string without_backtrace(const std::string& what);

// Whether the file at `path` (a model's library) holds `word`; read once per file.
bool library_mentions(const std::string& path, const std::string& word);

// cpu_cache.cpp: a cache of large CPU blocks in front of torch's CPU allocator.
void bind_cpu_cache(py::module_& m);

// file_window.cpp: copies out of a read-only file mapping, a truncated file an error.
void bind_file_window(py::module_& m);
void bind_shared_mapping(py::module_& m);

// Adds the runner introspection torch's runner keeps protected: input and
// output counts and names, read straight from the model container. The
// server uses them to reject a wrong input count before it reaches the
// model (which would read past its input array).
template <class Base>
class Runner : public Base {
 public:
  using Base::Base;

  // Looked up once: every run checks its input count against it, and a symbol lookup
  // (dlsym) per run is a measurable share of a tiny model's run.
  size_t num_inputs() const {
    int64_t cached = num_inputs_.load(std::memory_order_relaxed);
    if (cached >= 0) return size_t(cached);
    size_t n = 0;
    check(sym<decltype(&AOTInductorModelContainerGetNumInputs)>(
              "AOTInductorModelContainerGetNumInputs")(
              this->container_handle_, &n),
          "get_num_inputs");
    num_inputs_.store(int64_t(n), std::memory_order_relaxed);
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

  // torch's runner does not check a constant update: an unknown name, a
  // wrong dtype or a wrong shape is written as-is, and a short tensor makes
  // kernels read out of bounds. Check every entry against the live buffer
  // first, so a bad map changes nothing.
  void checked_update_constant_buffer(
      std::unordered_map<std::string, at::Tensor>& tensor_map,
      bool use_inactive,
      bool validate_full_updates,
      bool user_managed) {
    const auto fqns = this->getConstantNamesToOriginalFQNs();
    const auto dtypes = this->getConstantNamesToDtypes();
    const auto live = this->extract_constants_map(/*use_inactive=*/false);
    for (auto& [name, tensor] : tensor_map) {
      auto fqn = fqns.find(name);
      TORCH_CHECK_VALUE(
          fqn != fqns.end(),
          "update_constant_buffer: '", name, "' is not a constant of this model");
      auto current = live.find(fqn->second);
      TORCH_CHECK_VALUE(
          current != live.end(),
          "update_constant_buffer: '", name,
          "' is folded at run time from other constants and cannot be set");
      TORCH_CHECK_VALUE(
          tensor.defined(), "update_constant_buffer: '", name, "' is undefined");
      TORCH_CHECK_VALUE(
          static_cast<int32_t>(tensor.scalar_type()) == dtypes.at(name),
          "update_constant_buffer: '", name, "' must be ",
          current->second.scalar_type(), ", got ", tensor.scalar_type());
      TORCH_CHECK_VALUE(
          tensor.sizes() == current->second.sizes(),
          "update_constant_buffer: '", name, "' must have shape ",
          current->second.sizes(), ", got ", tensor.sizes());
      TORCH_CHECK_VALUE(
          tensor.device() == current->second.device(),
          "update_constant_buffer: '", name, "' must be on ",
          current->second.device(), ", got ", tensor.device());
      TORCH_CHECK_VALUE(
          tensor.strides() == current->second.strides(),
          "update_constant_buffer: '", name, "' must have strides ",
          current->second.strides(), " (make it contiguous), got ",
          tensor.strides());
    }
    // The container copies each tensor's whole storage (not just its
    // elements) into the constant's slot: a view into a larger storage would
    // overrun the buffer. Hand it compact tensors.
    for (auto& entry : tensor_map) {
      at::Tensor& t = entry.second;
      const auto elems = t.numel() * static_cast<int64_t>(t.element_size());
      if (!user_managed &&
          (t.storage_offset() != 0 ||
           static_cast<int64_t>(t.storage().nbytes()) != elems)) {
        t = t.clone();
      }
    }
    if (validate_full_updates) {
      for (const auto& name : updatable_names()) {
        TORCH_CHECK_VALUE(
            tensor_map.count(name) != 0,
            "update_constant_buffer: validate_full_updates is set but the map has no '",
            name, "' (Cannot find constants ", name, " in constants_map)");
      }
    }
    std::lock_guard<std::mutex> lock(buffer_state_mutex_);
    if (use_inactive && !user_managed) {
      // Constants a partial update leaves out are taken from the inactive
      // buffer, which may hold nothing valid (never filled, or freed): the
      // container then reads freed memory. Fill them from the active buffer.
      for (const auto& name : updatable_names()) {
        if (tensor_map.count(name) == 0 && inactive_written_.count(name) == 0) {
          tensor_map.emplace(name, live.at(fqns.at(name)).clone());
        }
      }
    }
    if (user_managed) {
      // The container keeps raw pointers to the tensors it is given; torch's
      // binding hands it the temporary map of one call, which dangles right
      // after. Keep the tensors alive as long as their buffer uses them.
      auto& kept = user_managed_[use_inactive ? 1 : 0];
      torch::inductor::TensorConstantMap pointers;
      for (auto& [name, tensor] : tensor_map) {
        auto& slot = kept[name];
        slot = tensor;
        pointers.emplace(name, &slot);
      }
      std::set<AtenTensorHandle> before;
      if (leaks_user_managed()) {
        for (const auto& entry : raw_constants(use_inactive)) before.insert(entry.second);
      }
      with_last_error("update_constant_buffer", [&] {
        this->update_constant_buffer(
            pointers, use_inactive, validate_full_updates, /*user_managed=*/true);
      });
      if (leaks_user_managed()) {
        for (const auto& entry : raw_constants(use_inactive)) {
          if (before.count(entry.second) == 0) unowned_.insert(entry.second);
        }
      }
    } else {
      with_last_error("update_constant_buffer", [&] {
        this->update_constant_buffer(
            tensor_map, use_inactive, validate_full_updates, false);
      });
      // The buffer now holds its own copies: tensors once handed over for
      // these constants are no longer used.
      auto& kept = user_managed_[use_inactive ? 1 : 0];
      for (const auto& entry : tensor_map) {
        kept.erase(entry.first);
      }
    }
    if (use_inactive) {
      for (const auto& entry : tensor_map) {
        inactive_written_.insert(entry.first);
      }
    }
    release_unheld();
  }

  // torch's container swaps in whatever the inactive buffer holds, even
  // nothing (after free_inactive_constant_buffer, or before any staging),
  // and the model then fails every run with "Unknown constant state". We
  // track which constants the inactive buffer really holds and refuse a swap
  // that would break the model.
  void checked_swap_constant_buffer() {
    std::lock_guard<std::mutex> lock(buffer_state_mutex_);
    for (const auto& name : updatable_names()) {
      TORCH_CHECK(
          inactive_written_.count(name) != 0,
          "swap_constant_buffer: the inactive buffer holds no '", name,
          "'; fill it with update_constant_buffer(..., use_inactive=True) first");
    }
    with_last_error("swap_constant_buffer", [&] { this->swap_constant_buffer(); });
    // The inactive buffer now holds the previous (complete) weights, and it
    // has been active: it may hold constants folded at run time.
    const auto all = updatable_names();
    inactive_written_ = std::set<std::string>(all.begin(), all.end());
    std::swap(slot_holds_folded_[0], slot_holds_folded_[1]);
    std::swap(user_managed_[0], user_managed_[1]);
    slot_holds_folded_[0] = true;  // slot 0 = the active buffer, 1 = inactive
  }

  void checked_run_const_fold(bool use_inactive, AOTInductorStreamHandle stream) {
    std::lock_guard<std::mutex> lock(buffer_state_mutex_);
    with_last_error("run_const_fold", [&] { this->run_const_fold(use_inactive, stream); });
    slot_holds_folded_[use_inactive ? 1 : 0] = true;  // freeing it now would crash later
  }

  // Returns whether memory was released. torch's container frees a buffer by
  // dropping its blob and nulling its run-time folded constants, and any
  // later update of that buffer then dereferences the null entries and
  // crashes. A buffer that was never active holds no folded constants and is
  // freed; one that was active is only invalidated (a swap is refused until
  // it is filled again) and keeps its memory for the next staging.
  bool checked_free_inactive_constant_buffer() {
    std::lock_guard<std::mutex> lock(buffer_state_mutex_);
    inactive_written_.clear();
    user_managed_[1].clear();
    if (slot_holds_folded_[1] && has_folded_constants()) {
      return false;
    }
    with_last_error("free_inactive_constant_buffer", [&] {
      this->free_inactive_constant_buffer();
    });
    release_unheld();
    return true;
  }

  bool has_folded_constants() const {
    size_t count = 0;
    check(sym<decltype(&AOTInductorModelContainerGetNumConstants)>(
              "AOTInductorModelContainerGetNumConstants")(
              this->container_handle_, &count),
          "get_num_constants");
    auto get_folded =
        sym<decltype(&AOTInductorModelContainerGetConstantFromFolded)>(
            "AOTInductorModelContainerGetConstantFromFolded");
    for (size_t i = 0; i < count; ++i) {
      bool folded = false;
      check(get_folded(this->container_handle_, i, &folded), "get_from_folded");
      if (folded) return true;
    }
    return false;
  }

  // The inactive buffer's entries may point at freed memory after
  // free_inactive_constant_buffer; return only what it really holds.
  std::unordered_map<std::string, at::Tensor> checked_extract_constants_map(
      bool use_inactive) const {
    auto map = this->extract_constants_map(use_inactive);
    std::unordered_map<std::string, at::Tensor> out;
    if (!use_inactive) {
      out.insert(map.begin(), map.end());
      return out;
    }
    std::lock_guard<std::mutex> lock(buffer_state_mutex_);
    const auto fqns = this->getConstantNamesToOriginalFQNs();
    for (const auto& name : inactive_written_) {
      auto fqn = fqns.find(name);
      if (fqn == fqns.end()) continue;
      auto it = map.find(fqn->second);
      if (it != map.end()) out.emplace(it->first, it->second);
    }
    return out;
  }

  // Constant names that hold weights (not folded at run time).
  std::vector<std::string> updatable_names() const {
    const auto fqns = this->getConstantNamesToOriginalFQNs();
    const auto live = this->extract_constants_map(/*use_inactive=*/false);
    std::vector<std::string> names;
    for (const auto& [name, fqn] : fqns) {
      if (live.count(fqn) != 0) names.push_back(name);
    }
    return names;
  }

  // Reads a weights blob (the `*_weights.blob` format of packages compiled
  // with package_constants_on_disk_format="binary_blob": the raw bytes of
  // every non-folded constant, in constant order) into name -> tensor on the
  // model's device, checking its size against the model's constants.
  std::unordered_map<std::string, at::Tensor> read_constants_blob(
      const std::string& weights_path) const {
    std::ifstream in(weights_path, std::ios::binary | std::ios::ate);
    TORCH_CHECK_VALUE(
        in.good(), "update_constant_buffer_from_blob: cannot open '",
        weights_path, "'");
    const auto file_size = static_cast<int64_t>(in.tellg());
    in.seekg(0);
    at::Tensor bytes = at::empty({file_size}, at::kByte);
    in.read(reinterpret_cast<char*>(bytes.data_ptr()), file_size);
    TORCH_CHECK(in.good() || file_size == 0,
                "update_constant_buffer_from_blob: reading '", weights_path,
                "' failed");

    const auto fqns = this->getConstantNamesToOriginalFQNs();
    const auto live = this->extract_constants_map(/*use_inactive=*/false);
    size_t count = 0;
    check(sym<decltype(&AOTInductorModelContainerGetNumConstants)>(
              "AOTInductorModelContainerGetNumConstants")(
              this->container_handle_, &count),
          "get_num_constants");
    auto get_name = sym<decltype(&AOTInductorModelContainerGetConstantName)>(
        "AOTInductorModelContainerGetConstantName");
    auto get_folded =
        sym<decltype(&AOTInductorModelContainerGetConstantFromFolded)>(
            "AOTInductorModelContainerGetConstantFromFolded");
    auto get_size =
        sym<decltype(&AOTInductorModelContainerGetConstantDataSize)>(
            "AOTInductorModelContainerGetConstantDataSize");

    std::unordered_map<std::string, at::Tensor> out;
    int64_t offset = 0;
    for (size_t i = 0; i < count; ++i) {
      bool folded = false;
      check(get_folded(this->container_handle_, i, &folded), "get_from_folded");
      if (folded) {
        continue;
      }
      const char* name = nullptr;
      size_t size = 0;
      check(get_name(this->container_handle_, i, &name), "get_constant_name");
      check(get_size(this->container_handle_, i, &size), "get_data_size");
      const auto n = static_cast<int64_t>(size);
      TORCH_CHECK_VALUE(
          offset + n <= file_size, "update_constant_buffer_from_blob: '",
          weights_path, "' has ", file_size,
          " bytes, too few for this model's constants");
      auto current = live.find(fqns.at(name));
      TORCH_CHECK(current != live.end(), "constant '", name, "' not found");
      const at::Tensor& like = current->second;
      // data_size may include alignment padding after the elements.
      const int64_t used = like.numel() * static_cast<int64_t>(like.element_size());
      TORCH_CHECK_VALUE(
          used <= n, "update_constant_buffer_from_blob: constant '", name,
          "' has an unsupported layout");
      out.emplace(
          name,
          bytes.narrow(0, offset, used)
              .view(like.scalar_type())
              .view(like.sizes())
              .to(like.device(), /*non_blocking=*/false, /*copy=*/true));
      offset += n;
    }
    TORCH_CHECK_VALUE(
        offset == file_size, "update_constant_buffer_from_blob: '",
        weights_path, "' has ", file_size, " bytes, this model's constants ",
        offset);
    return out;
  }

  // torch's runner reports a failed container call by file and line only;
  // the model's own message is in AOTInductorGetLastError (same thread).
  template <class Fn>
  auto with_last_error(const char* what, Fn&& fn) -> decltype(fn()) {
    try {
      return fn();
    } catch (const std::exception& e) {
      const char* detail = nullptr;
      // Declared here, not taken from interface.h: torch < 2.13 lacks it.
      using GetLastError = AOTIRuntimeError (*)(const char**);
      GetLastError get = nullptr;
      try {  // models built by an older torch lack it
        get = reinterpret_cast<GetLastError>(
            this->model_so_->sym("AOTInductorGetLastError"));
      } catch (const c10::Error&) {
      }
      if (get != nullptr && get(&detail) == AOTI_RUNTIME_SUCCESS &&
          detail != nullptr && detail[0] != '\0') {
        std::string msg = without_backtrace(detail);
        throw std::runtime_error(std::string(what) + ": " + msg);
      }
      throw;
    }
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
    // torch's run() leaks its input handles when the model refuses the inputs
    // before taking them (a shape guard fails): the container steals each
    // handle, setting it to null, only once its checks pass. So own them here
    // and free whatever was not taken; otherwise every refused request pins
    // its input tensors (and the request bytes under them) for good.
    std::vector<AtenTensorHandle> handles =
        torch::aot_inductor::unsafe_alloc_new_handles_from_tensors(inputs);
    std::optional<RunPlacement> placement;  // a long run on the CPU: a core of its own
    if constexpr (kOnHost) placement.emplace(typical_run_ns_);
    try {
      return with_last_error(
          "run", [&] { return this->run_impl(handles, stream_handle); });
    } catch (...) {
      for (AtenTensorHandle handle : handles) {
        if (handle != nullptr) {
          aoti_torch_delete_tensor_object(handle);
        }
      }
      throw;
    }
  }

  ~Runner() {
    // The container, destroyed after this, never deletes these (see unowned_).
    for (AtenTensorHandle handle : unowned_) aoti_torch_delete_tensor_object(handle);
  }

 private:
  // The handles a buffer holds, by original FQN (constants not folded at run time).
  std::unordered_map<std::string, AtenTensorHandle> raw_constants(bool use_inactive) const {
    std::unordered_map<std::string, AtenTensorHandle> out;
    check(sym<decltype(&AOTInductorModelContainerExtractConstantsMap)>(
              "AOTInductorModelContainerExtractConstantsMap")(
              this->container_handle_, reinterpret_cast<AOTInductorConstantMapHandle>(&out),
              use_inactive),
          "extract_constants_map");
    return out;
  }

  // torch's container (2.13 and earlier: MaybeOwningAtenTensorHandle(handle,
  // user_managed=true)) makes a new handle for each tensor of a user-managed update and
  // never deletes it, so every staging kept its tensors' memory for good (pytorch#194480
  // fixes it by removing that class). Whether this model's container is such a one: its
  // library names the class.
  bool leaks_user_managed() {
    if (leaks_user_managed_ < 0) {
      leaks_user_managed_ = 0;
      Dl_info info{};
      void* fn = reinterpret_cast<void*>(sym<decltype(&AOTInductorModelContainerRun)>(
          "AOTInductorModelContainerRun"));
      if (fn && dladdr(fn, &info) && info.dli_fname) {
        leaks_user_managed_ = library_mentions(info.dli_fname, "MaybeOwningAtenTensorHandle");
      }
    }
    return leaks_user_managed_ == 1;
  }

  // Deletes the handles the container made for user-managed updates (see above) that
  // neither buffer holds any longer: what a later update replaced.
  void release_unheld() {
    if (unowned_.empty()) return;
    std::set<AtenTensorHandle> held;
    for (bool inactive : {false, true}) {
      for (const auto& entry : raw_constants(inactive)) held.insert(entry.second);
    }
    for (auto it = unowned_.begin(); it != unowned_.end();) {
      if (held.count(*it) == 0) {
        aoti_torch_delete_tensor_object(*it);
        it = unowned_.erase(it);
      } else {
        ++it;
      }
    }
  }

  int leaks_user_managed_ = -1;        // -1: not known yet
  std::set<AtenTensorHandle> unowned_;  // made by the container, ours to delete

  static constexpr bool kOnHost =
      std::is_same_v<Base, torch::inductor::AOTIModelContainerRunnerCpu>;
  std::atomic<int64_t> typical_run_ns_{0};  // how long a run takes (RunPlacement keeps it)
  mutable std::atomic<int64_t> num_inputs_{-1};  // the container's input count, once known
  mutable std::mutex buffer_state_mutex_;
  std::set<std::string> inactive_written_;
  // [0] describes the active buffer, [1] the inactive one; swapped on swap.
  // Whether each buffer may hold constants folded at run time: it was active, or it was
  // folded while inactive (run_const_fold).
  bool slot_holds_folded_[2] = {true, false};
  std::unordered_map<std::string, at::Tensor> user_managed_[2];

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

// The hot path's run (port.cpp): host tensors in (views of the request's
// bytes), host tensors out, whatever device the runner computes on. The runner must
// outlive every use: the registry removes the model from the port (which waits for
// its runs) before it closes the runner. A backend whose inputs live elsewhere
// specializes it (cuda.cpp) before it binds its runner.
template <class Base>
RunFn hot_run_fn(Runner<Base>& self, const std::string& /*device*/, bool /*slot_threads*/,
                 int /*spin_us*/) {
  return [&self](const std::vector<at::Tensor>& inputs, int /*slot*/) {
    return self.checked_run(inputs, nullptr);
  };
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
      // For runs shorter than a GIL handoff: releasing the GIL for a few
      // microseconds of compute costs more (a contended reacquire, often a
      // context switch) than the parallelism it buys.
      .def(
          "run_holding_gil",
          [](R& self,
             const std::vector<at::Tensor>& inputs,
             const py::object& stream_handle) {
            return self.checked_run(inputs, stream_pointer(stream_handle));
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
            return self.checked_extract_constants_map(use_inactive);
          },
          py::arg("use_inactive"),
          release())
      .def(
          "update_constant_buffer",
          &R::checked_update_constant_buffer,
          py::arg("tensor_map"),
          py::arg("use_inactive"),
          py::arg("validate_full_updates"),
          py::arg("user_managed") = false,
          release())
      .def(
          "swap_constant_buffer",
          [](R& self) { self.checked_swap_constant_buffer(); },
          release())
      .def(
          "free_inactive_constant_buffer",
          [](R& self) { return self.checked_free_inactive_constant_buffer(); },
          release())
      // Computes the constants a package folds at run time (runtime constant folding)
      // for one buffer now, on `stream_handle`, instead of in the first run after the
      // buffer turns active (which holds every other run back while it folds).
      .def(
          "run_const_fold",
          [](R& self, bool use_inactive, const py::object& stream_handle) {
            void* stream = stream_pointer(stream_handle);
            py::gil_scoped_release no_gil;
            self.checked_run_const_fold(use_inactive,
                                        reinterpret_cast<AOTInductorStreamHandle>(stream));
          },
          py::arg("use_inactive"),
          py::arg("stream_handle") = py::none())
      // torch's container loads a blob into model 0's map only, which no
      // longer is the live buffer once any update happened; read the blob
      // ourselves and apply it as an ordinary (checked) update instead.
      .def(
          "update_constant_buffer_from_blob",
          [](R& self, const std::string& weights_path) {
            if (self.extract_constants_map(false).empty()) {
              // Nothing loaded yet (a package whose weights live outside the
              // .so, just opened): torch's own loading is right here.
              self.with_last_error("update_constant_buffer_from_blob", [&] {
                self.update_constant_buffer_from_blob(weights_path);
              });
              return;
            }
            auto map = self.read_constants_blob(weights_path);
            self.checked_update_constant_buffer(map, false, false, false);
          },
          py::arg("weights_path"),
          release())
      .def(
          "read_constants_blob",
          &R::read_constants_blob,
          py::arg("weights_path"),
          release())
      // Extensions beyond torch's binding: container introspection.
      // For the port's hot path: a capsule of hot_run_fn on `device` (the runner's);
      // `slot_threads`: a GPU runner runs each slot's runs on a thread of the slot's own,
      // handed over with `spin_us` of spinning before either side sleeps (slot_thread.h).
      .def(
          "_hot_run_fn",
          [](R& self, const std::string& device, bool slot_threads, int spin_us) {
            auto* fn = new RunFn(hot_run_fn(self, device, slot_threads, spin_us));
            return py::capsule(fn, "aotiserve.RunFn", [](PyObject* cap) {
              delete static_cast<RunFn*>(PyCapsule_GetPointer(cap, "aotiserve.RunFn"));
            });
          },
          py::arg("device"), py::arg("slot_threads") = false, py::arg("spin_us") = 0)
      // For the port's hot path: a capsule of this runner's buffer swap, which the port
      // makes under its own lock (port.cpp: Port::flip), no GIL held.
      .def("_hot_swap_fn",
           [](R& self) {
             auto* fn = new SwapFn([&self] { self.checked_swap_constant_buffer(); });
             return py::capsule(fn, "aotiserve.SwapFn", [](PyObject* cap) {
               delete static_cast<SwapFn*>(PyCapsule_GetPointer(cap, "aotiserve.SwapFn"));
             });
           })
      .def("get_num_inputs", &R::num_inputs)
      .def("get_num_outputs", &R::num_outputs)
      .def("get_input_names", &R::input_names)
      .def("get_output_names", &R::output_names);
  return cls;
}

}  // namespace aotiserve
