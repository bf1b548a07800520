// Core spreading (core_spread.h).
//
// On a few cores shared with clients, two compute-bound runs in flight at once often
// end up on one core while the other idles: a server thread wakes up on whichever
// core the request's bytes arrived on, and Linux will not move a thread that ran
// there within the last 0.5 ms (sched_migration_cost) to an idle core. With 2 clients
// of a ~7 ms model on 2 cores, 18% of the CPU time stayed idle and the pair ran only
// 1.64x one client. Pinning a long run that starts while another is in flight to the
// core with the fewest runs in flight, for its duration, took idle time to 11-12% and the
// pair to 1.8-1.9x (docs/server.md). A run alone is left where it is: a pin gains it
// nothing and costs it three system calls, and a thread that cannot move while others
// wake on its core.
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

  // Counts a long run starting on core `here`. The first one in flight stays where it
  // is (-1: one run alone gains nothing from a pin); a run that starts beside others gets
  // the allowed core (of `allowed`) with the fewest runs in flight, `here` among equals.
  int take(const cpu_set_t& allowed, int here) {
    std::lock_guard<std::mutex> lock(mu_);
    if (in_flight_ == 0 || CPU_COUNT(&allowed) < 2) {
      ++in_flight_;
      ++on_[here];
      return -1;
    }
    int best = -1;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (!CPU_ISSET(cpu, &allowed)) continue;
      if (best < 0 || on_[cpu] < on_[best] || (on_[cpu] == on_[best] && cpu == here)) {
        best = cpu;
      }
    }
    shared_ += on_[best] > 0;
    moved_ += best != here;
    ++runs_[best];
    ++in_flight_;
    ++on_[best];
    return best;
  }

  void give_back(int cpu) {
    std::lock_guard<std::mutex> lock(mu_);
    --in_flight_;
    --on_[cpu];
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
  int in_flight_ = 0;                      // long runs now
  std::array<int, CPU_SETSIZE> on_{};      // long runs now, by the core each started on or was pinned to
  std::array<uint64_t, CPU_SETSIZE> runs_{};  // runs pinned to each core, ever
  uint64_t moved_ = 0;   // pinned to another core than the one the thread was on
  uint64_t shared_ = 0;  // pinned to a core where another long run was in flight
};

}  // namespace

RunPlacement::RunPlacement(std::atomic<int64_t>& typical_ns) : typical_ns_(typical_ns) {
  CoreSpread& spread = CoreSpread::instance();
  if (!spread.enabled.load(std::memory_order_relaxed)) return;  // not even timed
  start_ = std::chrono::steady_clock::now();
  if (typical_ns_.load(std::memory_order_relaxed) < kMinRunNs || at::get_num_threads() != 1) {
    return;
  }
  // The thread's own mask, read now: a cpuset changed at run time (a container's CPU
  // manager) is followed, and restored exactly.
  if (sched_getaffinity(0, sizeof(before_), &before_) != 0) return;
  const int here = sched_getcpu();
  if (here < 0 || here >= CPU_SETSIZE) return;
  const int pin = spread.take(before_, here);
  counted_ = pin < 0 ? here : pin;
  if (pin < 0) return;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(pin, &one);
  pinned_ = sched_setaffinity(0, sizeof(one), &one) == 0;
}

RunPlacement::~RunPlacement() {
  if (start_ == std::chrono::steady_clock::time_point{}) return;  // spreading was off
  if (pinned_) sched_setaffinity(0, sizeof(before_), &before_);
  if (counted_ >= 0) CoreSpread::instance().give_back(counted_);
  const int64_t took = std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::steady_clock::now() - start_)
                           .count();
  // Down at once, up over about 8 runs: a first run (lazy set-up) or one held up by
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
      "Pins a long single-threaded CPU run that starts while another is in flight, for its "
      "duration, to the allowed core with the fewest such runs (process-wide; off by default).");
  m.def("core_spread_stats", []() -> py::object {
    CoreSpread& spread = CoreSpread::instance();
    if (!spread.enabled.load()) return py::none();
    return spread.stats();
  }, "{'runs': {cpu: runs pinned there}, 'moved': pinned elsewhere than the thread was, "
     "'shared': pinned to a core where another long run was in flight}; None while off.");
}

}  // namespace aotiserve
