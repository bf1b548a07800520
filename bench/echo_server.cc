// The gRPC C++ floor: a bare unary echo with no work, built like the daemon's port.
//
// Same service and method as bench/echo_server.py (/bench.Echo/Echo, bytes in, bytes
// out) and the same payloads (a fixed reply read from --reply-file, or --resp-size zero
// bytes), served the way runner_ext/csrc/port.cpp serves Run: a sync grpc::Service whose
// one method takes and returns grpc::ByteBuffer (no protobuf), MAX_POLLERS = --workers
// and a ResourceQuota of max(--workers + 8, --max-threads) threads (the daemon's defaults:
// grpc_workers 32, max_concurrent_rpcs 1024), abseil's deadlock detection off. The reply
// is one refcounted slice made at start, so answering copies nothing. The figure is gRPC
// C++'s own per-call cost here.
//
// Built on demand by bench/cpp_echo.py:
//   g++ -O2 -std=c++17 echo_server.cc -o echo_server $(pkg-config --cflags --libs grpc++)
// Writes {"port": N, "pid": P} to --ready-file once serving; SIGTERM/SIGINT stop it.
//
// --trailer KEY=VALUE adds that trailing metadata to every reply, as the daemon adds its
// aotiserve-weights-version trailer to every Run (bench/hot_path_cost.py: what the trailer
// costs gRPC and the client).
//
// --control none|callback|async (default none) registers, beside the echo, an idle generic
// service as the daemon could serve its control RPCs: gRPC's callback API, or the async API
// on a non-listening completion queue drained by --control-threads threads (the daemon's
// choice: async, 1). bench/control_queue.py measures what each costs the echo.

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/support/method_handler.h>
#include <grpcpp/generic/async_generic_service.h>
#include <absl/synchronization/mutex.h>

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

class EchoService : public grpc::Service {
 public:
  EchoService(grpc::Slice reply, std::string trailer_key, std::string trailer_value)
      : reply_(std::move(reply)),
        trailer_key_(std::move(trailer_key)),
        trailer_value_(std::move(trailer_value)) {
    AddMethod(new grpc::internal::RpcServiceMethod(
        "/bench.Echo/Echo", grpc::internal::RpcMethod::NORMAL_RPC,
        new grpc::internal::RpcMethodHandler<EchoService, grpc::ByteBuffer, grpc::ByteBuffer>(
            [](EchoService* self, grpc::ServerContext* ctx, const grpc::ByteBuffer*,
               grpc::ByteBuffer* resp) {
              *resp = grpc::ByteBuffer(&self->reply_, 1);
              if (!self->trailer_key_.empty()) {
                ctx->AddTrailingMetadata(self->trailer_key_, self->trailer_value_);
              }
              return grpc::Status::OK;
            },
            this)));
  }

 private:
  grpc::Slice reply_;
  std::string trailer_key_, trailer_value_;  // empty key: no trailer
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "echo_server: %s\nusage: echo_server --ready-file PATH (--reply-file PATH | "
               "--resp-size N) [--workers N] [--max-threads N] [--max-msg BYTES]\n"
               "                   [--control none|callback|async] [--control-threads N]\n"
               "                   [--trailer KEY=VALUE]\n",
               why);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::string ready_file, reply_file;
  long resp_size = -1, max_msg = 160L << 20;
  int workers = 32, max_threads = 1024, control_threads = 1;
  std::string control = "none", trailer;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) usage(("missing value for " + a).c_str());
    const char* v = argv[++i];
    if (a == "--ready-file") ready_file = v;
    else if (a == "--reply-file") reply_file = v;
    else if (a == "--resp-size") resp_size = std::atol(v);
    else if (a == "--workers") workers = std::atoi(v);
    else if (a == "--max-threads") max_threads = std::atoi(v);
    else if (a == "--max-msg") max_msg = std::atol(v);
    else if (a == "--control") control = v;
    else if (a == "--control-threads") control_threads = std::atoi(v);
    else if (a == "--trailer") trailer = v;
    else usage(("unknown argument " + a).c_str());
  }
  if (ready_file.empty()) usage("--ready-file is required");
  if (control != "none" && control != "callback" && control != "async") usage("bad --control");
  std::string reply;
  if (!reply_file.empty()) {
    std::ifstream f(reply_file, std::ios::binary);
    if (!f) usage("cannot read --reply-file");
    reply.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  } else if (resp_size >= 0) {
    reply.assign(size_t(resp_size), '\0');
  } else {
    usage("--reply-file or --resp-size is required");
  }

  // SIGTERM/SIGINT are taken by sigwait below: block them before gRPC starts its threads.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  // As the port does (port.cpp): abseil's deadlock detection, on in Debian's build, off.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);

  size_t eq = trailer.find('=');
  if (!trailer.empty() && (eq == std::string::npos || eq == 0)) usage("--trailer takes KEY=VALUE");
  EchoService service{grpc::Slice(reply), trailer.substr(0, eq == std::string::npos ? 0 : eq),
                      eq == std::string::npos ? "" : trailer.substr(eq + 1)};
  int port = 0;
  grpc::ServerBuilder b;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  b.SetMaxReceiveMessageSize(int(max_msg));
  b.SetMaxSendMessageSize(int(max_msg));
  b.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  b.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, std::max(2, workers));
  grpc::ResourceQuota quota("bench-echo");
  quota.SetMaxThreads(std::max(workers + 8, max_threads));
  b.SetResourceQuota(quota);
  b.RegisterService(&service);
  grpc::CallbackGenericService callback_service;
  grpc::AsyncGenericService async_service;
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  if (control == "callback") b.RegisterCallbackGenericService(&callback_service);
  if (control == "async") {
    b.RegisterAsyncGenericService(&async_service);
    cq = b.AddCompletionQueue(/*is_frequently_polled=*/false);
  }
  std::unique_ptr<grpc::Server> server = b.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "echo_server: could not bind 127.0.0.1:0\n");
    return 1;
  }
  // The async service: one call requested (none arrives), threads waiting on the queue.
  grpc::GenericServerContext control_ctx;
  grpc::GenericServerAsyncReaderWriter control_stream(&control_ctx);
  std::vector<std::thread> drainers;
  if (cq) {
    async_service.RequestCall(&control_ctx, &control_stream, cq.get(), cq.get(), &control_ctx);
    for (int i = 0; i < control_threads; ++i) {
      drainers.emplace_back([&] {
        void* tag;
        bool ok;
        while (cq->Next(&tag, &ok)) {
        }
      });
    }
  }
  {
    std::string tmp = ready_file + ".tmp";
    std::ofstream out(tmp);
    out << "{\"port\": " << port << ", \"pid\": " << getpid() << "}";
    out.close();
    if (!out || std::rename(tmp.c_str(), ready_file.c_str()) != 0) {
      std::fprintf(stderr, "echo_server: cannot write %s\n", ready_file.c_str());
      return 1;
    }
  }
  int sig = 0;
  sigwait(&stop_signals, &sig);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  if (cq) {
    cq->Shutdown();
    for (auto& t : drainers) t.join();
  }
  return 0;
}
