#include "sigbus.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

namespace aotiserve::sigbus {
namespace {

// The jump target of the trapped copy running on this thread, if any.
thread_local sigjmp_buf* t_copy_jump = nullptr;
struct sigaction g_previous;

// Watched ranges: read by the handler without locks (a slot is live while begin != 0;
// end is written before begin is published), written under g_watch_mu.
constexpr int kSlots = 1024;
struct Range {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<bool> faulted{false};
};
Range g_ranges[kSlots];
std::mutex g_watch_mu;

// Maps zero pages over [the faulting page, the range's end): the access that faulted
// and every later one in the range then succeed (reads see zeros, writes go nowhere).
bool patch(uintptr_t addr) {
  for (auto& r : g_ranges) {
    uintptr_t begin = r.begin.load(std::memory_order_acquire);
    if (begin == 0 || addr < begin) continue;
    uintptr_t end = r.end.load(std::memory_order_relaxed);
    if (addr >= end) continue;
    const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
    uintptr_t from = addr & ~(page - 1);
    void* p = mmap(reinterpret_cast<void*>(from), end - from, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) return false;
    r.faulted.store(true, std::memory_order_release);
    return true;
  }
  return false;
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  if (sigjmp_buf* jump = t_copy_jump) {
    t_copy_jump = nullptr;
    siglongjmp(*jump, 1);
  }
  if (info != nullptr && patch(reinterpret_cast<uintptr_t>(info->si_addr))) return;
  if (g_previous.sa_flags & SA_SIGINFO) {
    g_previous.sa_sigaction(sig, info, context);
    return;
  }
  if (g_previous.sa_handler == SIG_IGN) return;
  if (g_previous.sa_handler == SIG_DFL) {
    // The default action (terminate, core dump) for a fault that is not ours.
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
    return;
  }
  g_previous.sa_handler(sig);
}

}  // namespace

void install() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = &on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &g_previous) != 0) {
      throw std::runtime_error(std::string("sigaction(SIGBUS): ") + std::strerror(errno));
    }
  });
}

bool trapped_copy(void* dst, const void* src, size_t n) {
  sigjmp_buf jump;
  if (sigsetjmp(jump, /*savemask=*/1) != 0) {
    return false;  // the handler cleared t_copy_jump
  }
  t_copy_jump = &jump;
  // Keep the compiler from moving the stores across the copy (or dropping the first
  // as dead): the handler reads t_copy_jump in the middle of it.
  std::atomic_signal_fence(std::memory_order_seq_cst);
  std::memcpy(dst, src, n);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_copy_jump = nullptr;
  return true;
}

int watch(void* start, size_t length) {
  install();
  std::lock_guard<std::mutex> lock(g_watch_mu);
  for (int i = 0; i < kSlots; ++i) {
    Range& r = g_ranges[i];
    if (r.begin.load(std::memory_order_relaxed) != 0) continue;
    r.faulted.store(false, std::memory_order_relaxed);
    r.end.store(reinterpret_cast<uintptr_t>(start) + length, std::memory_order_relaxed);
    r.begin.store(reinterpret_cast<uintptr_t>(start), std::memory_order_release);
    return i;
  }
  throw std::runtime_error("too many shared-memory mappings (" + std::to_string(kSlots) + ")");
}

void unwatch(int slot) {
  if (slot < 0 || slot >= kSlots) return;
  std::lock_guard<std::mutex> lock(g_watch_mu);
  g_ranges[slot].begin.store(0, std::memory_order_release);
}

bool faulted(const void* p) {
  auto addr = reinterpret_cast<uintptr_t>(p);
  for (auto& r : g_ranges) {
    uintptr_t begin = r.begin.load(std::memory_order_acquire);
    if (begin != 0 && addr >= begin && addr < r.end.load(std::memory_order_relaxed)) {
      return r.faulted.load(std::memory_order_acquire);
    }
  }
  return false;
}

}  // namespace aotiserve::sigbus
