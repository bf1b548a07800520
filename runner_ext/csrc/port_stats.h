// Request and run statistics of the port, kept in C++ so the hot path counts without
// Python; the daemon's Prometheus collector reads them at each scrape (server/metrics.py).
// Calls answered by Python (the bridge) are recorded here too: one store, one exposition.
#pragma once

#include <array>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace aotiserve {

class Histogram {
 public:
  explicit Histogram(const std::vector<double>* bounds) : bounds_(bounds) {}
  void observe(double seconds);
  // Cumulative counts per bound (then +Inf), and the sum in seconds.
  std::vector<uint64_t> cumulative() const;
  double sum() const { return double(sum_ns_.load(std::memory_order_relaxed)) * 1e-9; }

 private:
  const std::vector<double>* bounds_;
  std::array<std::atomic<uint64_t>, 32> counts_{};
  std::atomic<uint64_t> sum_ns_{0};
};

// One (model, method): answers by status code and whole-call latency.
struct MethodSeries {
  explicit MethodSeries(const std::vector<double>* b) : latency(b) {}
  std::array<std::atomic<uint64_t>, 17> codes{};
  Histogram latency;
  // Whole-call time of the calls answered OK and of the others, and when the last one was
  // answered (ms since the epoch): OIP ModelStatistics' success, fail and last_inference.
  std::atomic<uint64_t> ok_ns{0}, fail_ns{0};
  std::atomic<int64_t> last_ms{0};
  void record(int code, double seconds);
};

// One (model, rows of a run) of dynamic batching: runs, and their time in the runner.
struct BatchSeries {
  std::atomic<uint64_t> runs{0}, compute_ns{0};
  void record(double computed);
};

// One model's load now: inference requests admitted to run (waiting for a runner or
// running), and runs waiting for a runner. And the time the hot path spends on its
// requests' tensors: decoding and checking the inputs before the run, encoding the outputs
// after it (OIP ModelStatistics' compute_input and compute_output), per request.
struct ModelLoad {
  std::atomic<int64_t> in_flight{0}, queued{0};
  std::atomic<uint64_t> input_count{0}, input_ns{0}, output_count{0}, output_ns{0};
  void record_input(double seconds);
  void record_output(double seconds);
};

// One (model, device): time queued for a runner, time in the runner, runs.
struct DeviceSeries {
  explicit DeviceSeries(const std::vector<double>* b) : queue(b), compute(b) {}
  Histogram queue, compute;
  std::atomic<uint64_t> runs{0};
  void record(double queued, double computed);
};

class Stats {
 public:
  explicit Stats(std::vector<double> bounds) : bounds_(std::move(bounds)) {}
  // Pointers stay valid for the Stats' life: the hot path keeps them.
  MethodSeries* method(const std::string& model, const std::string& method);
  DeviceSeries* device(const std::string& model, const std::string& device);
  std::atomic<int64_t>* in_flight(const std::string& method);
  BatchSeries* batch(const std::string& model, int64_t rows);
  ModelLoad* load(const std::string& model);
  // Requests the C++ hot path answered itself (not handed to Python): 0 Run, 1 ModelInfer.
  void hot(int which) { hot_[which].fetch_add(1, std::memory_order_relaxed); }
  const std::vector<double>& bounds() const { return bounds_; }

  struct Snapshot {
    std::vector<std::tuple<std::string, std::string, std::map<int, uint64_t>,
                           std::vector<uint64_t>, double>> methods;
    std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>, double,
                           std::vector<uint64_t>, double, uint64_t>> devices;
    std::map<std::string, int64_t> in_flight;
    // (model, method, ok_ns, fail_ns, last_ms)
    std::vector<std::tuple<std::string, std::string, uint64_t, uint64_t, int64_t>> outcomes;
    // (model, rows, runs, compute_ns)
    std::vector<std::tuple<std::string, int64_t, uint64_t, uint64_t>> batches;
    std::map<std::string, std::pair<int64_t, int64_t>> load;  // model -> (in flight, queued)
    // (model, input count, input ns, output count, output ns)
    std::vector<std::tuple<std::string, uint64_t, uint64_t, uint64_t, uint64_t>> io;
    uint64_t hot_run = 0, hot_infer = 0;
  };
  Snapshot snapshot();

 private:
  std::vector<double> bounds_;
  std::mutex mu_;
  std::map<std::pair<std::string, std::string>, std::unique_ptr<MethodSeries>> methods_;
  std::map<std::pair<std::string, std::string>, std::unique_ptr<DeviceSeries>> devices_;
  std::map<std::string, std::unique_ptr<std::atomic<int64_t>>> in_flight_;
  std::map<std::pair<std::string, int64_t>, std::unique_ptr<BatchSeries>> batches_;
  std::map<std::string, std::unique_ptr<ModelLoad>> load_;
  std::array<std::atomic<uint64_t>, 2> hot_{};
};

}  // namespace aotiserve
