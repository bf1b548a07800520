// The daemon's one port, served by gRPC C++ (port.cpp). Hot paths (aotiserve.v1 Run,
// OIP ModelInfer) are answered here without Python or the GIL; health is answered
// here; every other RPC goes through the bridge (bridge.h) to the Python servicers.
// Auth, drain, limits, TLS and the stream limits live here, once, for every call.
#pragma once

#include <ATen/Tensor.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <string>
#include <vector>

#include "runtime_output.h"
#include "batcher.h"
#include "bridge.h"
#include "health.h"
#include "port_stats.h"
#include "runner_bindings.h"
#include "wire.h"

namespace aotiserve {

struct PortConfig {
  int max_message_bytes = 64 << 20;
  std::string admin_token, inference_token;
  wire::Limits limits;
  int max_queue = 256;             // runs waiting for a runner, per device
  int workers = 32;                // gRPC threads kept polling for the hot path
  int max_threads = 1024;          // gRPC threads at most (beyond: RESOURCE_EXHAUSTED)
  int max_pending = 1024;          // calls waiting for a Python thread
  int max_calls = 1024;            // calls being handled at once (beyond: RESOURCE_EXHAUSTED)
  int max_streams = 16;            // long-lived streams open at once, all kinds
  double stream_idle_s = 300;      // a stream whose client sends nothing this long ends
  int max_concurrent_streams = 256;  // HTTP/2 streams per connection
  int64_t max_connection_idle_ms = 0;  // 0: connections never time out idle
  std::string tls_cert, tls_key, tls_ca;  // PEM
  std::string lowerbound_hint;  // what a batch below torch's default guard of 2 should do
  std::set<std::string> streaming;  // long-lived stream methods, "/pkg.Service/Method"
};

struct InputSpec {
  std::string name;
  const wire::DType* dtype = nullptr;  // null: any
  bool has_shape = false;
  std::vector<int64_t> shape;          // -1: any size
  std::vector<int64_t> lower;          // smallest size of each dimension (empty: none)
  std::vector<int64_t> upper;          // largest (-1: none; empty: none)
  std::string bounds_text;             // "[2..1024, 64]", for messages
  // How messages name it, made once: "input 0 ('x')" for Run, "input 'x'" for ModelInfer.
  std::string run_label;
  std::string infer_label;
};

struct DevicePoolState {
  std::string device;
  std::atomic<int> waiting{0};
  std::atomic<int> running{0};
};

struct PortReplica {
  RunFn run;
  SwapFn swap;
  int capacity = 1;
  int running = 0;               // guarded by the model's admit mutex
  std::vector<int> free_slots;   // RunFn's slots not in use (guarded by the admit mutex)
  DevicePoolState* pool = nullptr;
  DeviceSeries* stats = nullptr;
};

struct PortModel {
  std::string name;
  std::vector<InputSpec> inputs;
  // Input dims the model gives one size, as groups of (input, dim) (server/io_specs.py:
  // check_ties): torch's guard on them skips zero-element inputs, so the port checks them.
  std::vector<std::vector<std::pair<int, int>>> ties;
  std::vector<std::string> outputs;
  std::vector<PortReplica> replicas;
  bool on_gpu = false;  // a replica is on a GPU: large requests are joined into pinned memory
  std::unique_ptr<Batcher> batcher;  // dynamic batching (null: off)
  MethodSeries* run_stats = nullptr;
  MethodSeries* infer_stats = nullptr;
  ModelLoad* load = nullptr;  // requests in flight and queued now (metrics)
  std::shared_mutex weights;  // runs: shared; a weights change or removal: exclusive
  std::string version;        // guarded by weights
  std::mutex admit;
  std::condition_variable freed;
  bool closed = false;        // guarded by admit
};

// Where a hot-path request came from: a unary call (its context), or one message of a
// ModelStreamInfer stream (the stream's deadline, cancellation, metadata; no trailers).
struct Caller {
  grpc::ServerContextBase* ctx = nullptr;
  StreamCall* stream = nullptr;
  std::chrono::system_clock::time_point deadline() const;
  bool cancelled() const;
  std::string peer() const;
  Metadata metadata() const;
};

class Port {
 public:
  Port(PortConfig config, std::shared_ptr<Stats> stats);
  ~Port();
  // Binds `address` with every service and starts serving there; `admin_rpcs` false:
  // mutating RPCs are refused there (the daemon has a separate admin listener). Returns
  // the bound port.
  int listen(const std::string& address, bool admin_rpcs);

  void add_model(std::shared_ptr<PortModel> model);
  void remove_model(const std::string& name);  // waits for its runs in flight
  void flip(const std::string& name, const std::string& version);
  void lock_weights(const std::string& name);
  void unlock_weights(const std::string& name, const std::string& version);
  DevicePoolState* pool(const std::string& device);
  // Runs `inputs` (host tensors) once on each replica of the model through the hot path's
  // own run (its CUDA stream pool, pinned host buffers), so the first request does not
  // pay for them. Returns the runs made.
  int warm(const std::string& name, const std::vector<at::Tensor>& inputs);
  // Occupies one runner of the model as a run would (false: none free now); release
  // gives it back. Operators' tooling and tests use it to hold a model busy.
  bool hold_runner(const std::string& name);
  void release_runner(const std::string& name);

  // OIP shared-memory regions (server/shared_memory.py registers them): `bytes` is a uint8
  // tensor over the region's memory (host or CUDA), kept alive while a request uses it.
  void set_region(const std::string& kind, const std::string& name, at::Tensor bytes);
  void drop_region(const std::string& kind, const std::string& name);

  void set_health(const std::string& service, bool serving);
  void set_draining();
  // Waits until no call (health and reflection aside) is being handled; false on timeout.
  bool wait_idle(double timeout_s);
  void stop(double grace_s);

  Bridge& bridge() { return bridge_; }
  Stats& stats() { return *stats_; }
  std::optional<std::string> next_log();  // blocks; nullopt once stopped
  std::vector<std::string> pending_log();  // what is queued now, without waiting
  int watchers();                          // service names with a health Watch open
  uint64_t copied_bytes() const { return copied_bytes_.load(std::memory_order_relaxed); }

  // Used by the services (port.cpp).
  grpc::Status run(grpc::ServerContext* ctx, const grpc::ByteBuffer* req, grpc::ByteBuffer* resp,
                   bool infer, bool admin_rpcs);
  grpc::Status serve(const Caller& caller, const grpc::ByteBuffer* req, grpc::ByteBuffer* resp,
                     bool infer, bool admin_rpcs);

 private:
  struct Listener;
  class HotService;
  struct Payload;

  // The hot path's token check (the rules for control RPCs: server/interceptors.py).
  bool authorize(const std::string& method, const grpc::ServerContextBase& ctx, grpc::Status& refusal,
                 bool& is_admin);
  void accept(Listener* l);  // asks the listener's generic service for its next call
  void bridged(std::shared_ptr<AsyncCall> call, bool admin_rpcs);
  bool admit_stream();
  void release_stream();
  bool enter();  // false: max_calls reached
  void leave();
  void log(std::string line);
  std::shared_ptr<PortModel> find(const std::string& name);
  // ModelStreamInfer on a thread of its own: each message served as ModelInfer is (the
  // hot path, or Python for what it does not serve), answered in order, errors in-band.
  void stream_infer(std::shared_ptr<StreamCall> call);
  grpc::Status forward(const Caller& caller, const std::string& method,
                       const grpc::ByteBuffer& request,
                       bool is_admin, bool admin_rpcs, grpc::ByteBuffer* resp);
  // The bytes a tensor's shared-memory parameters name: `want` of them (-1: up to
  // shared_memory_byte_size, for an output), or INVALID_ARGUMENT naming what is wrong.
  // The system regions a request used (name, the mapping's first byte).
  using SharedUse = std::vector<std::pair<std::string, const void*>>;
  grpc::Status shared_bytes(const wire::SharedRef& ref, int64_t want, const std::string& what,
                            at::Tensor& out, SharedUse& used);
  static grpc::Status shrunk(const std::string& region);
  // One run on the least-loaded replica: admission (queue bound, deadline, cancel), the
  // weights lock, the runner; `get` gives the inputs once a runner is held (a batch
  // closes then).
  grpc::Status execute(const Caller& caller, PortModel& model, const GetInputs& get,
                       std::vector<at::Tensor>& outputs, std::string& version);

  PortConfig config_;
  std::shared_ptr<Stats> stats_;
  Bridge bridge_;
  std::atomic<int64_t>* run_in_flight_;
  std::atomic<int64_t>* infer_in_flight_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::shared_mutex models_mu_;
  std::map<std::string, std::shared_ptr<PortModel>> models_;
  std::mutex pools_mu_;
  std::map<std::string, std::unique_ptr<DevicePoolState>> pools_;
  std::atomic<bool> draining_{false};
  std::atomic<int> streams_{0};
  std::mutex idle_mu_;
  std::condition_variable idle_cv_;
  int active_ = 0;
  std::atomic<uint64_t> copied_bytes_{0};
  std::shared_mutex regions_mu_;
  std::map<std::pair<std::string, std::string>, at::Tensor> regions_;  // (kind, name)
  std::mutex stream_threads_mu_;
  std::condition_variable stream_threads_cv_;
  int stream_threads_ = 0;  // ModelStreamInfer threads running
  std::mutex log_mu_;
  std::condition_variable log_cv_;
  std::deque<std::string> log_lines_;
  bool log_closed_ = false;
  // The model runtime's std::cerr lines, into log() (last: goes before what log() uses).
  std::unique_ptr<RuntimeOutput> runtime_output_;
};

void bind_port(pybind11::module_& m);

}  // namespace aotiserve
