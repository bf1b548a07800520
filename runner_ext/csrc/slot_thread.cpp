#include "slot_thread.h"

#include <tuple>
#include <utility>

namespace aotiserve {

namespace {

// Until `ready()` or `spin` has passed; whether it is ready.
template <class Ready>
bool spin_until(Ready ready, std::chrono::microseconds spin) {
  if (spin.count() <= 0) return ready();
  const auto until = std::chrono::steady_clock::now() + spin;
  for (int i = 0;; ++i) {
    if (ready()) return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
    if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) return ready();
  }
}

}  // namespace

SlotThread::SlotThread(Around around, std::chrono::microseconds spin)
    : spin_(spin), thread_([this, around = std::move(around)] { around([this] { loop(); }); }) {}

SlotThread::~SlotThread() {
  stop_.store(true, std::memory_order_release);
  { std::lock_guard<std::mutex> lock(mu_); }  // a thread about to sleep sees it
  wake_.notify_one();
  thread_.join();
}

std::vector<at::Tensor> SlotThread::call(const Task& task) {
  std::lock_guard<std::mutex> one_caller(call_mu_);
  finished_.store(false, std::memory_order_relaxed);
  task_.store(&task, std::memory_order_release);
  { std::lock_guard<std::mutex> lock(mu_); }  // a thread about to sleep sees the task
  wake_.notify_one();
  auto finished = [this] { return finished_.load(std::memory_order_acquire); };
  if (!spin_until(finished, std::min(spin_, kCallerSpin))) {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, finished);
  }
  std::vector<at::Tensor> result = std::move(result_);
  result_.clear();
  std::exception_ptr error = std::exchange(error_, nullptr);
  if (error) std::rethrow_exception(error);
  return result;
}

void SlotThread::loop() {
  auto asked = [this] {
    return task_.load(std::memory_order_acquire) != nullptr ||
           stop_.load(std::memory_order_acquire);
  };
  for (;;) {
    if (!spin_until(asked, spin_)) {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, asked);
    }
    const Task* task = task_.exchange(nullptr, std::memory_order_acq_rel);
    if (task == nullptr) return;  // stopping, nothing asked
    std::vector<at::Tensor> result;
    std::exception_ptr error;
    try {
      result = (*task)();
    } catch (...) {
      error = std::current_exception();
    }
    result_ = std::move(result);
    error_ = error;
    finished_.store(true, std::memory_order_release);
    { std::lock_guard<std::mutex> lock(mu_); }  // a caller about to sleep sees it
    done_.notify_one();
  }
}

void bind_slot_thread(py::module_& m) {
  // `callers` threads each hand `calls` tasks to one SlotThread (spinning `spin_us`); every
  // `fail_every`-th task throws. Returns (right answers, errors passed back, wrong answers,
  // tasks that ran on another thread than the slot's).
  m.def(
      "_slot_thread_check",
      [](int callers, int calls, int spin_us, int fail_every) {
        std::atomic<int64_t> right{0}, errors{0}, wrong{0}, elsewhere{0}, n{0};
        std::thread::id slot_id;
        SlotThread slot(
            [&slot_id](const std::function<void()>& loop) {
              slot_id = std::this_thread::get_id();
              loop();
            },
            std::chrono::microseconds(spin_us));
        std::vector<std::thread> threads;
        for (int c = 0; c < callers; ++c) {
          threads.emplace_back([&, c] {
            for (int i = 0; i < calls; ++i) {
              const int64_t k = n.fetch_add(1) + 1;
              const int64_t want = int64_t(c) * 1'000'000 + i;
              SlotThread::Task task = [&, k, want] {
                if (std::this_thread::get_id() != slot_id) elsewhere.fetch_add(1);
                if (fail_every > 0 && k % fail_every == 0) throw std::runtime_error("planned");
                return std::vector<at::Tensor>{at::scalar_tensor(want, at::kLong)};
              };
              try {
                auto out = slot.call(task);
                (out.size() == 1 && out[0].item<int64_t>() == want ? right : wrong).fetch_add(1);
              } catch (const std::runtime_error& e) {
                (std::string(e.what()) == "planned" ? errors : wrong).fetch_add(1);
              }
            }
          });
        }
        for (auto& t : threads) t.join();
        return std::make_tuple(right.load(), errors.load(), wrong.load(), elsewhere.load());
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("callers"), py::arg("calls"), py::arg("spin_us"), py::arg("fail_every") = 0);
}

}  // namespace aotiserve
