// See port.h. One grpc::Server per listener (the main port, and an admin port when
// the daemon has one), each with three services:
//   HotService     Run, ModelInfer: sync handlers on gRPC's polling threads, no Python;
//   an async generic service for every other method, on the listener's control queue
//   (control_queue.h): Health Check and Watch answered in C++ (health.cpp), the rest
//   handed to the Python threads of server/bridge.py.
#include "port.h"
#include "sigbus.h"
#include "status_message.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/support/method_handler.h>

#include <ATen/ATen.h>
#include <absl/synchronization/mutex.h>
#include <c10/core/InferenceMode.h>
#include <openssl/crypto.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

namespace aotiserve {
using wire::Span;
namespace {

constexpr const char* kRun = "/aotiserve.v1.ModelRunner/Run";
constexpr const char* kInfer = "/inference.GRPCInferenceService/ModelInfer";
constexpr const char* kStreamInfer = "/inference.GRPCInferenceService/ModelStreamInfer";
constexpr const char* kTrailer = "aotiserve-weights-version";
// torch's CPU allocator aligns every tensor to 64 bytes, and AOTInductor's kernels may
// take a different (vectorized) path on aligned data: inputs are handed over aligned so
// results are bit for bit those of an in-process run.
constexpr uintptr_t kAlign = 64;
// Outputs this large go out as slices over the tensors' own memory (no copy).
constexpr size_t kZeroCopyBytes = 64 * 1024;
// Requests this large for a model on a GPU are gathered into pinned host memory (torch's
// caching host allocator): the host-to-device copy is then one asynchronous DMA, not a
// copy through the driver's staging buffer that holds the thread and serialises with
// the other requests' copies.
constexpr size_t kPinnedBytes = 64 * 1024;
// Threads of each listener's control queue (their handlers never block). One: each
// thread waiting on it is one more poller beside the hot path's (control_queue.h).
constexpr int kControlThreads = 1;

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

bool always_on(const std::string& method) {
  return method.rfind("/grpc.health.v1.Health/", 0) == 0 ||
         method.rfind("/grpc.reflection.", 0) == 0;
}

std::string short_name(const std::string& method) {
  auto i = method.rfind('/');
  return i == std::string::npos ? method : method.substr(i + 1);
}

bool token_matches(const std::string& header, const std::string& want) {
  std::string got = header.rfind("Bearer ", 0) == 0 ? header.substr(7) : header;
  return !want.empty() && got.size() == want.size() &&
         CRYPTO_memcmp(got.data(), want.data(), got.size()) == 0;
}

grpc::Status invalid(const std::string& msg) { return {grpc::StatusCode::INVALID_ARGUMENT, msg}; }

// AOTInductor's guard on a dimension that several inputs share says only "expected size
// 2==3, stride 1==1 at dim=0" (torch's text, naming no input): which inputs disagree
// there, or "" when `msg` is not that guard (server/input_checks.py:tied_dims says the same).
std::string tied_dims(const std::string& msg, const std::vector<at::Tensor>& inputs,
                      const std::vector<InputSpec>& specs) {
  long long got = 0, want = 0, dim = 0;
  auto size_at = msg.find("expected size ");
  auto dim_at = msg.find(" at dim=");
  if (size_at == std::string::npos || dim_at == std::string::npos ||
      std::sscanf(msg.c_str() + size_at, "expected size %lld==%lld", &got, &want) != 2 ||
      std::sscanf(msg.c_str() + dim_at, " at dim=%lld", &dim) != 1 || got == want) {
    return "";
  }
  std::string odd, even;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined() || inputs[i].dim() <= dim) continue;
    int64_t n = inputs[i].size(dim);
    std::string label = "input " + std::to_string(i) +
                        (i < specs.size() ? " ('" + specs[i].name + "')" : "") + " has " +
                        std::to_string(n);
    std::string& into = n == got ? odd : n == want ? even : odd;
    into += (into.empty() ? "" : ", ") + label;
  }
  if (odd.empty()) return "";
  return "dimension " + std::to_string(dim) + " must be the same size in inputs the model ties " +
         "together: " + odd + (even.empty() ? "" : "; " + even) + " (the model expected " +
         std::to_string(want) + ")";
}

std::string strip_backtrace(std::string msg) {
  return msg.substr(0, msg.find("\nException raised from"));
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// The model a request names (field 1 of RunRequest and ModelInferRequest alike), read
// from its first slice: protobuf writes fields in number order, so it leads. Empty when
// it is not there.
std::string leading_model_name(const uint8_t* p, const uint8_t* end) {
  uint64_t tag, len;
  if (!wire::read_varint(p, end, tag) || tag != (1 << 3 | 2)) return {};
  if (!wire::read_varint(p, end, len) || len > uint64_t(end - p) || len > 4096) return {};
  return std::string(reinterpret_cast<const char*>(p), len);
}

// Where the first tensor payload of a request starts, read from the request's first
// slice (-1: not within it). Run: RunRequest.inputs[0].data; ModelInfer:
// raw_input_contents[0]. A request joined from several slices is laid out so that
// payload lands aligned.
int64_t payload_offset(const uint8_t* begin, const uint8_t* end, bool infer) {
  const uint8_t* p = begin;
  while (p < end) {
    uint64_t tag, len;
    if (!wire::read_varint(p, end, tag)) return -1;
    uint64_t field = tag >> 3, wt = tag & 7;
    if (wt != 2) {
      if (!wire::skip_field(p, end, wt)) return -1;
      continue;
    }
    if (!wire::read_varint(p, end, len)) return -1;
    if (infer && field == 7) return p - begin;
    if (!infer && field == 2) {  // a Tensor: find its data field
      const uint8_t* q = p;
      const uint8_t* stop = std::min(end, p + len);
      while (q < stop) {
        uint64_t ttag, tlen;
        if (!wire::read_varint(q, stop, ttag)) return -1;
        if ((ttag >> 3) == 3 && (ttag & 7) == 2) {
          if (!wire::read_varint(q, stop, tlen)) return -1;
          return q - begin;
        }
        if (!wire::skip_field(q, stop, ttag & 7)) return -1;
      }
      return -1;
    }
    if (len > uint64_t(end - p)) return -1;
    p += len;
  }
  return -1;
}

void put_tensor_fields(std::string& head, const at::Tensor& c, uint64_t wire_dtype) {
  std::string shape;
  for (auto d : c.sizes()) wire::put_varint(shape, uint64_t(d));
  head.push_back(char(1 << 3 | 0));
  wire::put_varint(head, wire_dtype);
  wire::put_header(head, 2, shape.size());
  head += shape;
}

// Frames messages around output bytes: small outputs copied into the pending slice,
// large ones lent to gRPC (the slice holds a reference to the tensor).
class ReplyWriter {
 public:
  explicit ReplyWriter(std::atomic<uint64_t>& copied) : copied_(copied) {}
  std::string& pending() { return pending_; }
  void data(const at::Tensor& c) {
    uint64_t nbytes = c.numel() * c.element_size();
    if (nbytes < kZeroCopyBytes) {
      pending_.append(static_cast<const char*>(c.data_ptr()), nbytes);
      copied_.fetch_add(nbytes, std::memory_order_relaxed);
      return;
    }
    flush();
    auto* keep = new at::Tensor(c);
    slices_.emplace_back(c.data_ptr(), nbytes, +[](void* t) { delete static_cast<at::Tensor*>(t); },
                         keep);
  }
  grpc::ByteBuffer done() {
    flush();
    return grpc::ByteBuffer(slices_.data(), slices_.size());
  }

 private:
  void flush() {
    if (!pending_.empty()) slices_.emplace_back(pending_);
    pending_.clear();
  }
  std::atomic<uint64_t>& copied_;
  std::string pending_;
  std::vector<grpc::Slice> slices_;
};

// One entry of an InferOutputTensor's parameters (field 4): a string, else an int64.
void put_parameter(std::string& head, const std::string& key, const std::string& text,
                   int64_t number) {
  std::string value, entry;
  if (!text.empty()) {
    wire::put_string(value, 3, text);
  } else {
    value.push_back(char(2 << 3 | 0));
    wire::put_varint(value, uint64_t(number));
  }
  wire::put_string(entry, 1, key);
  wire::put_header(entry, 2, value.size());
  entry += value;
  wire::put_header(head, 4, entry.size());
  head += entry;
}

// grpc::StatusCode's name, as the error_message of a streamed answer spells it.
std::string code_name(grpc::StatusCode code) {
  static const char* const names[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
      "UNAUTHENTICATED"};
  int i = int(code);
  return i >= 0 && i < int(sizeof(names) / sizeof(names[0])) ? names[i] : std::to_string(i);
}

// One ModelStreamInferResponse: the answer of one streamed ModelInferRequest, or its
// error in-band ("CODE: message") with the request's model name, version and id.
std::string stream_answer(const grpc::Status& status, const grpc::ByteBuffer& answer,
                          const grpc::ByteBuffer& request) {
  std::string out;
  std::vector<grpc::Slice> slices;
  if (status.ok()) {
    (void)answer.Dump(&slices);
    wire::put_header(out, 2, answer.Length());
    for (const auto& slice : slices) {
      out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
    return out;
  }
  wire::put_string(out, 1, code_name(status.error_code()) + ": " + status.error_message());
  // Fields 1-3 of the request (model name, version, id), where it has them.
  std::string head;
  if (request.Dump(&slices).ok() && !slices.empty()) {
    const uint8_t* p = slices[0].begin();
    const uint8_t* end = slices[0].end();
    while (p < end) {
      uint64_t tag, len;
      if (!wire::read_varint(p, end, tag)) break;
      uint64_t field = tag >> 3, wt = tag & 7;
      if (wt != 2) {
        if (!wire::skip_field(p, end, wt)) break;
        continue;
      }
      if (!wire::read_varint(p, end, len) || len > uint64_t(end - p)) break;
      if (field >= 1 && field <= 3) {
        wire::put_header(head, uint32_t(field), len);
        head.append(reinterpret_cast<const char*>(p), len);
      }
      p += len;
    }
  }
  wire::put_header(out, 2, head.size());
  out += head;
  return out;
}

}  // namespace

std::chrono::system_clock::time_point Caller::deadline() const {
  return stream ? stream->deadline : ctx->deadline();
}

bool Caller::cancelled() const { return stream ? !stream->active() : ctx->IsCancelled(); }

std::string Caller::peer() const { return stream ? stream->peer : ctx->peer(); }

Metadata Caller::metadata() const { return stream ? stream->metadata : client_metadata(*ctx); }

// The request's bytes, contiguous, and what keeps them alive: input tensors viewing
// them hold `keep`, so an output that aliases an input keeps the request alive too.
struct Port::Payload {
  const uint8_t* begin = nullptr;
  const uint8_t* end = nullptr;
  std::shared_ptr<void> keep;
};

struct Port::Listener {
  bool admin_rpcs = false;
  int port = 0;
  std::unique_ptr<HotService> hot;
  std::unique_ptr<HealthService> health;
  grpc::AsyncGenericService generic;
  std::unique_ptr<grpc::ServerBuilder> builder;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<ControlQueue> queue;  // after server: shut down before it is destroyed
};

class Port::HotService : public grpc::Service {
 public:
  HotService(Port* port, bool admin_rpcs) {
    for (const char* name : {kRun, kInfer}) {
      bool infer = name == kInfer;
      AddMethod(new grpc::internal::RpcServiceMethod(
          name, grpc::internal::RpcMethod::NORMAL_RPC,
          new grpc::internal::RpcMethodHandler<HotService, grpc::ByteBuffer, grpc::ByteBuffer>(
              [port, infer, admin_rpcs](HotService*, grpc::ServerContext* ctx,
                                        const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) {
                return port->run(ctx, req, resp, infer, admin_rpcs);
              },
              this)));
    }
  }
};

Port::Port(PortConfig config, std::shared_ptr<Stats> stats)
    : config_(std::move(config)),
      stats_(std::move(stats)),
      bridge_(size_t(std::max(1, config_.max_pending))),
      run_in_flight_(stats_->in_flight("Run")),
      infer_in_flight_(stats_->in_flight("ModelInfer")) {
  // Abseil built without NDEBUG (Debian's is) records every lock gRPC takes in a
  // deadlock-detection graph: a few % of the port's CPU per request, for a check meant for
  // development. Off for the process (gRPC's mutexes are abseil's).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  runtime_output_ = std::make_unique<RuntimeOutput>(
      [this](std::string line) { log(std::move(line)); });
}

Port::~Port() { stop(0); }

int Port::listen(const std::string& address, bool admin_rpcs) {
  auto l = std::make_unique<Listener>();
  l->admin_rpcs = admin_rpcs;
  l->hot = std::make_unique<HotService>(this, admin_rpcs);
  l->health = std::make_unique<HealthService>([this] { return admit_stream(); },
                                              [this] { release_stream(); });
  std::shared_ptr<grpc::ServerCredentials> creds;
  if (!config_.tls_cert.empty()) {
    grpc::SslServerCredentialsOptions ssl(
        config_.tls_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                               : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    ssl.pem_key_cert_pairs.push_back({config_.tls_key, config_.tls_cert});
    ssl.pem_root_certs = config_.tls_ca;
    creds = grpc::SslServerCredentials(ssl);
  } else {
    creds = grpc::InsecureServerCredentials();
  }
  auto& b = *(l->builder = std::make_unique<grpc::ServerBuilder>());
  b.AddListeningPort(address, creds, &l->port);
  b.SetMaxReceiveMessageSize(config_.max_message_bytes);
  b.SetMaxSendMessageSize(config_.max_message_bytes);
  b.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, config_.max_concurrent_streams);
  // gRPC 1.51 inflates a compressed message whole and only then compares it with the size
  // limit: a 1 MB gzip body made the daemon allocate 1 GiB. Only identity is taken; a
  // compressed request is refused (UNIMPLEMENTED) from its headers, before any inflating.
  for (auto algorithm : {GRPC_COMPRESS_DEFLATE, GRPC_COMPRESS_GZIP}) {
    b.SetCompressionAlgorithmSupportStatus(algorithm, false);
  }
  b.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  if (config_.max_connection_idle_ms > 0) {
    b.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, int(config_.max_connection_idle_ms));
  }
  // Up to `workers` threads stay polling between requests: with gRPC's default of two,
  // more concurrent requests start and end a thread for nearly every request.
  b.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS,
                        std::max(2, config_.workers));
  grpc::ResourceQuota quota("aotiserve");
  quota.SetMaxThreads(std::max(config_.workers + 8, config_.max_threads));
  b.SetResourceQuota(quota);
  b.RegisterService(l->hot.get());
  b.RegisterAsyncGenericService(&l->generic);
  // Not listening: the hot path's threads stay the only pollers (control_queue.h).
  auto cq = b.AddCompletionQueue(/*is_frequently_polled=*/false);
  l->server = b.BuildAndStart();
  if (!l->server || l->port == 0) throw std::runtime_error("could not bind " + address);
  l->queue = std::make_unique<ControlQueue>(std::move(cq), kControlThreads);
  int port = l->port;
  Listener* raw = l.get();
  listeners_.push_back(std::move(l));
  // A few calls requested at once, so a burst of health checks does not wait on one.
  for (int i = 0; i < 4; ++i) accept(raw);
  return port;
}

void Port::accept(Listener* l) {
  auto call = std::make_shared<AsyncCall>(l->queue.get());
  call->request(&l->generic, [this, l, call](bool ok) {
    if (!ok) return;  // shutting down
    accept(l);
    const std::string& method = call->ctx.method();
    if (method == HealthService::kCheck) {
      l->health->check(call);
    } else if (method == HealthService::kWatch) {
      l->health->watch(call);
    } else {
      bridged(call, l->admin_rpcs);
    }
  });
}

// Models ---------------------------------------------------------------------------

DevicePoolState* Port::pool(const std::string& device) {
  std::lock_guard<std::mutex> lock(pools_mu_);
  auto& slot = pools_[device];
  if (!slot) {
    slot = std::make_unique<DevicePoolState>();
    slot->device = device;
  }
  return slot.get();
}

void Port::add_model(std::shared_ptr<PortModel> model) {
  for (const auto& r : model->replicas) {
    if (r.pool->device.rfind("cuda", 0) == 0) model->on_gpu = true;
  }
  model->run_stats = stats_->method(model->name, "Run");
  model->infer_stats = stats_->method(model->name, "ModelInfer");
  std::unique_lock<std::shared_mutex> lock(models_mu_);
  models_[model->name] = std::move(model);
}

int Port::warm(const std::string& name, const std::vector<at::Tensor>& inputs) {
  auto model = find(name);
  if (!model) return 0;
  std::shared_lock<std::shared_mutex> weights(model->weights);
  c10::InferenceMode no_autograd;
  int runs = 0;
  // Every slot of every GPU replica once (a slot's stream and the memory cached for it,
  // cuda.cpp), one run of a CPU replica. Called on a thread that ends after it
  // (server/port.py): the per-thread library handles it made go back to torch's pools.
  for (auto& r : model->replicas) {
    const bool on_gpu = r.pool && r.pool->device.rfind("cuda", 0) == 0;
    for (int slot = 0; slot < (on_gpu ? r.capacity : 1); ++slot) {
      r.run(inputs, slot);
      ++runs;
    }
  }
  return runs;
}

std::shared_ptr<PortModel> Port::find(const std::string& name) {
  std::shared_lock<std::shared_mutex> lock(models_mu_);
  auto it = models_.find(name);
  return it == models_.end() ? nullptr : it->second;
}

void Port::remove_model(const std::string& name) {
  std::shared_ptr<PortModel> model;
  {
    std::unique_lock<std::shared_mutex> lock(models_mu_);
    auto it = models_.find(name);
    if (it == models_.end()) return;
    model = it->second;
    models_.erase(it);
  }
  {
    std::lock_guard<std::mutex> lock(model->admit);
    model->closed = true;
  }
  model->freed.notify_all();
  // Runs past admission hold the weights shared: wait for them.
  std::unique_lock<std::shared_mutex> wait(model->weights);
}

void Port::flip(const std::string& name, const std::string& version) {
  auto model = find(name);
  if (!model) throw std::runtime_error("port: no model '" + name + "'");
  std::unique_lock<std::shared_mutex> lock(model->weights);
  for (auto& r : model->replicas) r.swap();
  model->version = version;
}

void Port::lock_weights(const std::string& name) {
  if (auto model = find(name)) model->weights.lock();
}

void Port::unlock_weights(const std::string& name, const std::string& version) {
  if (auto model = find(name)) {
    model->version = version;
    model->weights.unlock();
  }
}

// Lifecycle --------------------------------------------------------------------------

void Port::set_health(const std::string& service, bool serving) {
  for (auto& l : listeners_) {
    l->health->set(service, serving ? HealthService::SERVING : HealthService::NOT_SERVING);
  }
}

void Port::set_draining() {
  draining_ = true;
  for (auto& l : listeners_) l->health->shutdown();
}

bool Port::enter() {
  std::lock_guard<std::mutex> lock(idle_mu_);
  if (active_ >= config_.max_calls) return false;
  ++active_;
  return true;
}

bool Port::hold_runner(const std::string& name) {
  auto model = find(name);
  if (!model) return false;
  std::lock_guard<std::mutex> lock(model->admit);
  for (auto& r : model->replicas) {
    if (r.running < r.capacity) {
      ++r.running;
      ++r.pool->running;
      return true;
    }
  }
  return false;
}

void Port::release_runner(const std::string& name) {
  auto model = find(name);
  if (!model) return;
  {
    std::lock_guard<std::mutex> lock(model->admit);
    for (auto& r : model->replicas) {
      if (r.running > 0) {
        --r.running;
        --r.pool->running;
        break;
      }
    }
  }
  model->freed.notify_all();
}

void Port::leave() {
  std::lock_guard<std::mutex> lock(idle_mu_);
  if (--active_ == 0) idle_cv_.notify_all();
}

bool Port::wait_idle(double timeout_s) {
  std::unique_lock<std::mutex> lock(idle_mu_);
  return idle_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s),
                           [&] { return active_ == 0; });
}

void Port::stop(double grace_s) {
  auto deadline = std::chrono::system_clock::now() +
                  std::chrono::milliseconds(int64_t(std::max(0.0, grace_s) * 1000));
  for (auto& l : listeners_) {
    if (l->server) l->health->end_watches();
  }
  for (auto& l : listeners_) {
    if (l->server) l->server->Shutdown(deadline);
  }
  bridge_.close();
  {
    // ModelStreamInfer threads end once their calls do (the shutdown cancelled them).
    std::unique_lock<std::mutex> lock(stream_threads_mu_);
    if (!stream_threads_cv_.wait_until(lock, deadline + std::chrono::seconds(5),
                                       [&] { return stream_threads_ == 0; })) {
      log("stop: " + std::to_string(stream_threads_) + " ModelStreamInfer streams did not end");
    }
  }
  for (auto& l : listeners_) {
    if (l->server) {
      l->server->Wait();
      l->queue->shutdown();
      l->server.reset();
    }
  }
  {
    std::lock_guard<std::mutex> lock(log_mu_);
    log_closed_ = true;
  }
  log_cv_.notify_all();
}

void Port::log(std::string line) {
  {
    std::lock_guard<std::mutex> lock(log_mu_);
    if (log_lines_.size() >= 1000) log_lines_.pop_front();  // never grows without bound
    log_lines_.push_back(std::move(line));
  }
  log_cv_.notify_one();
}

std::vector<std::string> Port::pending_log() {
  std::lock_guard<std::mutex> lock(log_mu_);
  std::vector<std::string> out(log_lines_.begin(), log_lines_.end());
  log_lines_.clear();
  return out;
}

int Port::watchers() {
  int n = 0;
  for (auto& l : listeners_) n = std::max(n, l->health->watched());
  return n;
}

std::optional<std::string> Port::next_log() {
  std::unique_lock<std::mutex> lock(log_mu_);
  log_cv_.wait(lock, [&] { return log_closed_ || !log_lines_.empty(); });
  if (log_lines_.empty()) return std::nullopt;
  std::string line = std::move(log_lines_.front());
  log_lines_.pop_front();
  return line;
}

// Auth and limits -------------------------------------------------------------------

bool Port::authorize(const std::string& method, const grpc::ServerContextBase& ctx,
                     grpc::Status& refusal, bool& is_admin) {
  const auto& c = config_;
  is_admin = false;
  // No token configured: nothing to read (the metadata map is built on first access).
  if (c.admin_token.empty() && c.inference_token.empty()) return true;
  std::string header;
  bool has_header = false;
  for (const auto& [k, v] : ctx.client_metadata()) {
    if (k == "authorization") {
      header.assign(v.data(), v.size());
      has_header = true;
    }
  }
  is_admin = has_header && token_matches(header, c.admin_token);
  if (!c.inference_token.empty() && !always_on(method) && !is_admin) {
    if (!has_header) {
      refusal = {grpc::StatusCode::UNAUTHENTICATED,
                 method + " needs a token (metadata 'authorization: Bearer <token>')"};
      return false;
    }
    if (!token_matches(header, c.inference_token)) {
      refusal = {grpc::StatusCode::PERMISSION_DENIED, method + ": wrong token"};
      return false;
    }
  }
  return true;
}

bool Port::admit_stream() {
  int n = streams_.fetch_add(1);
  if (n >= config_.max_streams) {
    streams_.fetch_sub(1);
    return false;
  }
  return true;
}

void Port::release_stream() { streams_.fetch_sub(1); }

// The bridge ----------------------------------------------------------------------

void Port::bridged(std::shared_ptr<AsyncCall> accepted, bool admin_rpcs) {
  const grpc::GenericServerContext* ctx = &accepted->ctx;
  auto call = StreamCall::make(&bridge_, config_.stream_idle_s, std::move(accepted));
  call->id = bridge_.next_id();
  call->method = ctx->method();
  call->peer = ctx->peer();
  call->metadata = client_metadata(*ctx);
  call->deadline = ctx->deadline();
  const std::string& method = call->method;
  bool on = always_on(method);
  // Who may call what is decided by the interceptor (server/interceptors.py) for calls
  // answered in Python; here only what protects the port itself: drain and limits.
  call->admin_rpcs = admin_rpcs;
  if (draining_ && !on) {
    call->refuse({grpc::StatusCode::UNAVAILABLE, "server is shutting down"});
    return;
  }
  bool stream = config_.streaming.count(method) > 0;
  if (stream && !admit_stream()) {
    call->refuse({grpc::StatusCode::RESOURCE_EXHAUSTED,
                  short_name(method) + ": too many long-lived streams are open on this server (" +
                      std::to_string(config_.max_streams) + "); retry later"});
    return;
  }
  if (!on && !enter()) {
    if (stream) release_stream();
    call->refuse({grpc::StatusCode::RESOURCE_EXHAUSTED,
                  short_name(method) + ": the server is handling its limit of " +
                      std::to_string(config_.max_calls) + " calls; retry later"});
    return;
  }
  call->on_end = [this, stream, on] {
    if (stream) release_stream();
    if (!on) leave();
  };
  call->watch();
  if (method == kStreamInfer) {
    // Answered in C++, message by message, on a thread of its own (at most max_streams).
    grpc::Status refusal;
    bool is_admin = false;
    if (!authorize(method, *ctx, refusal, is_admin)) {
      call->refuse(refusal);
      return;
    }
    call->is_admin = is_admin;
    {
      std::lock_guard<std::mutex> lock(stream_threads_mu_);
      ++stream_threads_;
    }
    std::thread([this, call] {
      stream_infer(call);
      std::lock_guard<std::mutex> lock(stream_threads_mu_);
      if (--stream_threads_ == 0) stream_threads_cv_.notify_all();
    }).detach();
    return;
  }
  if (!bridge_.push(call)) {
    call->refuse({grpc::StatusCode::RESOURCE_EXHAUSTED,
                  short_name(method) + ": the server is busy (" +
                      std::to_string(config_.max_pending) + " calls waiting); retry later"});
  }
}

grpc::Status Port::forward(const Caller& caller, const std::string& method,
                           const grpc::ByteBuffer& request, bool is_admin, bool admin_rpcs,
                           grpc::ByteBuffer* resp) {
  auto call = std::make_shared<UnaryCall>(
      &bridge_, [&caller] { return caller.cancelled(); }, caller.ctx, request);
  call->id = bridge_.next_id();
  call->method = method;
  call->peer = caller.peer();
  call->metadata = caller.metadata();
  call->deadline = caller.deadline();
  call->is_admin = is_admin;
  call->admin_rpcs = admin_rpcs;
  if (!bridge_.push(call)) {
    return {grpc::StatusCode::RESOURCE_EXHAUSTED,
            short_name(method) + ": the server is busy (" + std::to_string(config_.max_pending) +
                " calls waiting); retry later"};
  }
  return call->wait(resp);
}

// Shared memory ---------------------------------------------------------------------

void Port::set_region(const std::string& kind, const std::string& name, at::Tensor bytes) {
  std::unique_lock<std::shared_mutex> lock(regions_mu_);
  regions_[{kind, name}] = std::move(bytes);
}

void Port::drop_region(const std::string& kind, const std::string& name) {
  at::Tensor gone;  // released outside the lock (a CUDA handle closes on release)
  {
    std::unique_lock<std::shared_mutex> lock(regions_mu_);
    auto it = regions_.find({kind, name});
    if (it == regions_.end()) return;
    gone = std::move(it->second);
    regions_.erase(it);
  }
}

// A system region whose object the client shrank while the daemon had it mapped
// (shared_mapping.cpp): it reads zeros past the new end from then on.
grpc::Status Port::shrunk(const std::string& region) {
  return invalid("shared-memory region '" + region +
                 "' shrank while the server had it mapped (its object is now smaller than "
                 "the registered byte_size); unregister it and register it again");
}

grpc::Status Port::shared_bytes(const wire::SharedRef& ref, int64_t want, const std::string& what,
                                at::Tensor& out, SharedUse& used) {
  if (!ref.region.size) {
    return invalid(what + ": shared_memory_byte_size or shared_memory_offset without "
                   "shared_memory_region");
  }
  if (ref.byte_size < 0) {
    return invalid(what + ": parameter shared_memory_byte_size must be a int64_param or "
                   "uint64_param");
  }
  std::string name = ref.region.str();
  at::Tensor region;
  int found = 0;
  {
    std::shared_lock<std::shared_mutex> lock(regions_mu_);
    for (const auto& [key, bytes] : regions_) {
      if (key.second == name) {
        region = bytes;
        ++found;
      }
    }
  }
  if (found == 0) return invalid(what + ": no shared-memory region named '" + name + "' is registered");
  if (found > 1) {
    return invalid(what + ": both a system and a CUDA region are named '" + name + "'; rename one");
  }
  if (region.is_cpu() && sigbus::faulted(region.data_ptr())) return shrunk(name);
  int64_t size = region.numel();
  if (ref.offset > size || ref.byte_size > size - ref.offset) {
    return invalid(what + ": bytes [" + std::to_string(ref.offset) + ", " +
                   std::to_string(uint64_t(ref.offset) + uint64_t(ref.byte_size)) +
                   ") lie outside shared-memory region '" + name + "' (" + std::to_string(size) +
                   " bytes)");
  }
  if (want >= 0 && ref.byte_size != want) {
    return invalid(what + ": shared_memory_byte_size is " + std::to_string(ref.byte_size) +
                   ", but the tensor has " + std::to_string(want) + " bytes");
  }
  out = region.narrow(0, ref.offset, ref.byte_size);
  if (region.is_cpu()) used.emplace_back(std::move(name), region.data_ptr());
  return grpc::Status::OK;
}

// The hot path ----------------------------------------------------------------------

grpc::Status Port::execute(const Caller& caller, PortModel& model, const GetInputs& get,
                           std::vector<at::Tensor>& outputs, std::string& version) {
  auto queued_at = Clock::now();
  PortReplica* replica = nullptr;
  int slot = 0;
  {
    std::unique_lock<std::mutex> lock(model.admit);
    auto pick = [&]() -> PortReplica* {
      PortReplica* best = nullptr;
      for (auto& r : model.replicas) {
        if (r.running < r.capacity && (!best || r.running < best->running)) best = &r;
      }
      return best;
    };
    if (model.closed) return {grpc::StatusCode::UNAVAILABLE, "model '" + model.name + "' is unloading"};
    replica = pick();
    if (!replica) {
      DevicePoolState* pool = model.replicas[0].pool;
      if (pool->waiting >= config_.max_queue) {
        return {grpc::StatusCode::RESOURCE_EXHAUSTED,
                "queue of " + pool->device + " is full (" + std::to_string(config_.max_queue) +
                    " waiting); retry later"};
      }
      ++pool->waiting;
      if (model.load) model.load->queued.fetch_add(1);
      auto deadline = caller.deadline();
      grpc::Status gave_up;
      while (!(replica = pick())) {
        if (model.closed) {
          gave_up = {grpc::StatusCode::UNAVAILABLE, "model '" + model.name + "' is unloading"};
          break;
        }
        auto now = std::chrono::system_clock::now();
        if (now >= deadline) {
          gave_up = {grpc::StatusCode::DEADLINE_EXCEEDED,
                     "deadline passed after " + std::to_string(since(queued_at)) +
                         "s in the queue of " + pool->device + "; not computed"};
          break;
        }
        if (caller.cancelled()) {
          gave_up = {grpc::StatusCode::CANCELLED, "cancelled in the queue of " + pool->device +
                                                      "; not computed"};
          break;
        }
        // Cancellation has no wake-up of its own: look again every 50 ms.
        model.freed.wait_until(lock, std::min(deadline, now + std::chrono::milliseconds(50)));
      }
      --pool->waiting;
      if (model.load) model.load->queued.fetch_sub(1);
      if (!replica) return gave_up;
    }
    ++replica->running;
    ++replica->pool->running;
    slot = replica->free_slots.back();
    replica->free_slots.pop_back();
  }
  double queued = since(queued_at);
  grpc::Status status = grpc::Status::OK;
  Clock::time_point started;
  double computed = 0;
  int64_t rows = 0;
  {
    std::shared_lock<std::shared_mutex> weights(model.weights);
    bool closed;
    {
      std::lock_guard<std::mutex> lock(model.admit);
      closed = model.closed;
    }
    if (closed) {
      status = {grpc::StatusCode::UNAVAILABLE, "model '" + model.name + "' is unloading"};
    } else {
      version = model.version;
      started = Clock::now();
      std::vector<at::Tensor> inputs;
      try {
        inputs = get();
        outputs = replica->run(inputs, slot);
        computed = since(started);
        if (model.batcher && !inputs.empty() && inputs[0].dim()) rows = inputs[0].size(0);
      } catch (const std::exception& e) {
        const auto* value_error = dynamic_cast<const c10::ValueError*>(&e);
        std::string msg = value_error ? value_error->what_without_backtrace() : strip_backtrace(e.what());
        std::string l = lower(msg);
        // Shape guards name the input; bounds checks fire on input values: the caller's.
        std::string tied = tied_dims(msg, inputs, model.inputs);
        if (!tied.empty()) {
          status = invalid("model '" + model.name + "' rejected the inputs: " + tied);
        } else if (value_error || l.find("input") != std::string::npos ||
                   l.find("out of bounds") != std::string::npos) {
          status = invalid("model '" + model.name + "' rejected the inputs: " + msg);
        } else {
          log("model '" + model.name + "': run failed: " + msg);
          status = {grpc::StatusCode::INTERNAL,
                    "model '" + model.name + "' failed to run; the server log has the details"};
        }
      }
    }
  }
  {
    std::lock_guard<std::mutex> lock(model.admit);
    --replica->running;
    --replica->pool->running;
    replica->free_slots.push_back(slot);
  }
  model.freed.notify_one();
  if (status.ok() && replica->stats) replica->stats->record(queued, computed);
  // Dynamic batching's runs by rows, with the same time (OIP ModelStatistics' batch_stats).
  if (status.ok() && rows > 0) stats_->batch(model.name, rows)->record(computed);
  return status;
}

grpc::Status Port::run(grpc::ServerContext* ctx, const grpc::ByteBuffer* raw,
                       grpc::ByteBuffer* resp, bool infer, bool admin_rpcs) {
  try {
    return serve(Caller{ctx, nullptr}, raw, resp, infer, admin_rpcs);
  } catch (const std::exception& e) {
    log(std::string(infer ? "ModelInfer" : "Run") + " failed: " + strip_backtrace(e.what()));
  } catch (...) {
    log(std::string(infer ? "ModelInfer" : "Run") + " failed with an unknown exception");
  }
  return {grpc::StatusCode::INTERNAL, "internal error; the server log has the details"};
}

grpc::Status Port::serve(const Caller& caller, const grpc::ByteBuffer* raw,
                         grpc::ByteBuffer* resp, bool infer, bool admin_rpcs) {
  auto began = Clock::now();
  static const std::string kRunMethod(kRun), kInferMethod(kInfer);
  const std::string& method = infer ? kInferMethod : kRunMethod;
  const std::string shorty = infer ? "ModelInfer" : "Run";
  std::atomic<int64_t>* in_flight = infer ? infer_in_flight_ : run_in_flight_;
  if (!enter()) {
    stats_->method("", shorty)->record(int(grpc::StatusCode::RESOURCE_EXHAUSTED), since(began));
    return {grpc::StatusCode::RESOURCE_EXHAUSTED,
            shorty + ": the server is handling its limit of " + std::to_string(config_.max_calls) +
                " calls; retry later"};
  }
  in_flight->fetch_add(1, std::memory_order_relaxed);
  struct Exit {  // however this call ends, thrown out of or not
    Port* port;
    std::atomic<int64_t>* in_flight;  // null once the call is Python's to count
    ~Exit() {
      if (in_flight) in_flight->fetch_sub(1, std::memory_order_relaxed);
      port->leave();
    }
  } on_exit{this, in_flight};
  MethodSeries* series = nullptr;
  auto done = [&](grpc::Status s) {
    stats_->hot(infer ? 1 : 0);
    if (series == nullptr) series = stats_->method("", shorty);
    series->record(int(s.error_code()), since(began));
    return clipped(s);
  };
  if (draining_) return done({grpc::StatusCode::UNAVAILABLE, "server is shutting down"});
  grpc::Status refusal;
  bool is_admin = false;
  if (caller.stream) {
    is_admin = caller.stream->is_admin;  // the stream was authorized as it began
  } else if (!authorize(method, *caller.ctx, refusal, is_admin)) {
    return done(refusal);
  }
  // No autograd anywhere on this path: torch's dispatcher skips its autograd and
  // view-tracking layers for every op of the run (the model's and ours).
  c10::InferenceMode no_autograd;

  // The request's bytes: gRPC's own slice when it is one, else joined once into torch's
  // allocator, laid out so the first payload is aligned. For a model on a GPU, large
  // requests are gathered into pinned memory.
  Payload payload;
  grpc::Slice single;
  std::vector<grpc::Slice> slices;
  if (raw->TrySingleSlice(&single).ok()) {
    slices.push_back(single);
  } else if (!raw->Dump(&slices).ok() || slices.empty()) {
    return done(invalid(shorty + ": the request is not a valid message"));
  }
  bool pinned = false;
  if (raw->Length() >= kPinnedBytes) {
    auto named = find(leading_model_name(slices[0].begin(), slices[0].end()));
    pinned = named && named->on_gpu;
  }
  if (slices.size() == 1 && !pinned) {
    auto keep = std::make_shared<grpc::Slice>(slices[0]);
    payload.begin = keep->begin();
    payload.end = keep->end();
    payload.keep = keep;
  } else {
    int64_t off = payload_offset(slices[0].begin(), slices[0].end(), infer);
    auto options = at::TensorOptions().dtype(at::kByte).pinned_memory(pinned);
    auto joined = std::make_shared<at::Tensor>(at::empty({int64_t(raw->Length() + kAlign)}, options));
    auto* base = joined->data_ptr<uint8_t>();
    size_t shift = off < 0 ? 0 : (kAlign - (reinterpret_cast<uintptr_t>(base) + off) % kAlign) % kAlign;
    uint8_t* w = base + shift;
    for (auto& s : slices) {
      std::memcpy(w, s.begin(), s.size());
      w += s.size();
    }
    slices.clear();
    payload.begin = base + shift;
    payload.end = w;
    payload.keep = joined;
    copied_bytes_.fetch_add(raw->Length(), std::memory_order_relaxed);
  }

  auto decoding = Clock::now();  // compute_input: from here to the run (queue aside)
  // Parse with bounds; anything the hot path does not serve goes to Python.
  std::shared_ptr<PortModel> model;
  wire::RunRequest run_req;
  wire::InferRequest infer_req;
  std::vector<wire::WireTensor>* tensors;
  std::string err;
  wire::ParseError perr;
  if (infer) {
    perr = wire::parse_infer_request(payload.begin, payload.end, config_.limits, infer_req);
    tensors = &infer_req.inputs;
  } else {
    perr = wire::parse_run_request(payload.begin, payload.end, config_.limits, run_req);
    tensors = &run_req.inputs;
  }
  if (!perr.empty()) {
    std::string msg = perr.detail;
    if (perr.input >= 0) {
      std::string label = "input " + std::to_string(perr.input);
      const auto& t = (*tensors)[size_t(perr.input)];
      if (infer && !t.name.empty()) label += " ('" + t.name + "')";
      msg = label + ": " + msg;
    }
    return done(invalid(shorty + ": " + msg));
  }
  model = find(infer ? infer_req.model_name.str() : run_req.model);
  if (!model || (infer && (!infer_req.plain || (infer_req.model_version.size &&
                                                 infer_req.model_version.str() != model->version)))) {
    // Python answers (it records the call's metrics itself).
    in_flight->fetch_sub(1, std::memory_order_relaxed);  // the interceptor counts it
    on_exit.in_flight = nullptr;
    payload = Payload();  // the joined copy, if any, is not needed: Python gets the slices
    return forward(caller, method, *raw, is_admin, admin_rpcs, resp);
  }
  series = infer ? model->infer_stats : model->run_stats;
  const auto& specs = model->inputs;

  // Inputs, in the model's order: Run is positional, ModelInfer names them.
  std::vector<const wire::WireTensor*> ordered(specs.size(), nullptr);
  std::vector<Span> datas(specs.size());
  auto label = [&](size_t i) -> const std::string& {
    return infer ? specs[i].infer_label : specs[i].run_label;
  };
  if (infer) {
    // As in Triton, one raw_input_contents entry per input not in shared memory.
    size_t sent = 0;
    for (const auto& t : *tensors) sent += !t.shared.used();
    if (!infer_req.raw.empty() && infer_req.raw.size() != sent) {
      return done(invalid("raw_input_contents has " + std::to_string(infer_req.raw.size()) +
                          " entries for " + std::to_string(sent) +
                          " inputs (inputs in shared memory have none)"));
    }
    size_t next_raw = 0;
    for (size_t i = 0; i < tensors->size(); ++i) {
      const auto& t = (*tensors)[i];
      size_t slot = specs.size();
      for (size_t s = 0; s < specs.size(); ++s) {
        if (specs[s].name == t.name) slot = s;
      }
      if (slot == specs.size()) {
        std::string names;
        for (size_t s = 0; s < specs.size(); ++s) names += (s ? ", " : "") + specs[s].name;
        return done(invalid("input '" + t.name + "': model '" + model->name +
                            "' has no such input (its inputs: " + names + ")"));
      }
      const std::string& what = label(slot);
      if (ordered[slot]) return done(invalid(what + " is given twice"));
      ordered[slot] = &t;
      if (t.shared.used()) continue;  // its bytes are found below, once their size is known
      if (infer_req.raw.empty()) {
        return done(invalid(what + " carries no data (neither contents nor raw_input_contents)"));
      }
      datas[slot] = infer_req.raw[next_raw++];
    }
    std::string missing;
    for (size_t s = 0; s < specs.size(); ++s) {
      if (!ordered[s]) missing += (missing.empty() ? "'" : ", '") + specs[s].name + "'";
    }
    if (!missing.empty()) {
      return done(invalid("model '" + model->name + "': missing input(s) " + missing));
    }
  } else {
    if (tensors->size() != specs.size()) {
      std::string names;
      for (size_t i = 0; i < specs.size(); ++i) names += (i ? ", " : "") + specs[i].name;
      return done(invalid("model '" + model->name + "' takes " + std::to_string(specs.size()) +
                          " inputs (" + names + "), got " + std::to_string(tensors->size())));
    }
    for (size_t i = 0; i < specs.size(); ++i) {
      ordered[i] = &(*tensors)[i];
      datas[i] = (*tensors)[i].data;
    }
  }

  // Which outputs answer, in which order, and where each one's bytes go (an undefined
  // tensor: the reply; else its shared-memory bytes), checked before the run.
  std::vector<size_t> chosen;
  std::vector<at::Tensor> destinations;
  SharedUse shared_use;  // the system regions read or written: checked once the reply is made
  for (const auto& o : infer_req.outputs) {
    std::string what = "requested output '" + o.name + "'";
    auto at = std::find(model->outputs.begin(), model->outputs.end(), o.name);
    if (at == model->outputs.end()) {
      std::string names;
      for (size_t s = 0; s < model->outputs.size(); ++s) names += (s ? ", " : "") + model->outputs[s];
      return done(invalid(what + ": model '" + model->name + "' has no such output (its outputs: " +
                          names + ")"));
    }
    chosen.push_back(size_t(at - model->outputs.begin()));
    destinations.emplace_back();
    if (o.shared.used()) {
      grpc::Status s = shared_bytes(o.shared, -1, what, destinations.back(), shared_use);
      if (!s.ok()) return done(s);
    }
  }

  std::vector<at::Tensor> inputs;
  inputs.reserve(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const auto& t = *ordered[i];
    const auto& spec = specs[i];
    const std::string& what = label(i);
    const wire::DType* type = infer ? wire::by_oip(t.datatype) : wire::by_wire(t.dtype);
    if (!type) {
      if (infer && t.datatype == "BYTES") {
        return done({grpc::StatusCode::UNIMPLEMENTED,
                     what + ": BYTES tensors are not supported; aotiserve models take numeric tensors"});
      }
      return done(invalid(what + ": unknown or unsupported " +
                          (infer ? "datatype '" + t.datatype + "'" : "dtype " + std::to_string(int32_t(t.dtype)))));
    }
    if (spec.dtype && spec.dtype != type) {
      return done(invalid(what + (infer ? ": datatype must be " + spec.dtype->oip + ", got " + type->oip
                                        : ": dtype must be " + spec.dtype->name + ", got " + type->name)));
    }
    uint64_t numel;
    bool too_many;
    err = wire::checked_numel(t.shape, t.rank, config_.limits, what, numel, too_many);
    if (!err.empty()) {
      return done(too_many ? grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, err) : invalid(err));
    }
    if (spec.has_shape) {
      if (t.shape.size() != spec.shape.size()) {
        return done(invalid(what + ": expected " + std::to_string(spec.shape.size()) + " dimensions " +
                            wire::dims(spec.shape) + ", got shape " + wire::dims(t.shape)));
      }
      for (size_t d = 0; d < t.shape.size(); ++d) {
        if (spec.shape[d] >= 0 && t.shape[d] != spec.shape[d]) {
          return done(invalid(what + ": dimension " + std::to_string(d) + " must be " +
                              std::to_string(spec.shape[d]) + " (shape " + wire::dims(spec.shape) +
                              "), got shape " + wire::dims(t.shape)));
        }
        if (spec.shape[d] >= 0) continue;
        // The package's dynamic-dim guards (io_specs.check_bounds says the same).
        int64_t lo = d < spec.lower.size() ? spec.lower[d] : 0;
        int64_t hi = d < spec.upper.size() ? spec.upper[d] : -1;
        auto at = [&] {  // the message's start, made only for a refusal
          return what + ": dimension " + std::to_string(d) + " is " + std::to_string(t.shape[d]);
        };
        if (t.shape[d] < lo) {
          std::string why = lo == 2 ? config_.lowerbound_hint
                                    : "the model was exported with a minimum of " +
                                          std::to_string(lo) + " for this dim";
          return done(invalid(at() + ", below the smallest size the model accepts (" +
                              std::to_string(lo) + "; shape " + spec.bounds_text + "); " + why));
        }
        if (hi >= 0 && t.shape[d] > hi) {
          return done(invalid(at() + ", above the largest size the model accepts (" +
                              std::to_string(hi) + "; shape " + spec.bounds_text +
                              "); split the request or recompile the model with a larger "
                              "maximum for this Dim"));
        }
      }
    }
    uint64_t want = numel * c10::elementSize(type->scalar);
    if (infer && t.shared.used()) {
      at::Tensor bytes;
      grpc::Status s = shared_bytes(t.shared, int64_t(want), what, bytes, shared_use);
      if (!s.ok()) return done(s);
      if (numel == 0) {
        inputs.push_back(at::empty(t.shape, type->scalar));
        continue;
      }
      if (reinterpret_cast<uintptr_t>(bytes.data_ptr()) % kAlign) bytes = bytes.clone();
      if (type->scalar == at::kBool && (bytes > 1).any().item<bool>()) {
        return done(invalid(what + ": bool tensor holds bytes other than 0 and 1"));
      }
      at::Tensor input = bytes.view(type->scalar).view(t.shape);
      if (input.is_cuda() && !model->on_gpu) {
        input = input.cpu();  // a CUDA region's input for a model on the CPU comes to the host
      } else if (!input.is_cuda() && model->on_gpu && want >= kPinnedBytes && !input.is_pinned()) {
        // A system region the daemon could not page-lock (shared_memory.py pins them once
        // CUDA is up) is pageable memory: CUDA would copy it to the device through its own
        // staging, synchronously. One copy into pinned memory (torch's cached pinned
        // blocks) lets the run's host-to-device copy go straight and on the slot's stream,
        // as for a request's own bytes.
        at::Tensor pinned = at::empty(t.shape, at::TensorOptions().dtype(type->scalar).pinned_memory(true));
        std::memcpy(pinned.data_ptr(), input.data_ptr(), want);
        copied_bytes_.fetch_add(want, std::memory_order_relaxed);
        input = pinned;
      }
      inputs.push_back(input);
      continue;
    }
    const Span& data = datas[i];
    if (data.size != want) {
      return done(invalid(what + ": expected " + std::to_string(want) + " bytes for " + type->name +
                          wire::dims(t.shape) + ", got " + std::to_string(data.size)));
    }
    if (type->scalar == at::kBool) {
      for (uint64_t b = 0; b < data.size; ++b) {
        if (data.data[b] > 1) return done(invalid(what + ": bool tensor holds bytes other than 0 and 1"));
      }
    }
    if (numel == 0) {
      inputs.push_back(at::empty(t.shape, type->scalar));
    } else if (reinterpret_cast<uintptr_t>(data.data) % kAlign == 0) {
      auto keep = payload.keep;  // the tensor (and any output viewing it) holds the request
      inputs.push_back(at::from_blob(const_cast<uint8_t*>(data.data), t.shape,
                                     [keep](void*) mutable { keep.reset(); },
                                     at::TensorOptions().dtype(type->scalar)));
    } else {
      inputs.push_back(at::empty(t.shape, type->scalar));
      std::memcpy(inputs.back().data_ptr(), data.data, data.size);
      copied_bytes_.fetch_add(data.size, std::memory_order_relaxed);
    }
  }

  for (const auto& group : model->ties) {
    auto in_range = [&](int64_t i, int64_t d) {
      return i >= 0 && size_t(i) < inputs.size() && d >= 0 && d < inputs[size_t(i)].dim();
    };
    bool differ = false;
    int64_t first = -1;
    for (const auto& [i, d] : group) {
      if (!in_range(i, d)) continue;
      int64_t n = inputs[size_t(i)].size(d);
      differ |= first >= 0 && n != first;
      if (first < 0) first = n;
    }
    if (!differ) continue;  // the message only for a refusal: nothing built per request
    std::string parts;
    for (const auto& [i, d] : group) {
      if (!in_range(i, d)) continue;
      parts += (parts.empty() ? "" : ", ") + label(size_t(i)) + " dimension " +
               std::to_string(d) + " is " + std::to_string(inputs[size_t(i)].size(d));
    }
    return done(invalid("model '" + model->name +
                        "': the model gives these dimensions one size, but " + parts));
  }

  if (model->load) model->load->record_input(since(decoding));
  std::vector<at::Tensor> outputs;
  std::string version;
  grpc::Status status;
  struct InFlight {  // aotiserve_model_in_flight_requests, however this returns
    ModelLoad* l;
    explicit InFlight(ModelLoad* load) : l(load) { if (l) l->in_flight.fetch_add(1); }
    ~InFlight() { if (l) l->in_flight.fetch_sub(1); }
  } in_flight_here(model->load);
  if (model->batcher) {
    PortModel& m = *model;
    BatchExecute run = [&](const GetInputs& get, std::vector<at::Tensor>& outs,
                           std::string& ver) { return execute(caller, m, get, outs, ver); };
    status = m.batcher->run(
        std::move(inputs), run,
        [&m] { return m.load && m.load->in_flight.load(std::memory_order_relaxed) > 1; }, outputs,
        version);
  } else {
    status = execute(caller, *model, [&inputs] { return std::move(inputs); }, outputs, version);
  }
  inputs.clear();
  if (!status.ok()) return done(status);

  // The reply, framed by hand around the outputs' bytes.
  auto encoding = Clock::now();  // compute_output: from here to the reply's bytes
  ReplyWriter out(copied_bytes_);
  if (infer) {
    auto& p = out.pending();
    wire::put_string(p, 1, model->name);
    wire::put_string(p, 2, version);
    if (infer_req.id.size) {
      wire::put_header(p, 3, infer_req.id.size);
      p.append(reinterpret_cast<const char*>(infer_req.id.data), infer_req.id.size);
    }
    // Every output in model order, unless the request named some. As in Triton, an output
    // in shared memory has an empty raw entry where others have theirs (raw_output_contents
    // lines up with outputs), and none when all are.
    const bool named = !infer_req.outputs.empty();
    const size_t count = named ? chosen.size() : outputs.size();
    const at::Tensor in_reply;  // no shared memory: the output's bytes go in the reply
    bool any_raw = !named || std::any_of(destinations.begin(), destinations.end(),
                                         [](const at::Tensor& d) { return !d.defined(); });
    std::vector<at::Tensor> contiguous;
    for (size_t k = 0; k < count; ++k) {
      size_t i = named ? chosen[k] : k;
      if (i >= outputs.size()) {
        return done({grpc::StatusCode::INTERNAL, "model '" + model->name + "' answered " +
                                                     std::to_string(outputs.size()) + " outputs"});
      }
      at::Tensor c = outputs[i].is_contiguous() ? outputs[i] : outputs[i].contiguous();
      const wire::DType* type = wire::by_scalar(c.scalar_type());
      std::string name = i < model->outputs.size() ? model->outputs[i] : "output__" + std::to_string(i);
      if (!type || type->oip.empty()) {
        return done({grpc::StatusCode::UNIMPLEMENTED,
                     "output '" + name + "': dtype " + std::string(c10::toString(c.scalar_type())) +
                         " has no Open Inference Protocol datatype; use the native aotiserve.v1 API"});
      }
      std::string shape, head;
      for (auto d : c.sizes()) wire::put_varint(shape, uint64_t(d));
      wire::put_string(head, 1, name);
      wire::put_string(head, 2, type->oip);
      if (!shape.empty()) {
        wire::put_header(head, 3, shape.size());
        head += shape;
      }
      const at::Tensor& dest = named ? destinations[k] : in_reply;
      if (dest.defined()) {
        int64_t nbytes = c.numel() * int64_t(c.element_size());
        if (nbytes > dest.numel()) {
          return done(invalid("output '" + name + "': its " + std::to_string(nbytes) +
                              " bytes do not fit the " + std::to_string(dest.numel()) +
                              " bytes of shared memory the request gave it "
                              "(shared_memory_byte_size)"));
        }
        if (nbytes) dest.narrow(0, 0, nbytes).copy_(c.reshape({-1}).view(at::kByte));
        copied_bytes_.fetch_add(uint64_t(nbytes), std::memory_order_relaxed);
        const auto& ref = infer_req.outputs[k].shared;
        put_parameter(head, "shared_memory_region", ref.region.str(), 0);
        put_parameter(head, "shared_memory_byte_size", "", nbytes);
        if (ref.offset) put_parameter(head, "shared_memory_offset", "", ref.offset);
      }
      wire::put_header(p, 5, head.size());
      p += head;
      contiguous.push_back(dest.defined() ? at::Tensor() : std::move(c));
    }
    for (const auto& c : contiguous) {
      if (!c.defined()) {
        if (any_raw) wire::put_header(out.pending(), 6, 0);
        continue;
      }
      wire::put_header(out.pending(), 6, c.numel() * c.element_size());
      out.data(c);
    }
  } else {
    for (const auto& o : outputs) {
      at::Tensor c = o.is_contiguous() ? o : o.contiguous();
      const wire::DType* type = wire::by_scalar(c.scalar_type());
      uint64_t nbytes = c.numel() * c.element_size();
      std::string head;
      put_tensor_fields(head, c, type ? type->wire : 0);
      wire::put_header(head, 3, nbytes);
      wire::put_header(out.pending(), 1, head.size() + nbytes);
      out.pending() += head;
      out.data(c);
    }
    wire::put_string(out.pending(), 2, version);
  }
  for (const auto& [region, base] : shared_use) {
    if (sigbus::faulted(base)) return done(shrunk(region));
  }
  *resp = out.done();
  if (model->load) model->load->record_output(since(encoding));
  if (caller.ctx) caller.ctx->AddTrailingMetadata(kTrailer, version);
  return done(grpc::Status::OK);
}

void Port::stream_infer(std::shared_ptr<StreamCall> call) {
  auto began = Clock::now();
  Caller caller{nullptr, call.get()};
  while (auto request = call->read()) {
    grpc::ByteBuffer answer;
    grpc::Status status;
    try {
      status = serve(caller, &*request, &answer, /*infer=*/true, call->admin_rpcs);
    } catch (const std::exception& e) {
      log(std::string("ModelStreamInfer failed: ") + strip_backtrace(e.what()));
      status = {grpc::StatusCode::INTERNAL, "internal error; the server log has the details"};
    }
    if (!call->write(stream_answer(status, answer, *request))) break;  // the stream ended
  }
  // Nothing more to read: the client closed its side (OK), went away, or stayed idle past
  // the limit (read() ended the call with DEADLINE_EXCEEDED already).
  bool ended_here = call->active();
  call->finish(int(grpc::StatusCode::OK), "", {});
  stats_->method("", "ModelStreamInfer")
      ->record(int(ended_here ? grpc::StatusCode::OK : grpc::StatusCode::CANCELLED), since(began));
}

}  // namespace aotiserve
