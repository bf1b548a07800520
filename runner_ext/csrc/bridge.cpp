// See bridge.h.
#include "bridge.h"
#include "status_message.h"

namespace aotiserve {
namespace {

grpc::ByteBuffer to_buffer(const std::string& s) {
  grpc::Slice slice(s.data(), s.size());
  return grpc::ByteBuffer(&slice, 1);
}

}  // namespace

Metadata client_metadata(const grpc::ServerContextBase& ctx) {
  Metadata md;
  for (const auto& [k, v] : ctx.client_metadata()) {
    md.emplace_back(std::string(k.data(), k.size()), std::string(v.data(), v.size()));
  }
  return md;
}

BridgeCall::~BridgeCall() { ended(); }

void BridgeCall::ended() {
  if (!ended_) {
    ended_ = true;
    if (on_end) on_end();
  }
}

double BridgeCall::time_remaining() const {
  if (deadline == std::chrono::system_clock::time_point::max()) return -1;
  auto left = std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count();
  return std::max(0.0, left);
}

// Bridge --------------------------------------------------------------------------

bool Bridge::push(std::shared_ptr<BridgeCall> call) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_ || pending_calls_ >= max_pending_) return false;
    ++pending_calls_;
    items_.push_back({std::move(call), 0});
  }
  ready_.notify_one();
  return true;
}

void Bridge::cancelled(uint64_t id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    items_.push_back({nullptr, id});
  }
  ready_.notify_one();
}

std::optional<BridgeItem> Bridge::next() {
  std::unique_lock<std::mutex> lock(mu_);
  ready_.wait(lock, [&] { return closed_ || !items_.empty(); });
  if (items_.empty()) return std::nullopt;
  BridgeItem item = std::move(items_.front());
  items_.pop_front();
  if (item.call) --pending_calls_;
  return item;
}

void Bridge::close() {
  std::deque<BridgeItem> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    left.swap(items_);
    pending_calls_ = 0;
  }
  ready_.notify_all();
  for (auto& item : left) {
    if (item.call) item.call->finish(int(grpc::StatusCode::UNAVAILABLE), "server is shutting down", {});
  }
}

// StreamCall ------------------------------------------------------------------------

std::shared_ptr<StreamCall> StreamCall::make(Bridge* bridge, double idle_s,
                                             std::shared_ptr<AsyncCall> call) {
  std::shared_ptr<StreamCall> self(new StreamCall(bridge, idle_s, std::move(call)));
  self->self_ = self;
  return self;
}

void StreamCall::watch() {
  auto self = self_.lock();
  call_->on_done([self](bool cancelled) { self->over(cancelled); });
}

// The call is over: finished, or cancelled by the client, its deadline or shutdown.
void StreamCall::over(bool cancelled) {
  uint64_t cancelled_id = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    over_ = true;
    if (cancelled && !cancelled_) {
      cancelled_ = true;
      cancelled_id = id;
    }
    cv_.notify_all();
  }
  if (cancelled_id) bridge_->cancelled(cancelled_id);
  ended();
}

void StreamCall::finish_locked(const grpc::Status& status) {
  if (finished_ || over_) return;
  finished_ = true;
  call_->finish(status);
}

void StreamCall::refuse(const grpc::Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  finish_locked(status);
}

std::optional<grpc::ByteBuffer> StreamCall::read() {
  std::unique_lock<std::mutex> lock(mu_);
  if (finished_ || cancelled_ || over_ || reads_done_ || reading_) return std::nullopt;
  auto self = self_.lock();
  reading_ = call_->read(&rbuf_, [self](bool ok) {
    std::lock_guard<std::mutex> lock(self->mu_);
    self->reading_ = false;
    self->read_ok_ = ok;
    if (!ok) self->reads_done_ = true;
    self->cv_.notify_all();
  });
  if (!reading_) return std::nullopt;
  // A cancelled call's pending read fails too, but maybe later: don't wait for it (the
  // read holds this call until it completes).
  auto done = [&] { return !reading_ || cancelled_ || over_; };
  auto idle = std::chrono::duration<double>(idle_s_);
  bool arrived = idle_s_ <= 0 ? (cv_.wait(lock, done), true) : cv_.wait_for(lock, idle, done);
  if (!arrived) {
    // The client sent nothing for the idle limit: end the call (the read then fails).
    finish_locked({grpc::StatusCode::DEADLINE_EXCEEDED,
                   method + ": no message from the client for " + std::to_string(int(idle_s_)) +
                       " s; stream closed"});
    return std::nullopt;
  }
  if (reading_ || !read_ok_) return std::nullopt;
  grpc::ByteBuffer out;
  out.Swap(&rbuf_);
  return out;
}

bool StreamCall::write(const std::string& message) {
  std::unique_lock<std::mutex> lock(mu_);
  if (finished_ || cancelled_ || over_ || writing_) return false;
  wbuf_ = to_buffer(message);
  auto self = self_.lock();
  writing_ = call_->write(wbuf_, [self](bool ok) {
    std::lock_guard<std::mutex> lock(self->mu_);
    self->writing_ = false;
    self->write_ok_ = ok;
    self->cv_.notify_all();
  });
  if (!writing_) return false;
  cv_.wait(lock, [&] { return !writing_; });
  return write_ok_;
}

void StreamCall::finish(int code, const std::string& details, const Metadata& trailers) {
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_ || over_) return;
  for (const auto& [k, v] : trailers) call_->ctx.AddTrailingMetadata(k, v);
  finish_locked(grpc::Status(grpc::StatusCode(code), clip_message(details)));
}

bool StreamCall::active() {
  std::lock_guard<std::mutex> lock(mu_);
  return !finished_ && !cancelled_ && !over_;
}

// UnaryCall -------------------------------------------------------------------------

std::optional<grpc::ByteBuffer> UnaryCall::read() {
  std::lock_guard<std::mutex> lock(mu_);
  auto out = std::move(request_);
  request_.reset();
  return out;
}

bool UnaryCall::write(const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_) return false;
  response_ = message;
  has_response_ = true;
  return true;
}

void UnaryCall::finish(int code, const std::string& details, const Metadata& trailers) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;
    finished_ = true;
    status_ = grpc::Status(grpc::StatusCode(code), clip_message(details));
    trailers_ = trailers;
  }
  cv_.notify_all();
}

bool UnaryCall::active() {
  std::lock_guard<std::mutex> lock(mu_);
  return !finished_ && !cancelled_();
}

grpc::Status UnaryCall::wait(grpc::ByteBuffer* response) {
  std::unique_lock<std::mutex> lock(mu_);
  bool told = false;
  while (!cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return finished_; })) {
    if (!told && cancelled_()) {  // lets a run queued in Python leave its queue
      told = true;
      bridge_->cancelled(id);
    }
  }
  if (trailers_to_) {
    for (const auto& [k, v] : trailers_) trailers_to_->AddTrailingMetadata(k, v);
  }
  if (status_.ok() && has_response_) *response = to_buffer(response_);
  ended();
  return status_;
}

}  // namespace aotiserve
