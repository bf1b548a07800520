// Dynamic batching on the port's hot path: concurrent runs of one model coalesced into
// one run (the same policy as server/batching.py, which serves models the port does not).
//
// No batching thread: the first request leads a batch, which stays open while the leader
// waits for a free runner (under load requests queue anyway: they join instead). Holding
// a runner, the leader waits up to the delay for more rows if other runs of the model are
// in flight, then closes the batch (at once when it is full); alone, it runs at once, so a
// lone client pays no delay. Requests join only a batch whose inputs have the same dtypes,
// devices and shapes past the first dimension. If a batched run fails, each request is run
// on its own, so a bad request fails alone.
#pragma once

#include <ATen/Tensor.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace aotiserve {

using GetInputs = std::function<std::vector<at::Tensor>()>;
// Runs the model once on what `get` returns (called once a runner is held): its outputs
// and the weights version that computed them, or why not.
using BatchExecute = std::function<grpc::Status(const GetInputs& get,
                                                std::vector<at::Tensor>& outputs,
                                                std::string& version)>;

class Batcher {
 public:
  Batcher(int64_t max_size, double max_delay_s) : max_size_(max_size), max_delay_s_(max_delay_s) {}
  int64_t max_size() const { return max_size_; }
  // This request's outputs (its own rows) and weights version. `execute` runs with this
  // request's own deadline and cancellation: a batch runs with its leader's.
  grpc::Status run(std::vector<at::Tensor> inputs, const BatchExecute& execute,
                   const std::function<bool()>& others_in_flight,
                   std::vector<at::Tensor>& outputs, std::string& version);
  std::atomic<uint64_t> batches{0};  // runs made for more than one request

 private:
  struct Request;
  struct Batch;
  void close(Batch& batch);  // mu_ held
  std::vector<at::Tensor> seal(Batch& batch, const std::function<bool()>& others_in_flight);
  void lead(const std::shared_ptr<Batch>& batch, const std::function<bool()>& others_in_flight);
  // Each member's rows of the batch's outputs; false where an output does not split so.
  static bool split(const std::vector<at::Tensor>& outputs, const std::vector<Request*>& members,
                    const std::string& version);

  int64_t max_size_;
  double max_delay_s_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Batch> open_;
};

}  // namespace aotiserve
