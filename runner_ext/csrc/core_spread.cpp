// Core spreading (core_spread.h).
//
// On a few cores shared with clients, two compute-bound runs in flight at once often
// end up on one core while the other idles: a server thread wakes up on whichever
// core the request's bytes arrived on, and Linux will not move a thread that ran
// there within the last 0.5 ms (sched_migration_cost) to an idle core. With 2 clients
// of a ~7 ms model on 2 cores, 18% of the CPU time stayed idle and the pair ran only
// 1.64x one client. Pinning each long run to the core with the fewest pinned runs
// for its duration took idle time to 10% and the pair to 1.88x (docs/server.md).
//
// A pinned thread cannot take an OpenMP team along, so only single-threaded runs
// (ATen's intra-op threads = 1, e.g. OMP_NUM_THREADS=1) are pinned; a run of several
// threads spreads itself. Off until the daemon turns it on (set_core_spread).
#include "core_spread.h"

#include <ATen/Parallel.h>

#include <array>
#include <mutex>

namespace aotiserve {
namespace {

class CoreSpread {
 public:
  static CoreSpread& instance() {
    static CoreSpread* spread = new CoreSpread();  // lives for the process
    return *spread;
  }

  std::atomic<bool> enabled{false};

  // The allowed core (of `allowed`) with the fewest pinned runs, `here` among equals;
  // counted as taken. -1 where fewer than two cores are allowed.
  int take(const cpu_set_t& allowed, int here) {
    std::lock_guard<std::mutex> lock(mu_);
    int best = -1;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (!CPU_ISSET(cpu, &allowed)) continue;
      if (best < 0 || pinned_[cpu] < pinned_[best] ||
          (pinned_[cpu] == pinned_[best] && cpu == here)) {
        best = cpu;
      }
    }
    if (best < 0 || CPU_COUNT(&allowed) < 2) return -1;
    shared_ += pinned_[best] > 0;
    moved_ += best != here;
    ++pinned_[best];
    ++runs_[best];
    return best;
  }

  void give_back(int cpu) {
    std::lock_guard<std::mutex> lock(mu_);
    --pinned_[cpu];
  }

  py::dict stats() {
    std::lock_guard<std::mutex> lock(mu_);
    py::dict runs;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (runs_[cpu]) runs[py::int_(cpu)] = runs_[cpu];
    }
    py::dict out;
    out["runs"] = runs;
    out["moved"] = moved_;
    out["shared"] = shared_;
    return out;
  }

 private:
  std::mutex mu_;
  std::array<int, CPU_SETSIZE> pinned_{};      // runs pinned to each core now
  std::array<uint64_t, CPU_SETSIZE> runs_{};   // runs pinned to each core, ever
  uint64_t moved_ = 0;   // pinned to another core than the one the thread was on
  uint64_t shared_ = 0;  // pinned to a core that already held a pinned run
};

}  // namespace

RunPlacement::RunPlacement(std::atomic<int64_t>& typical_ns)
    : typical_ns_(typical_ns), start_(std::chrono::steady_clock::now()) {
  CoreSpread& spread = CoreSpread::instance();
  if (!spread.enabled.load(std::memory_order_relaxed) ||
      typical_ns_.load(std::memory_order_relaxed) < kMinRunNs || at::get_num_threads() != 1) {
    return;
  }
  // The thread's own mask, read now: a cpuset changed at run time (a container's CPU
  // manager) is followed, and restored exactly.
  if (sched_getaffinity(0, sizeof(before_), &before_) != 0) return;
  int cpu = spread.take(before_, sched_getcpu());
  if (cpu < 0) return;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  if (sched_setaffinity(0, sizeof(one), &one) != 0) {
    spread.give_back(cpu);
    return;
  }
  cpu_ = cpu;
}

RunPlacement::~RunPlacement() {
  if (cpu_ >= 0) {
    sched_setaffinity(0, sizeof(before_), &before_);
    CoreSpread::instance().give_back(cpu_);
  }
  const int64_t took = std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::steady_clock::now() - start_)
                           .count();
  // Down at once, up over about 8 runs: a first run (lazy set-up) or one cut short by
  // other work says little about how long the model computes. Racing updates may drop
  // a sample.
  const int64_t typical = typical_ns_.load(std::memory_order_relaxed);
  typical_ns_.store(typical == 0 || took < typical ? took : typical + (took - typical) / 8,
                    std::memory_order_relaxed);
}

void bind_core_spread(py::module_& m) {
  m.def(
      "set_core_spread",
      [](bool enabled) { CoreSpread::instance().enabled.store(enabled); },
      py::arg("enabled"),
      "Pins each long single-threaded CPU run, for its duration, to the allowed core with "
      "the fewest pinned runs (process-wide; off by default).");
  m.def("core_spread_stats", []() -> py::object {
    CoreSpread& spread = CoreSpread::instance();
    if (!spread.enabled.load()) return py::none();
    return spread.stats();
  }, "{'runs': {cpu: runs pinned there}, 'moved': pinned elsewhere than the thread was, "
     "'shared': pinned beside another pinned run}; None while off.");
}

}  // namespace aotiserve
