// The completion queue of every call off the hot path: health and the bridge.
//
// These calls run on gRPC's async API over one queue that does not listen for
// connections, drained by one thread of its own. The hot path's sync threads stay the
// port's pollers: with a callback service beside them, gRPC's callback poller read most
// requests and handed each to a hot-path thread (a wake-up per call), and every further
// thread waiting on this queue would do the same (bench/control_queue.py measures both).
// A control call's operations complete here; none of their handlers block.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

namespace aotiserve {

class ControlQueue {
 public:
  using Done = std::function<void(bool ok)>;
  ControlQueue(std::unique_ptr<grpc::ServerCompletionQueue> cq, int threads);
  ~ControlQueue();
  grpc::ServerCompletionQueue* cq() { return cq_.get(); }
  // Starts an operation whose completion runs `done` on this queue's threads: `start`
  // gets the tag to pass to gRPC. False (and nothing started) once the queue is shut.
  bool start(Done done, const std::function<void(void*)>& start);
  // After the server's shutdown: no operation starts any more; drains and joins.
  void shutdown();

 private:
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::vector<std::thread> threads_;
  std::shared_mutex open_mu_;
  bool open_ = true;
};

// One call of the async generic service: its context and stream. Each operation holds
// the call until it completes; `on_done` runs once the call is over (finished or
// cancelled; `cancelled` says which), however far its owner got.
class AsyncCall : public std::enable_shared_from_this<AsyncCall> {
 public:
  using Done = ControlQueue::Done;
  explicit AsyncCall(ControlQueue* queue) : queue_(queue), stream_(&ctx) {}
  grpc::GenericServerContext ctx;

  // Before the call is requested: arms the end-of-call notice, then asks for a call.
  bool request(grpc::AsyncGenericService* service, Done accepted);
  bool read(grpc::ByteBuffer* buf, Done done);
  bool write(const grpc::ByteBuffer& buf, Done done);
  bool finish(const grpc::Status& status, Done done = nullptr);
  bool write_and_finish(const grpc::ByteBuffer& buf, const grpc::Status& status);
  // Runs `fn(cancelled)` when the call is over, now if it already is.
  void on_done(std::function<void(bool cancelled)> fn);

 private:
  bool op(Done done, const std::function<void(void*)>& start);
  ControlQueue* queue_;
  grpc::GenericServerAsyncReaderWriter stream_;
  std::mutex mu_;
  std::function<void(bool)> on_done_;
  bool over_ = false, cancelled_ = false;
};

}  // namespace aotiserve
