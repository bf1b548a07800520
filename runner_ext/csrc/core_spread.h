// Core spreading: long CPU runs that overlap each run on a core of their own.
#pragma once

#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdint>

#include <torch/extension.h>

namespace aotiserve {

namespace py = pybind11;

// Around one run on the CPU. Where spreading is on and the run is long (the model's
// typical run, `typical_ns`, at least kMinRunNs) and single-threaded (ATen's intra-op
// threads = 1 on this thread), it counts as a long run in flight on its core; if another
// is in flight already, the calling thread is pinned for the run to the allowed core
// with the fewest long runs in flight (its own core when that is among them), and gets
// its CPU mask back afterwards. While spreading is on, keeps `typical_ns` up to date
// (this model's run time: the latest where it fell, a moving average where it rose).
class RunPlacement {
 public:
  explicit RunPlacement(std::atomic<int64_t>& typical_ns);
  ~RunPlacement();
  RunPlacement(const RunPlacement&) = delete;
  RunPlacement& operator=(const RunPlacement&) = delete;

  // Shorter runs are left where the scheduler puts them: three system calls and a
  // migration would cost more than a run that short loses to a shared core.
  static constexpr int64_t kMinRunNs = 1'000'000;

 private:
  std::atomic<int64_t>& typical_ns_;
  std::chrono::steady_clock::time_point start_{};  // unset: spreading was off
  int counted_ = -1;     // the core this run counts on; -1: not a long run
  bool pinned_ = false;  // to counted_
  cpu_set_t before_;
};

void bind_core_spread(py::module_& m);

}  // namespace aotiserve
