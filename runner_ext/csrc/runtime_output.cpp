#include "runtime_output.h"

#include <grpc/support/log.h>

#include <cstring>
#include <iostream>
#include <mutex>
#include <streambuf>
#include <utility>
#include <vector>

namespace aotiserve {
namespace {

void on_grpc_log(gpr_log_func_args* args);

// Installed into std::cerr once, for good: whole lines to the newest sink, or to the
// stream buffer std::cerr had before when there is none. gRPC's own log lines (a failed
// TLS handshake, which any peer can cause) take the same way.
class Lines : public std::streambuf {
 public:
  Lines() : previous_(std::cerr.rdbuf(this)) { gpr_set_log_function(&on_grpc_log); }

  void grpc_line(const gpr_log_func_args& a) {
    const char* file = a.file ? std::strrchr(a.file, '/') : nullptr;
    std::string line = std::string("grpc: ") + (a.message ? a.message : "") + " (" +
                       (file ? file + 1 : (a.file ? a.file : "?")) + ":" + std::to_string(a.line) +
                       ")";
    std::lock_guard<std::mutex> lock(mu_);
    send(std::move(line));
  }

  void push(const RuntimeOutput* owner, std::function<void(std::string)> sink) {
    std::lock_guard<std::mutex> lock(mu_);
    sinks_.emplace_back(owner, std::move(sink));
  }

  void pop(const RuntimeOutput* owner) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = sinks_.begin(); it != sinks_.end(); ++it) {
      if (it->first == owner) {
        sinks_.erase(it);
        break;
      }
    }
  }

 protected:
  int overflow(int c) override {
    if (c == traits_type::eof()) return traits_type::not_eof(c);
    char ch = static_cast<char>(c);
    xsputn(&ch, 1);
    return c;
  }

  std::streamsize xsputn(const char* s, std::streamsize n) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (std::streamsize i = 0; i < n; ++i) {
      if (s[i] == '\n') {
        emit();
      } else if (line_.size() < kMaxLine) {
        line_ += s[i];
      }
    }
    return n;
  }

  int sync() override {
    std::lock_guard<std::mutex> lock(mu_);
    return sinks_.empty() && previous_ ? previous_->pubsync() : 0;
  }

 private:
  static constexpr size_t kMaxLine = 4096;

  void emit() {  // under mu_
    std::string line = std::exchange(line_, std::string());
    if (!line.empty()) send("model runtime: " + line);
  }

  void send(std::string line) {  // under mu_
    if (!sinks_.empty()) {
      sinks_.back().second(std::move(line));
    } else if (previous_) {
      line += '\n';
      previous_->sputn(line.data(), std::streamsize(line.size()));
      previous_->pubsync();
    }
  }

  std::mutex mu_;
  std::streambuf* previous_;
  std::string line_;
  std::vector<std::pair<const RuntimeOutput*, std::function<void(std::string)>>> sinks_;
};

Lines& lines() {
  static Lines* installed = new Lines();  // never destroyed: std::cerr keeps pointing at it
  return *installed;
}

void on_grpc_log(gpr_log_func_args* args) {
  if (args != nullptr) lines().grpc_line(*args);
}

}  // namespace

RuntimeOutput::RuntimeOutput(std::function<void(std::string)> sink) {
  lines().push(this, std::move(sink));
}

RuntimeOutput::~RuntimeOutput() { lines().pop(this); }

}  // namespace aotiserve
