// grpc.health.v1.Health in C++: Check and Watch answer from gRPC's own threads, so
// probes are answered whatever Python and the hot path are doing. Only the service
// names the daemon serves (and "") can be checked or watched; Health/List is not
// served (UNIMPLEMENTED).
#pragma once

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/service_type.h>

#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>

namespace aotiserve {

class HealthService : public grpc::Service {
 public:
  enum Status { SERVING = 1, NOT_SERVING = 2 };
  // `admit_stream` takes one of the port's long-lived stream slots (false: none
  // left), `release_stream` gives it back.
  HealthService(std::function<bool()> admit_stream, std::function<void()> release_stream);
  ~HealthService() override;
  void set(const std::string& service, Status status);
  // After this every service reads NOT_SERVING and set() is ignored.
  void shutdown();
  // Ends every Watch (the server is stopping).
  void end_watches();
  int watched();  // service names with a Watch open

 private:
  class Watcher;
  grpc::ServerUnaryReactor* check(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                  grpc::ByteBuffer* resp);
  grpc::ServerWriteReactor<grpc::ByteBuffer>* watch(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* req);
  bool lookup(const std::string& service, Status& status);

  std::function<bool()> admit_stream_;
  std::function<void()> release_stream_;
  std::recursive_mutex mu_;  // a Watcher's OnDone may run inline under it
  std::map<std::string, Status> statuses_;
  std::set<Watcher*> watchers_;
  bool shutdown_ = false;
};

}  // namespace aotiserve
