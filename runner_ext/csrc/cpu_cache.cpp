// A cache of large CPU blocks in front of torch's CPU allocator.
//
// glibc maps every block of 32 MiB or more (its mmap threshold's ceiling) afresh
// and unmaps it on free, so a daemon that receives, computes and returns 64 MiB
// tensors pays page faults and the kernel's zeroing of every page of each one,
// every request: on a VM that is most of the request's CPU time. Blocks at or
// above that size are kept here when freed and handed to the next allocation
// that fits (at most a quarter larger), up to a byte limit. A miss first gives
// every cached block back, so idle cached memory never sits beside a fresh
// allocation: the peak stays what the live tensors need; a block kept unused
// for a while goes back too (trim_idle, called by the daemon's main loop).
// Smaller blocks go to the allocator installed before (glibc's heap already
// reuses them).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <chrono>
#include <map>
#include <mutex>
#include <unordered_map>

#include "runner_bindings.h"

namespace aotiserve {
namespace {

constexpr size_t kRound = size_t{2} << 20;  // huge-page granularity
using Clock = std::chrono::steady_clock;

struct KeptBlock {
  void* ptr;
  Clock::time_point since;
};

class CpuBlockCache final : public c10::Allocator {
 public:
  CpuBlockCache(c10::Allocator* base, size_t min_bytes, size_t max_cached)
      : base_(base), min_bytes_(min_bytes), max_cached_(max_cached) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_) return base_->allocate(n);
    const size_t want = (n + kRound - 1) / kRound * kRound;
    void* ptr = take(want);
    if (ptr == nullptr) {
      ptr = c10::alloc_cpu(want);  // throws on failure
      std::lock_guard<std::mutex> lock(mu_);
      capacity_[ptr] = want;
    }
    return {ptr, ptr, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void set_limit(size_t max_cached) {
    std::lock_guard<std::mutex> lock(mu_);
    max_cached_ = max_cached;
    trim_locked(max_cached);
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mu_);
    trim_locked(0);
  }

  // Gives back the blocks kept unused for longer than idle_s.
  void trim_idle(double idle_s) {
    const auto cutoff = Clock::now() - std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double>(idle_s));
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end();) {
      it = it->second.since < cutoff ? give_back(it) : std::next(it);
    }
  }

  py::dict stats() {
    std::lock_guard<std::mutex> lock(mu_);
    py::dict d;
    d["cached_bytes"] = cached_;
    d["cached_blocks"] = free_.size();
    d["live_blocks"] = capacity_.size() - free_.size();
    d["hits"] = hits_;
    d["misses"] = misses_;
    d["limit_bytes"] = max_cached_;
    d["min_block_bytes"] = min_bytes_;
    return d;
  }

  static CpuBlockCache* instance;

 private:
  // A cached block of capacity in [want, want * 5/4], else nullptr after giving
  // every cached block back.
  void* take(size_t want) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.lower_bound(want);
    if (it != free_.end() && it->first <= want + want / 4) {
      void* ptr = it->second.ptr;
      cached_ -= it->first;
      free_.erase(it);
      ++hits_;
      return ptr;
    }
    ++misses_;
    trim_locked(0);
    return nullptr;
  }

  static void free_block(void* ptr) { instance->release(ptr); }

  void release(void* ptr) {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = capacity_.find(ptr);
    if (it == capacity_.end()) {
      // Not ours: a small block that raw_allocate handed out from the base.
      lock.unlock();
      base_->raw_deleter()(ptr);
      return;
    }
    const size_t cap = it->second;
    if (cached_ + cap <= max_cached_) {
      free_.emplace(cap, KeptBlock{ptr, Clock::now()});
      cached_ += cap;
      return;
    }
    capacity_.erase(it);
    lock.unlock();
    c10::free_cpu(ptr);
  }

  void trim_locked(size_t keep) {
    while (cached_ > keep && !free_.empty()) {
      give_back(std::prev(free_.end()));  // largest first
    }
  }

  std::multimap<size_t, KeptBlock>::iterator give_back(
      std::multimap<size_t, KeptBlock>::iterator it) {
    cached_ -= it->first;
    capacity_.erase(it->second.ptr);
    c10::free_cpu(it->second.ptr);
    return free_.erase(it);
  }

  c10::Allocator* base_;
  const size_t min_bytes_;
  size_t max_cached_;
  std::mutex mu_;
  std::multimap<size_t, KeptBlock> free_;      // capacity -> idle block
  std::unordered_map<void*, size_t> capacity_;  // every block of ours, live or idle
  size_t cached_ = 0;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

CpuBlockCache* CpuBlockCache::instance = nullptr;

}  // namespace

void bind_cpu_cache(py::module_& m) {
  m.def(
      "install_cpu_block_cache",
      [](size_t max_cached_bytes, size_t min_block_bytes) {
        if (CpuBlockCache::instance == nullptr) {
          // Lives for the process: tensors made through it may outlive everything.
          CpuBlockCache::instance =
              new CpuBlockCache(c10::GetCPUAllocator(), min_block_bytes, max_cached_bytes);
          c10::SetCPUAllocator(CpuBlockCache::instance, /*priority=*/1);
        } else {
          CpuBlockCache::instance->set_limit(max_cached_bytes);
        }
      },
      py::arg("max_cached_bytes"), py::arg("min_block_bytes") = size_t{32} << 20,
      "Puts a cache of large CPU blocks in front of torch's CPU allocator (once per process; "
      "later calls only change the limit).");
  m.def("cpu_block_cache_stats", []() -> py::object {
    if (CpuBlockCache::instance == nullptr) return py::none();
    return CpuBlockCache::instance->stats();
  });
  // Giving blocks back unmaps them: no GIL needed, none held.
  m.def(
      "empty_cpu_block_cache",
      []() {
        if (CpuBlockCache::instance != nullptr) CpuBlockCache::instance->empty();
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "trim_cpu_block_cache",
      [](double idle_s) {
        if (CpuBlockCache::instance != nullptr) CpuBlockCache::instance->trim_idle(idle_s);
      },
      py::arg("idle_s"), py::call_guard<py::gil_scoped_release>(),
      "Gives back the kept blocks unused for longer than idle_s seconds.");
}

}  // namespace aotiserve
