// A status message travels in the grpc-message trailer, percent-encoded (up to 3 bytes per
// byte); clients refuse trailers past 8-16 KiB and then report RESOURCE_EXHAUSTED instead
// of the real error. Messages repeat what the caller sent (a model, input or region name),
// so every status the port sends is clipped to kMaxMessageBytes: its head, its tail and how
// much was left out between (server/errors.py clips the same way).
#pragma once

#include <grpcpp/support/status.h>

#include <string>

namespace aotiserve {

constexpr size_t kMaxMessageBytes = 1536;

inline std::string clip_message(const std::string& message) {
  constexpr size_t kHead = 1024, kTail = 384;
  if (message.size() <= kMaxMessageBytes) return message;
  // Cut on UTF-8 character boundaries (never before a continuation byte).
  size_t head = kHead;
  while (head > 0 && (static_cast<unsigned char>(message[head]) & 0xC0) == 0x80) --head;
  size_t tail = message.size() - kTail;
  while (tail < message.size() && (static_cast<unsigned char>(message[tail]) & 0xC0) == 0x80) ++tail;
  return message.substr(0, head) + "\u2026[" + std::to_string(tail - head) + " bytes left out]\u2026" +
         message.substr(tail);
}

inline grpc::Status clipped(const grpc::Status& s) {
  if (s.error_message().size() <= kMaxMessageBytes) return s;
  return grpc::Status(s.error_code(), clip_message(s.error_message()));
}

}  // namespace aotiserve
