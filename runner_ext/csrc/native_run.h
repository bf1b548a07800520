// The native data port: see native_run.cpp.
#pragma once

#include <array>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include <ATen/Tensor.h>
#include <grpcpp/grpcpp.h>

#include "runner_bindings.h"

namespace aotiserve {

struct NativeInput {
  std::string name;
  at::ScalarType dtype;
  std::string dtype_name;
  std::vector<int64_t> shape;  // -1: any size
};

struct NativeModel;

class NativeRunServer {
 public:
  NativeRunServer(const std::string& address, int max_message_bytes, const std::string& token,
                  int max_queue, int64_t max_elements, int64_t max_rank, int workers);
  ~NativeRunServer();
  int port() const { return port_; }
  void add_model(const std::string& name, RunFn run, SwapFn swap, int capacity,
                 std::vector<NativeInput> inputs, const std::string& version);
  // Waits for the model's runs in flight; later requests get NOT_FOUND.
  void remove_model(const std::string& name);
  // Swaps the model's buffers and sets `version`, all under its lock: runs wait for the
  // flip alone (no GIL, no Python in between).
  void flip(const std::string& name, const std::string& version);
  // Around every other change of a model's serving weights: runs wait, then see `version`.
  void lock_weights(const std::string& name);
  void unlock_weights(const std::string& name, const std::string& version);
  void set_draining(bool draining);
  void stop(double grace_s);
  std::map<int, uint64_t> counts();  // requests by grpc status code
  // Payload bytes the port copied (requests joined from several slices, small outputs
  // copied into the reply): divided by the bytes served, the copies per request.
  uint64_t copied_bytes() const { return copied_bytes_.load(std::memory_order_relaxed); }

 private:
  class Service;
  grpc::Status run(grpc::ServerContext* ctx, const grpc::ByteBuffer* req, grpc::ByteBuffer* resp);
  bool authorized(grpc::ServerContext* ctx, grpc::Status& refusal) const;
  std::shared_ptr<NativeModel> find(const std::string& name);
  void count(grpc::StatusCode code);

  std::string token_;
  int max_queue_;
  int64_t max_elements_;
  int64_t max_rank_;
  std::atomic<int> waiting_{0};
  std::atomic<bool> draining_{false};
  int port_ = 0;
  std::shared_mutex models_mu_;  // runs look models up shared
  std::map<std::string, std::shared_ptr<NativeModel>> models_;
  std::array<std::atomic<uint64_t>, 17> counts_{};  // by grpc::StatusCode
  std::atomic<uint64_t> copied_bytes_{0};
  std::mutex server_mu_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
};

void bind_native_run(py::module_& m);

}  // namespace aotiserve
