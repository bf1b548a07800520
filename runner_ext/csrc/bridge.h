// The bridge: every RPC the port does not answer in C++ is handed, as a BridgeCall, to
// a bounded pool of Python threads (server/bridge.py) that run the Python servicers.
// A Python thread reads the call's next message only when it wants it and each write
// waits until gRPC has taken the previous one, so a client stream is back-pressured
// end to end; the gRPC threads never wait for Python or the GIL.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include "control_queue.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace aotiserve {

using Metadata = std::vector<std::pair<std::string, std::string>>;

class BridgeCall {
 public:
  virtual ~BridgeCall();
  uint64_t id = 0;
  std::string method;
  std::string peer;
  Metadata metadata;
  std::chrono::system_clock::time_point deadline;
  bool is_admin = false;
  // Whether the listener it came through takes mutating RPCs (false: the daemon has a
  // separate admin port).
  bool admin_rpcs = true;
  // Runs once, when the call is finished (stream and call counts of the port).
  std::function<void()> on_end;

  // The next request message; nullopt once the client has sent its last, the call
  // ended, or the client sent nothing for the idle limit (the call then ends with
  // DEADLINE_EXCEEDED). Blocks: call without the GIL.
  virtual std::optional<grpc::ByteBuffer> read() = 0;
  // Sends one response message; false when the call has ended. Blocks until gRPC took it.
  virtual bool write(const std::string& message) = 0;
  virtual void finish(int code, const std::string& details, const Metadata& trailers) = 0;
  virtual bool active() = 0;
  // Seconds left before the deadline; negative: none.
  double time_remaining() const;

 protected:
  void ended();

 private:
  bool ended_ = false;
};

// What a Python thread takes next: a call to handle, or the id of a call that was
// cancelled (its Python callbacks run).
struct BridgeItem {
  std::shared_ptr<BridgeCall> call;
  uint64_t cancelled = 0;
};

class Bridge {
 public:
  explicit Bridge(size_t max_pending) : max_pending_(max_pending) {}
  // False when max_pending calls already wait for a Python thread, or it is closed.
  bool push(std::shared_ptr<BridgeCall> call);
  void cancelled(uint64_t id);
  // Blocks for the next item; nullopt once closed and empty.
  std::optional<BridgeItem> next();
  void close();
  uint64_t next_id() { return ++ids_; }

 private:
  size_t max_pending_;
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<BridgeItem> items_;
  size_t pending_calls_ = 0;
  bool closed_ = false;
  std::atomic<uint64_t> ids_{0};
};

// A call that arrived on the generic service (any method the port has no C++ handler
// for): a bidi stream of raw messages driven by the Python thread that handles it.
class StreamCall : public BridgeCall {
 public:
  static std::shared_ptr<StreamCall> make(Bridge* bridge, double idle_s,
                                          std::shared_ptr<AsyncCall> call);
  // From here on the end of the gRPC call ends this one (on_end runs then): call once
  // on_end is set.
  void watch();
  // Ends the call from C++ before Python saw it (refused: auth, limits, draining).
  void refuse(const grpc::Status& status);
  const grpc::GenericServerContext& context() const { return call_->ctx; }

  std::optional<grpc::ByteBuffer> read() override;
  bool write(const std::string& message) override;
  void finish(int code, const std::string& details, const Metadata& trailers) override;
  bool active() override;

 private:
  StreamCall(Bridge* bridge, double idle_s, std::shared_ptr<AsyncCall> call)
      : bridge_(bridge), idle_s_(idle_s), call_(std::move(call)) {}
  void finish_locked(const grpc::Status& status);
  void over(bool cancelled);

  Bridge* bridge_;
  double idle_s_;
  std::shared_ptr<AsyncCall> call_;
  std::weak_ptr<StreamCall> self_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool finished_ = false, cancelled_ = false, over_ = false, reads_done_ = false;
  bool reading_ = false, read_ok_ = false;
  bool writing_ = false, write_ok_ = false;
  grpc::ByteBuffer rbuf_, wbuf_;
};

// A call of a C++-served method that the hot path hands to Python (a model it does
// not serve itself: dynamic batching, not loaded, ...): the request is already read,
// the gRPC thread that holds it waits for Python's answer.
class UnaryCall : public BridgeCall {
 public:
  // `cancelled`: whether the caller went away; `trailers_to`: where Python's trailing
  // metadata goes (null: nowhere, e.g. one message of a stream).
  UnaryCall(Bridge* bridge, std::function<bool()> cancelled, grpc::ServerContextBase* trailers_to,
            const grpc::ByteBuffer& request)
      : bridge_(bridge), cancelled_(std::move(cancelled)), trailers_to_(trailers_to),
        request_(request) {}  // shares the slices, no copy
  std::optional<grpc::ByteBuffer> read() override;
  bool write(const std::string& message) override;
  void finish(int code, const std::string& details, const Metadata& trailers) override;
  bool active() override;
  // Waits for finish(); the response (if any) goes into `response`.
  grpc::Status wait(grpc::ByteBuffer* response);

 private:
  Bridge* bridge_;
  std::function<bool()> cancelled_;
  grpc::ServerContextBase* trailers_to_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<grpc::ByteBuffer> request_;
  std::string response_;
  bool has_response_ = false, finished_ = false;
  grpc::Status status_;
  Metadata trailers_;
};

Metadata client_metadata(const grpc::ServerContextBase& ctx);

}  // namespace aotiserve
