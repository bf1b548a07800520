// See control_queue.h.
#include "control_queue.h"

#include <pthread.h>

namespace aotiserve {

ControlQueue::ControlQueue(std::unique_ptr<grpc::ServerCompletionQueue> cq, int threads)
    : cq_(std::move(cq)) {
  for (int i = 0; i < threads; ++i) {
    threads_.emplace_back([this] {
      pthread_setname_np(pthread_self(), "aotiserve-ctl");
      void* tag = nullptr;
      bool ok = false;
      while (cq_->Next(&tag, &ok)) {
        auto* done = static_cast<Done*>(tag);
        (*done)(ok);
        delete done;
      }
    });
  }
}

ControlQueue::~ControlQueue() { shutdown(); }

bool ControlQueue::start(Done done, const std::function<void(void*)>& start) {
  std::shared_lock<std::shared_mutex> lock(open_mu_);
  if (!open_) return false;
  start(new Done(std::move(done)));
  return true;
}

void ControlQueue::shutdown() {
  {
    std::unique_lock<std::shared_mutex> lock(open_mu_);
    if (!open_) return;
    open_ = false;
  }
  cq_->Shutdown();
  for (auto& t : threads_) t.join();
  threads_.clear();
}

// AsyncCall -------------------------------------------------------------------------

bool AsyncCall::op(Done done, const std::function<void(void*)>& start) {
  auto self = shared_from_this();
  return queue_->start(
      [self, done = std::move(done)](bool ok) {
        if (done) done(ok);
      },
      start);
}

bool AsyncCall::request(grpc::AsyncGenericService* service, Done accepted) {
  auto self = shared_from_this();
  bool armed = queue_->start(
      [self](bool) {
        std::function<void(bool)> fn;
        bool cancelled;
        {
          std::lock_guard<std::mutex> lock(self->mu_);
          self->over_ = true;
          self->cancelled_ = cancelled = self->ctx.IsCancelled();
          fn = std::move(self->on_done_);
        }
        if (fn) fn(cancelled);
      },
      [this](void* tag) { ctx.AsyncNotifyWhenDone(tag); });
  if (!armed) return false;
  auto* cq = queue_->cq();
  return op(std::move(accepted),
            [&](void* tag) { service->RequestCall(&ctx, &stream_, cq, cq, tag); });
}

bool AsyncCall::read(grpc::ByteBuffer* buf, Done done) {
  return op(std::move(done), [&](void* tag) { stream_.Read(buf, tag); });
}

bool AsyncCall::write(const grpc::ByteBuffer& buf, Done done) {
  return op(std::move(done), [&](void* tag) { stream_.Write(buf, tag); });
}

bool AsyncCall::finish(const grpc::Status& status, Done done) {
  return op(std::move(done), [&](void* tag) { stream_.Finish(status, tag); });
}

bool AsyncCall::write_and_finish(const grpc::ByteBuffer& buf, const grpc::Status& status) {
  return op(nullptr,
            [&](void* tag) { stream_.WriteAndFinish(buf, grpc::WriteOptions(), status, tag); });
}

void AsyncCall::on_done(std::function<void(bool cancelled)> fn) {
  bool now, cancelled;
  {
    std::lock_guard<std::mutex> lock(mu_);
    now = over_;
    cancelled = cancelled_;
    if (!now) on_done_ = std::move(fn);
  }
  if (now) fn(cancelled);
}

}  // namespace aotiserve
