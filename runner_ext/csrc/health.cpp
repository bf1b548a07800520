// See health.h.
#include "health.h"

#include <algorithm>

#include <optional>

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

// One Watch: the latest status goes out, one write at a time; the call holds its
// stream slot until it is over.
class HealthService::Watcher : public std::enable_shared_from_this<Watcher> {
 public:
  Watcher(std::shared_ptr<AsyncCall> call, std::string service)
      : call_(std::move(call)), service_(std::move(service)) {}

  // Sends `status` now, or after the write in flight (only the latest is kept).
  void send(int status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_ || status == last_) return;
    if (writing_) {
      next_ = status;
      return;
    }
    start_write(status);
  }
  // Ends the call with `status` (after the write in flight, if any).
  void end(const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;
    finished_ = true;
    if (writing_) {
      ending_ = status;
      return;
    }
    call_->finish(status);
  }
  // The call is over: nothing more is sent.
  void over() {
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = true;
    ending_.reset();
  }
  const std::string& service() const { return service_; }

 private:
  void start_write(int status) {  // under mu_
    last_ = status;
    buf_ = response(status);
    auto self = shared_from_this();
    writing_ = call_->write(buf_, [self](bool ok) { self->written(ok); });
  }
  void written(bool ok) {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (finished_) {
      if (ending_) call_->finish(*ending_);
      ending_.reset();
      return;
    }
    if (!ok) {
      finished_ = true;
      call_->finish(grpc::Status::CANCELLED);
      return;
    }
    if (next_ >= 0 && next_ != last_) start_write(next_);
    next_ = -1;
  }

  std::shared_ptr<AsyncCall> call_;
  std::string service_;
  std::mutex mu_;
  bool writing_ = false, finished_ = false;
  int next_ = -1, last_ = -1;
  std::optional<grpc::Status> ending_;
  grpc::ByteBuffer buf_;
};

HealthService::HealthService(std::function<bool()> admit_stream,
                             std::function<void()> release_stream)
    : admit_stream_(std::move(admit_stream)), release_stream_(std::move(release_stream)) {}

HealthService::~HealthService() = default;

bool HealthService::lookup(const std::string& service, Status& status) {
  auto it = statuses_.find(service);
  if (it == statuses_.end()) return false;
  status = shutdown_ ? NOT_SERVING : it->second;
  return true;
}

void HealthService::set(const std::string& service, Status status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (shutdown_) return;
  statuses_[service] = status;
  for (const auto& w : watchers_) {
    if (w->service() == service) w->send(status);
  }
}

void HealthService::shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  shutdown_ = true;
  for (const auto& w : watchers_) w->send(NOT_SERVING);
}

int HealthService::watched() {
  std::lock_guard<std::mutex> lock(mu_);
  std::set<std::string> names;
  for (const auto& w : watchers_) names.insert(w->service());
  return int(names.size());
}

void HealthService::end_watches() {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& w : watchers_) {
    w->end(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is shutting down"));
  }
}

void HealthService::check(std::shared_ptr<AsyncCall> call) {
  auto req = std::make_shared<grpc::ByteBuffer>();
  call->read(req.get(), [this, call, req](bool ok) {
    std::string service;
    if (!ok || !parse_service(req.get(), service)) {
      call->finish({grpc::StatusCode::INVALID_ARGUMENT,
                    "Check: the request is not a valid message, or has more than 64 fields "
                    "(the limit)"});
      return;
    }
    Status status;
    bool known;
    {
      std::lock_guard<std::mutex> lock(mu_);
      known = lookup(service, status);
    }
    if (!known) {
      call->finish({grpc::StatusCode::NOT_FOUND, unknown(service)});
    } else {
      call->write_and_finish(response(status), grpc::Status::OK);
    }
  });
}

void HealthService::watch(std::shared_ptr<AsyncCall> call) {
  auto req = std::make_shared<grpc::ByteBuffer>();
  call->read(req.get(), [this, call, req](bool ok) {
    if (!ok) {
      call->finish({grpc::StatusCode::INVALID_ARGUMENT, "Watch: the call carried no request"});
      return;
    }
    start_watch(call, *req);
  });
}

void HealthService::start_watch(std::shared_ptr<AsyncCall> call, const grpc::ByteBuffer& req) {
  std::string service;
  if (!parse_service(&req, service)) {
    call->finish({grpc::StatusCode::INVALID_ARGUMENT,
                  "Watch: the request is not a valid message, or has more than 64 fields (the "
                  "limit)"});
    return;
  }
  Status status = NOT_SERVING;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!lookup(service, status)) {
      // Nothing is kept for a name the daemon does not serve.
      call->finish({grpc::StatusCode::NOT_FOUND, unknown(service)});
      return;
    }
  }
  if (!admit_stream_()) {
    call->finish({grpc::StatusCode::RESOURCE_EXHAUSTED,
                  "Watch: too many long-lived streams are open on this server; retry later"});
    return;
  }
  auto w = std::make_shared<Watcher>(call, service);
  {
    std::lock_guard<std::mutex> lock(mu_);
    watchers_.insert(w);
    w->send(shutdown_ ? NOT_SERVING : status);
  }
  call->on_done([this, w](bool) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      watchers_.erase(w);
    }
    w->over();
    release_stream_();
  });
}

}  // namespace aotiserve
