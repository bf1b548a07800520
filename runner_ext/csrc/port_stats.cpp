// See port_stats.h.
#include "port_stats.h"

#include <algorithm>

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
