// grpc.health.v1.Health in C++: Check and Watch are answered on the control queue
// (control_queue.h), so probes are answered whatever Python and the hot path are
// doing. Only the service names the daemon serves (and "") can be checked or watched;
// Health/List is answered in Python (server/health.py, through the bridge).
#pragma once

#include <grpcpp/grpcpp.h>

#include "control_queue.h"

#include <functional>
#include <map>
#include <mutex>
#include <memory>
#include <set>
#include <string>

namespace aotiserve {

class HealthService {
 public:
  enum Status { SERVING = 1, NOT_SERVING = 2 };
  // `admit_stream` takes one of the port's long-lived stream slots (false: none
  // left), `release_stream` gives it back.
  HealthService(std::function<bool()> admit_stream, std::function<void()> release_stream);
  ~HealthService();
  static constexpr const char* kCheck = "/grpc.health.v1.Health/Check";
  static constexpr const char* kWatch = "/grpc.health.v1.Health/Watch";
  // Answers an accepted call of kCheck / kWatch.
  void check(std::shared_ptr<AsyncCall> call);
  void watch(std::shared_ptr<AsyncCall> call);
  void set(const std::string& service, Status status);
  // After this every service reads NOT_SERVING and set() is ignored.
  void shutdown();
  // Ends every Watch (the server is stopping).
  void end_watches();
  int watched();  // service names with a Watch open

 private:
  class Watcher;
  void start_watch(std::shared_ptr<AsyncCall> call, const grpc::ByteBuffer& req);
  bool lookup(const std::string& service, Status& status);

  std::function<bool()> admit_stream_;
  std::function<void()> release_stream_;
  std::mutex mu_;
  std::map<std::string, Status> statuses_;
  std::set<std::shared_ptr<Watcher>> watchers_;
  bool shutdown_ = false;
};

}  // namespace aotiserve
