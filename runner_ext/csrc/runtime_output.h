// What the model runtime prints to std::cerr (AOTInductor prints the error of every failed
// run there, and any caller can make a run fail) and gRPC's own log lines (a failed TLS
// handshake, which any peer can cause): while a port serves, those lines go to its log as
// "model runtime: ..." and "grpc: ...", which the daemon rate-limits (server/port.py),
// instead of straight to stderr.
#pragma once

#include <functional>
#include <string>

namespace aotiserve {

class RuntimeOutput {
 public:
  // From now until destruction, std::cerr's lines go to `sink` (the newest capture wins;
  // with none, they go to stderr as before).
  explicit RuntimeOutput(std::function<void(std::string)> sink);
  ~RuntimeOutput();
  RuntimeOutput(const RuntimeOutput&) = delete;
  RuntimeOutput& operator=(const RuntimeOutput&) = delete;
};

}  // namespace aotiserve
