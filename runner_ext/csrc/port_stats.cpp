// See port_stats.h.
#include "port_stats.h"

#include <algorithm>
#include <chrono>

namespace aotiserve {

void Histogram::observe(double seconds) {
  size_t i = std::lower_bound(bounds_->begin(), bounds_->end(), seconds) - bounds_->begin();
  counts_[std::min(i, counts_.size() - 1)].fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(uint64_t(std::max(0.0, seconds) * 1e9), std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::cumulative() const {
  std::vector<uint64_t> out;
  uint64_t total = 0;
  for (size_t i = 0; i <= bounds_->size() && i < counts_.size(); ++i) {
    total += counts_[i].load(std::memory_order_relaxed);
    out.push_back(total);
  }
  return out;
}

void MethodSeries::record(int code, double seconds) {
  if (code >= 0 && size_t(code) < codes.size()) codes[code].fetch_add(1, std::memory_order_relaxed);
  latency.observe(seconds);
  // The conversion Histogram::observe makes: the two sums add up to the latency's sum.
  uint64_t ns = uint64_t(std::max(0.0, seconds) * 1e9);
  (code == 0 ? ok_ns : fail_ns).fetch_add(ns, std::memory_order_relaxed);
  auto now = std::chrono::system_clock::now().time_since_epoch();
  last_ms.store(std::chrono::duration_cast<std::chrono::milliseconds>(now).count(),
                std::memory_order_relaxed);
}

void BatchSeries::record(double computed) {
  runs.fetch_add(1, std::memory_order_relaxed);
  compute_ns.fetch_add(uint64_t(std::max(0.0, computed) * 1e9), std::memory_order_relaxed);
}

void DeviceSeries::record(double queued, double computed) {
  queue.observe(queued);
  compute.observe(computed);
  runs.fetch_add(1, std::memory_order_relaxed);
}

MethodSeries* Stats::method(const std::string& model, const std::string& method) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& slot = methods_[{model, method}];
  if (!slot) slot = std::make_unique<MethodSeries>(&bounds_);
  return slot.get();
}

DeviceSeries* Stats::device(const std::string& model, const std::string& device) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& slot = devices_[{model, device}];
  if (!slot) slot = std::make_unique<DeviceSeries>(&bounds_);
  return slot.get();
}

std::atomic<int64_t>* Stats::in_flight(const std::string& method) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& slot = in_flight_[method];
  if (!slot) slot = std::make_unique<std::atomic<int64_t>>(0);
  return slot.get();
}

BatchSeries* Stats::batch(const std::string& model, int64_t rows) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& slot = batches_[{model, rows}];
  if (!slot) slot = std::make_unique<BatchSeries>();
  return slot.get();
}

void ModelLoad::record_input(double seconds) {
  input_count.fetch_add(1, std::memory_order_relaxed);
  input_ns.fetch_add(uint64_t(std::max(0.0, seconds) * 1e9), std::memory_order_relaxed);
}

void ModelLoad::record_output(double seconds) {
  output_count.fetch_add(1, std::memory_order_relaxed);
  output_ns.fetch_add(uint64_t(std::max(0.0, seconds) * 1e9), std::memory_order_relaxed);
}

ModelLoad* Stats::load(const std::string& model) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& slot = load_[model];
  if (!slot) slot = std::make_unique<ModelLoad>();
  return slot.get();
}

Stats::Snapshot Stats::snapshot() {
  std::lock_guard<std::mutex> lock(mu_);
  Snapshot s;
  for (const auto& [key, m] : methods_) {
    std::map<int, uint64_t> codes;
    for (size_t c = 0; c < m->codes.size(); ++c) {
      if (uint64_t n = m->codes[c].load(std::memory_order_relaxed)) codes[int(c)] = n;
    }
    s.methods.emplace_back(key.first, key.second, std::move(codes), m->latency.cumulative(),
                           m->latency.sum());
    s.outcomes.emplace_back(key.first, key.second, m->ok_ns.load(), m->fail_ns.load(),
                            m->last_ms.load());
  }
  for (const auto& [key, b] : batches_) {
    s.batches.emplace_back(key.first, key.second, b->runs.load(), b->compute_ns.load());
  }
  for (const auto& [model, l] : load_) {
    s.load[model] = {l->in_flight.load(), l->queued.load()};
    s.io.emplace_back(model, l->input_count.load(), l->input_ns.load(), l->output_count.load(),
                      l->output_ns.load());
  }
  for (const auto& [key, d] : devices_) {
    s.devices.emplace_back(key.first, key.second, d->queue.cumulative(), d->queue.sum(),
                           d->compute.cumulative(), d->compute.sum(),
                           d->runs.load(std::memory_order_relaxed));
  }
  for (const auto& [method, n] : in_flight_) s.in_flight[method] = n->load();
  s.hot_run = hot_[0].load();
  s.hot_infer = hot_[1].load();
  return s;
}

}  // namespace aotiserve
