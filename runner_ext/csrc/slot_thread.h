// A thread that runs one caller's task at a time, handed over by spinning before sleeping.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <torch/extension.h>

namespace aotiserve {

namespace py = pybind11;

// The GPU hot path's --gpu-slot-threads (cuda.cpp): one thread per run slot of a GPU
// replica, on which every run of that slot executes, so what CUDA libraries set up per
// thread is set up once, by the warm-up, on the thread that runs the slot's requests.
//
// The hand-off spins before it sleeps: after a task the thread looks for the next one for
// `spin`, and a caller looks for its result for up to kCallerSpin of that, before either
// waits on a condition variable. A sleeping thread costs a futex wake-up and a cold core
// (tens of µs each way, more than a small model's run); a spinning one costs a core only
// while tasks keep coming. Callers take turns (one task at a time).
class SlotThread {
 public:
  using Task = std::function<std::vector<at::Tensor>()>;
  // Runs the thread's whole loop (the argument), inside whatever the thread needs around
  // it (a device guard, inference mode).
  using Around = std::function<void(const std::function<void()>&)>;

  static constexpr std::chrono::microseconds kCallerSpin{300};

  SlotThread(Around around, std::chrono::microseconds spin);
  ~SlotThread();
  SlotThread(const SlotThread&) = delete;
  SlotThread& operator=(const SlotThread&) = delete;

  // Runs `task` on this thread and returns what it returned (or throws what it threw).
  std::vector<at::Tensor> call(const Task& task);

 private:
  void loop();

  const std::chrono::microseconds spin_;
  std::mutex call_mu_;             // one caller at a time
  std::mutex mu_;                  // only for sleeping: the flags below are atomics
  std::condition_variable wake_;   // a task is there (or stop)
  std::condition_variable done_;   // the task finished
  std::atomic<const Task*> task_{nullptr};
  std::atomic<bool> finished_{false};
  std::atomic<bool> stop_{false};
  std::vector<at::Tensor> result_;  // written before finished_ (release), read after (acquire)
  std::exception_ptr error_;
  std::thread thread_;  // last: starts once the members above exist
};

// _slot_thread_check: a self-check of the hand-off for the tests (no device needed).
void bind_slot_thread(py::module_& m);

}  // namespace aotiserve
