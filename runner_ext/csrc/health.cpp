// See health.h.
#include "health.h"

#include <algorithm>

#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/support/callback_common.h>
#include <grpcpp/support/server_callback.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>

#include "wire.h"

namespace aotiserve {
namespace {

// Reads a message across gRPC's slices without joining them: a hostile request costs
// no copy of its size (only the service name is copied).
class SliceReader {
 public:
  explicit SliceReader(std::vector<grpc::Slice> slices) : slices_(std::move(slices)) {}
  bool done() {
    while (i_ < slices_.size() && off_ == slices_[i_].size()) next();
    return i_ == slices_.size();
  }
  bool byte(uint8_t& b) {
    if (done()) return false;
    b = slices_[i_].begin()[off_++];
    return true;
  }
  bool varint(uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b;
      if (!byte(b)) return false;
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  }
  // Skips (out null) or copies `n` bytes.
  bool take(uint64_t n, std::string* out) {
    while (n > 0) {
      if (done()) return false;
      size_t k = std::min<uint64_t>(n, slices_[i_].size() - off_);
      if (out) out->append(reinterpret_cast<const char*>(slices_[i_].begin() + off_), k);
      off_ += k;
      n -= k;
    }
    return true;
  }

 private:
  void next() {
    ++i_;
    off_ = 0;
  }
  std::vector<grpc::Slice> slices_;
  size_t i_ = 0, off_ = 0;
};

// HealthCheckRequest{service = 1}; "" when absent. False: not a valid message, or more
// than kMaxFields fields.
bool parse_service(const grpc::ByteBuffer* req, std::string& service) {
  std::vector<grpc::Slice> slices;
  if (!req->Dump(&slices).ok()) return false;
  SliceReader r(std::move(slices));
  int64_t fields = 0;
  while (!r.done()) {
    uint64_t tag, v;
    if (!r.varint(tag) || (tag >> 3) < 1 || (tag >> 3) > 0x1FFFFFFF) return false;
    if (++fields > wire::kMaxFields) return false;
    switch (tag & 7) {
      case 0: if (!r.varint(v)) return false; break;
      case 1: if (!r.take(8, nullptr)) return false; break;
      case 5: if (!r.take(4, nullptr)) return false; break;
      case 2:
        if (!r.varint(v)) return false;
        if (tag == (1 << 3 | 2)) {
          service.clear();
          if (!r.take(v, &service)) return false;
        } else if (!r.take(v, nullptr)) {
          return false;
        }
        break;
      default: return false;
    }
  }
  return true;
}

// As server/health.py words it: the name, cut at 64 characters.
std::string unknown(const std::string& service) {
  std::string shown = service.size() > 64 ? service.substr(0, 64) + "..." : service;
  return "health: this server serves no service named '" + shown + "'";
}

grpc::ByteBuffer response(int status) {
  std::string out;
  out.push_back(char(1 << 3 | 0));
  wire::put_varint(out, uint64_t(status));
  grpc::Slice slice(out.data(), out.size());
  return grpc::ByteBuffer(&slice, 1);
}

}  // namespace

class HealthService::Watcher : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  Watcher(HealthService* owner, std::string service, bool counted)
      : owner_(owner), service_(std::move(service)), counted_(counted) {}

  // Sends `status` now, or after the write in flight (only the latest is kept).
  // gRPC operations start outside the lock: their reactions may run inline.
  void send(int status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_ || status == last_) return;
      if (writing_) {
        next_ = status;
        return;
      }
      writing_ = true;
      last_ = status;
      buf_ = response(status);
    }
    StartWrite(&buf_);
  }
  void end(const grpc::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(status);
  }
  void OnWriteDone(bool ok) override {
    int again = -1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (ok && !finished_ && next_ >= 0 && next_ != last_) again = next_;
      next_ = -1;
    }
    if (!ok) {
      end(grpc::Status::CANCELLED);
    } else if (again >= 0) {
      send(again);
    }
  }
  void OnCancel() override { end(grpc::Status::CANCELLED); }
  void OnDone() override {
    {
      std::lock_guard<std::recursive_mutex> lock(owner_->mu_);
      owner_->watchers_.erase(this);
    }
    if (counted_) owner_->release_stream_();
    delete this;
  }
  const std::string& service() const { return service_; }

 private:
  HealthService* owner_;
  std::string service_;
  bool counted_;
  std::mutex mu_;
  bool writing_ = false, finished_ = false;
  int next_ = -1, last_ = -1;
  grpc::ByteBuffer buf_;
};

HealthService::HealthService(std::function<bool()> admit_stream,
                             std::function<void()> release_stream)
    : admit_stream_(std::move(admit_stream)), release_stream_(std::move(release_stream)) {
  AddMethod(new grpc::internal::RpcServiceMethod(
      "/grpc.health.v1.Health/Check", grpc::internal::RpcMethod::NORMAL_RPC, nullptr));
  MarkMethodCallback(0, new grpc::internal::CallbackUnaryHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
                            [this](grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                   grpc::ByteBuffer* resp) { return check(ctx, req, resp); }));
  AddMethod(new grpc::internal::RpcServiceMethod(
      "/grpc.health.v1.Health/Watch", grpc::internal::RpcMethod::SERVER_STREAMING, nullptr));
  MarkMethodCallback(
      1, new grpc::internal::CallbackServerStreamingHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
             [this](grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req) {
               return watch(ctx, req);
             }));
}

HealthService::~HealthService() = default;

bool HealthService::lookup(const std::string& service, Status& status) {
  auto it = statuses_.find(service);
  if (it == statuses_.end()) return false;
  status = shutdown_ ? NOT_SERVING : it->second;
  return true;
}

void HealthService::set(const std::string& service, Status status) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (shutdown_) return;
  statuses_[service] = status;
  for (auto* w : std::set<Watcher*>(watchers_)) {
    if (w->service() == service) w->send(status);
  }
}

void HealthService::shutdown() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  shutdown_ = true;
  for (auto* w : std::set<Watcher*>(watchers_)) w->send(NOT_SERVING);
}

int HealthService::watched() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  std::set<std::string> names;
  for (auto* w : watchers_) names.insert(w->service());
  return int(names.size());
}

void HealthService::end_watches() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  for (auto* w : std::set<Watcher*>(watchers_)) w->end(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is shutting down"));
}

grpc::ServerUnaryReactor* HealthService::check(grpc::CallbackServerContext* ctx,
                                               const grpc::ByteBuffer* req,
                                               grpc::ByteBuffer* resp) {
  auto* reactor = ctx->DefaultReactor();
  std::string service;
  if (!parse_service(req, service)) {
    reactor->Finish({grpc::StatusCode::INVALID_ARGUMENT, "Check: the request is not a valid message, or has more than 64 fields (the limit)"});
    return reactor;
  }
  Status status;
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (!lookup(service, status)) {
      reactor->Finish({grpc::StatusCode::NOT_FOUND, unknown(service)});
      return reactor;
    }
  }
  *resp = response(status);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* HealthService::watch(grpc::CallbackServerContext* ctx,
                                                                 const grpc::ByteBuffer* req) {
  std::string service;
  bool valid = parse_service(req, service);
  Status status = NOT_SERVING;
  bool known = false;
  if (valid) {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    known = lookup(service, status);
  }
  bool counted = valid && known && admit_stream_();
  auto* w = new Watcher(this, service, counted);
  if (!valid) {
    w->end({grpc::StatusCode::INVALID_ARGUMENT, "Watch: the request is not a valid message, or has more than 64 fields (the limit)"});
  } else if (!known) {
    // Nothing is kept for a name the daemon does not serve.
    w->end({grpc::StatusCode::NOT_FOUND, unknown(service)});
  } else if (!counted) {
    w->end({grpc::StatusCode::RESOURCE_EXHAUSTED,
            "Watch: too many long-lived streams are open on this server; retry later"});
  } else {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    watchers_.insert(w);
    w->send(shutdown_ ? NOT_SERVING : status);
  }
  return w;
}

}  // namespace aotiserve
