// OIP system shared memory: a client's POSIX shared-memory object, mapped read-write
// into the daemon as a uint8 tensor that the port and the Python servicer read inputs
// from and write outputs to in place.
//
// The client keeps its own descriptor and may shrink the object at any time; an access
// past the new end would raise SIGBUS and kill the daemon. Each mapping is therefore
// watched (sigbus.h): a fault maps zero pages over the rest of it and marks it faulted,
// and whoever used the region asks faulted() afterwards and refuses the request. A
// faulted region stays faulted: the client registers it again.
#include <sys/mman.h>
#include <unistd.h>

#include <ATen/ops/from_blob.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

#include "runner_bindings.h"
#include "sigbus.h"

namespace aotiserve {
namespace {

at::Tensor map_shared_memory(int fd, int64_t offset, int64_t length) {
  if (offset < 0 || length <= 0) throw std::invalid_argument("offset must be >= 0 and length > 0");
  const int64_t page = sysconf(_SC_PAGESIZE);
  const size_t lead = size_t(offset % page);
  const size_t mapped = lead + size_t(length);
  void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset - int64_t(lead));
  if (p == MAP_FAILED) throw std::runtime_error(std::string("mmap: ") + std::strerror(errno));
  int slot;
  try {
    slot = sigbus::watch(p, mapped);
  } catch (...) {
    munmap(p, mapped);
    throw;
  }
  auto release = [p, mapped, slot](void*) {
    sigbus::unwatch(slot);
    munmap(p, mapped);
  };
  return at::from_blob(static_cast<char*>(p) + lead, {length}, release,
                       at::TensorOptions().dtype(at::kByte));
}

}  // namespace

void bind_shared_mapping(py::module_& m) {
  m.def("map_shared_memory", &map_shared_memory, py::arg("fd"), py::arg("offset"),
        py::arg("length"),
        "Bytes [offset, offset + length) of shared-memory object `fd`, mapped read-write as a "
        "uint8 tensor (the mapping lives as long as the tensor and its views). If the object "
        "shrinks, accesses past its end read zeros instead of raising SIGBUS, and "
        "shared_memory_faulted() turns true for good.");
  m.def(
      "shared_memory_faulted",
      [](const at::Tensor& t) { return t.numel() > 0 && sigbus::faulted(t.data_ptr()); },
      py::arg("tensor"),
      "Whether `tensor` (a view of a map_shared_memory mapping) lies in a mapping whose object "
      "shrank while mapped.");
}

}  // namespace aotiserve
