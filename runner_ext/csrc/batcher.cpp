// See batcher.h.
#include "batcher.h"

#include <ATen/ATen.h>

#include <chrono>

namespace aotiserve {
namespace {

// What requests must share to run as one: per input, dtype, device and the shape past
// the first dimension.
std::vector<std::tuple<at::ScalarType, at::Device, std::vector<int64_t>>> key_of(
    const std::vector<at::Tensor>& inputs) {
  std::vector<std::tuple<at::ScalarType, at::Device, std::vector<int64_t>>> key;
  for (const auto& t : inputs) {
    auto sizes = t.sizes();
    key.emplace_back(t.scalar_type(), t.device(), std::vector<int64_t>(sizes.begin() + 1, sizes.end()));
  }
  return key;
}

}  // namespace

struct Batcher::Request {
  std::vector<at::Tensor> inputs;
  int64_t rows = 0;
  const BatchExecute* execute = nullptr;
  std::vector<at::Tensor> outputs;
  std::string version;
  grpc::Status status;
  bool has_result = false, done = false;
};

struct Batcher::Batch {
  std::vector<std::tuple<at::ScalarType, at::Device, std::vector<int64_t>>> key;
  std::vector<Request*> members;
  int64_t rows = 0;
  bool closed = false;
};

grpc::Status Batcher::run(std::vector<at::Tensor> inputs, const BatchExecute& execute,
                          const std::function<bool()>& others_in_flight,
                          std::vector<at::Tensor>& outputs, std::string& version) {
  int64_t rows = inputs.empty() || inputs[0].dim() == 0 ? 0 : inputs[0].size(0);
  if (rows == 0 || rows >= max_size_) {
    return execute([&] { return inputs; }, outputs, version);
  }
  Request request;
  request.rows = rows;
  request.execute = &execute;
  auto key = key_of(inputs);
  request.inputs = std::move(inputs);
  std::shared_ptr<Batch> batch;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (open_ && !open_->closed && open_->key == key && open_->rows + rows <= max_size_) {
      batch = open_;  // follow: the leader runs this request with the others
      batch->members.push_back(&request);
      batch->rows += rows;
      if (batch->rows >= max_size_) close(*batch);
      cv_.wait(lock, [&] { return request.done; });
    } else {
      batch = open_ = std::make_shared<Batch>();
      batch->key = std::move(key);
      batch->members.push_back(&request);
      batch->rows = rows;
    }
  }
  if (!request.done) lead(batch, others_in_flight);
  outputs = std::move(request.outputs);
  version = std::move(request.version);
  return request.status;
}

void Batcher::close(Batch& batch) {
  batch.closed = true;
  if (open_.get() == &batch) open_.reset();
  cv_.notify_all();
}

std::vector<at::Tensor> Batcher::seal(Batch& batch,
                                      const std::function<bool()>& others_in_flight) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (!batch.closed && others_in_flight()) {
      auto until = std::chrono::steady_clock::now() +
                   std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                       std::chrono::duration<double>(max_delay_s_));
      cv_.wait_until(lock, until, [&] { return batch.closed; });
    }
    close(batch);
  }
  // Closed: the members no longer change.
  if (batch.members.size() == 1) return batch.members[0]->inputs;
  std::vector<at::Tensor> joined;
  for (size_t i = 0; i < batch.members[0]->inputs.size(); ++i) {
    std::vector<at::Tensor> parts;
    for (auto* m : batch.members) parts.push_back(m->inputs[i]);
    joined.push_back(at::cat(parts));
  }
  return joined;
}

bool Batcher::split(const std::vector<at::Tensor>& outputs, const std::vector<Request*>& members,
                    const std::string& version) {
  std::vector<int64_t> sizes;
  for (auto* m : members) sizes.push_back(m->rows);
  std::vector<std::vector<at::Tensor>> parts;
  try {
    for (const auto& o : outputs) parts.push_back(at::split_with_sizes(o, sizes));
  } catch (const std::exception&) {
    return false;  // an output without the batch's rows: each request runs alone
  }
  for (size_t j = 0; j < members.size(); ++j) {
    for (auto& p : parts) members[j]->outputs.push_back(p[j]);
    members[j]->version = version;
  }
  return true;
}

void Batcher::lead(const std::shared_ptr<Batch>& batch,
                   const std::function<bool()>& others_in_flight) {
  Request* leader = batch->members[0];
  std::vector<at::Tensor> outputs;
  std::string version;
  grpc::Status status;
  try {
    status = (*leader->execute)([&] { return seal(*batch, others_in_flight); }, outputs, version);
  } catch (const std::exception& e) {
    status = {grpc::StatusCode::INTERNAL, std::string("batched run failed: ") + e.what()};
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!batch->closed) close(*batch);  // refused before it ran (queue, deadline): sealed now
  }
  auto& members = batch->members;
  if (members.size() == 1) {
    leader->outputs = std::move(outputs);
    leader->version = std::move(version);
    leader->status = status;
  } else if (status.ok() && split(outputs, members, version)) {
    batches.fetch_add(1, std::memory_order_relaxed);
  } else {
    // Each request on its own, with its own deadline: a bad one fails alone.
    for (auto* m : members) {
      try {
        m->status = (*m->execute)([m] { return m->inputs; }, m->outputs, m->version);
      } catch (const std::exception& e) {
        m->status = {grpc::StatusCode::INTERNAL, std::string("run failed: ") + e.what()};
      }
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (auto* m : members) m->done = true;
  cv_.notify_all();
}

}  // namespace aotiserve
