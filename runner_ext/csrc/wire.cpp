// See wire.h.
#include "wire.h"

#include <map>
#include <mutex>
#include <sstream>

namespace aotiserve::wire {
namespace {

std::vector<DType>& table() {
  static std::vector<DType> t;
  return t;
}

constexpr uint64_t kVarint = 0, kFixed64 = 1, kBytes = 2, kFixed32 = 5;

}  // namespace

void set_dtypes(std::vector<DType> t) { table() = std::move(t); }

const DType* by_wire(uint64_t wire) {
  for (const auto& d : table()) {
    if (d.wire == wire) return &d;
  }
  return nullptr;
}

const DType* by_scalar(at::ScalarType scalar) {
  for (const auto& d : table()) {
    if (d.scalar == scalar) return &d;
  }
  return nullptr;
}

const DType* by_oip(const std::string& oip) {
  for (const auto& d : table()) {
    if (!d.oip.empty() && d.oip == oip) return &d;
  }
  return nullptr;
}

bool read_varint(const uint8_t*& p, const uint8_t* end, uint64_t& v) {
  v = 0;
  for (int shift = 0; p < end && shift < 64; shift += 7) {
    uint8_t b = *p++;
    v |= uint64_t(b & 0x7f) << shift;
    if (!(b & 0x80)) return true;
  }
  return false;
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(char(v | 0x80));
    v >>= 7;
  }
  out.push_back(char(v));
}

bool read_bytes(const uint8_t*& p, const uint8_t* end, const uint8_t*& body, uint64_t& len) {
  if (!read_varint(p, end, len) || len > uint64_t(end - p)) return false;
  body = p;
  p += len;
  return true;
}

bool skip_field(const uint8_t*& p, const uint8_t* end, uint64_t wire_type) {
  uint64_t v;
  const uint8_t* body;
  switch (wire_type) {
    case kVarint: return read_varint(p, end, v);
    case kFixed64: if (end - p < 8) return false; p += 8; return true;
    case kFixed32: if (end - p < 4) return false; p += 4; return true;
    case kBytes: return read_bytes(p, end, body, v);
    default: return false;  // groups: never in these messages
  }
}

void put_header(std::string& out, uint32_t field, uint64_t len) {
  put_varint(out, uint64_t(field) << 3 | kBytes);
  put_varint(out, len);
}

void put_string(std::string& out, uint32_t field, const std::string& s) {
  if (s.empty()) return;
  put_header(out, field, s.size());
  out += s;
}

std::string dims(const std::vector<int64_t>& shape) {
  return dims(at::IntArrayRef(shape));
}

std::string dims(at::IntArrayRef shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

std::string checked_numel(const std::vector<int64_t>& shape, const Limits& limits,
                          const std::string& what, uint64_t& numel, bool& too_many) {
  numel = 1;
  too_many = false;
  bool zero = false;
  for (auto d : shape) {
    if (d < 0) return what + ": negative dimension " + std::to_string(d) + " in shape " + dims(shape);
    if (d > limits.max_elements) {
      return what + ": dimension " + std::to_string(d) + " in shape " + dims(shape) +
             " exceeds the limit of " + std::to_string(limits.max_elements) + " elements";
    }
    if (d == 0) zero = true;
    // Checked even past a zero dimension: [0, 2^62, 2^62] names an impossible tensor.
    if (numel > uint64_t(limits.max_elements) / uint64_t(std::max<int64_t>(d, 1))) {
      too_many = !zero;
      return what + ": shape " + dims(shape) + " has more than " +
             std::to_string(limits.max_elements) + " elements";
    }
    numel *= uint64_t(std::max<int64_t>(d, 1));
  }
  if (zero) numel = 0;
  return "";
}

namespace {

// A repeated int64 field entry (packed or not), appended to `shape` with its bounds.
std::string read_shape(const uint8_t*& p, const uint8_t* end, uint64_t wt, const Limits& limits,
                       const std::string& what, std::vector<int64_t>& shape) {
  auto add = [&](uint64_t v) -> std::string {
    if (int64_t(shape.size()) >= limits.max_rank) {
      return what + ": rank exceeds the limit of " + std::to_string(limits.max_rank);
    }
    int64_t d = int64_t(v);
    if (d < 0) return what + ": negative dimension " + std::to_string(d);
    if (d > limits.max_elements) {
      return what + ": dimension " + std::to_string(d) + " exceeds the limit of " +
             std::to_string(limits.max_elements) + " elements";
    }
    shape.push_back(d);
    return "";
  };
  uint64_t v;
  if (wt == kVarint) {
    if (!read_varint(p, end, v)) return "bad";
    return add(v);
  }
  const uint8_t* body;
  uint64_t len;
  if (!read_bytes(p, end, body, len)) return "bad";
  const uint8_t* stop = body + len;
  while (body < stop) {
    if (!read_varint(body, stop, v)) return "bad";
    if (auto err = add(v); !err.empty()) return err;
  }
  return "";
}

std::string input_label(size_t i) { return "input " + std::to_string(i); }

const char* kMalformed = "the request is not a valid message";

}  // namespace

std::string parse_run_request(const uint8_t* p, const uint8_t* end, const Limits& limits,
                              RunRequest& out) {
  while (p < end) {
    uint64_t tag;
    if (!read_varint(p, end, tag)) return kMalformed;
    uint64_t field = tag >> 3, wt = tag & 7;
    const uint8_t* body;
    uint64_t len;
    if (field == 1 && wt == kBytes) {
      if (!read_bytes(p, end, body, len)) return kMalformed;
      out.model.assign(reinterpret_cast<const char*>(body), len);
    } else if (field == 2 && wt == kBytes) {
      if (int64_t(out.inputs.size()) >= limits.max_inputs) {
        return "more than " + std::to_string(limits.max_inputs) + " inputs (the limit)";
      }
      if (!read_bytes(p, end, body, len)) return kMalformed;
      const uint8_t* stop = body + len;
      WireTensor& t = out.inputs.emplace_back();
      std::string what = input_label(out.inputs.size() - 1);
      while (body < stop) {
        uint64_t ttag;
        if (!read_varint(body, stop, ttag)) return kMalformed;
        uint64_t tf = ttag >> 3, twt = ttag & 7;
        if (tf == 1 && twt == kVarint) {
          if (!read_varint(body, stop, t.dtype)) return kMalformed;
        } else if (tf == 2 && (twt == kVarint || twt == kBytes)) {
          auto err = read_shape(body, stop, twt, limits, what, t.shape);
          if (err == "bad") return kMalformed;
          if (!err.empty()) return err;
        } else if (tf == 3 && twt == kBytes) {
          if (!read_bytes(body, stop, t.data.data, t.data.size)) return kMalformed;
        } else if (!skip_field(body, stop, twt)) {
          return kMalformed;
        }
      }
    } else if (!skip_field(p, end, wt)) {
      return kMalformed;
    }
  }
  return "";
}

std::string parse_infer_request(const uint8_t* p, const uint8_t* end, const Limits& limits,
                                InferRequest& out) {
  while (p < end) {
    uint64_t tag;
    if (!read_varint(p, end, tag)) return kMalformed;
    uint64_t field = tag >> 3, wt = tag & 7;
    const uint8_t* body;
    uint64_t len;
    if (wt != kBytes || field < 1 || field > 7) {
      if (!skip_field(p, end, wt)) return kMalformed;
      continue;
    }
    if (!read_bytes(p, end, body, len)) return kMalformed;
    Span span{body, len};
    switch (field) {
      case 1: out.model_name = span; break;
      case 2: out.model_version = span; break;
      case 3: out.id = span; break;
      case 4: out.plain = false; break;   // request parameters
      case 6: out.plain = false; break;   // requested outputs
      case 7:
        if (int64_t(out.raw.size()) >= limits.max_inputs) {
          return "raw_input_contents: more than " + std::to_string(limits.max_inputs) +
                 " entries (the limit)";
        }
        out.raw.push_back(span);
        break;
      case 5: {
        if (int64_t(out.inputs.size()) >= limits.max_inputs) {
          return "more than " + std::to_string(limits.max_inputs) + " inputs (the limit)";
        }
        WireTensor& t = out.inputs.emplace_back();
        const uint8_t* stop = body + len;
        std::string what = input_label(out.inputs.size() - 1);
        while (body < stop) {
          uint64_t ttag;
          if (!read_varint(body, stop, ttag)) return kMalformed;
          uint64_t tf = ttag >> 3, twt = ttag & 7;
          const uint8_t* b2;
          uint64_t l2;
          if ((tf == 1 || tf == 2) && twt == kBytes) {
            if (!read_bytes(body, stop, b2, l2)) return kMalformed;
            (tf == 1 ? t.name : t.datatype).assign(reinterpret_cast<const char*>(b2), l2);
          } else if (tf == 3 && (twt == kVarint || twt == kBytes)) {
            auto err = read_shape(body, stop, twt, limits, what, t.shape);
            if (err == "bad") return kMalformed;
            if (!err.empty()) return err;
          } else if (tf == 4 && twt == kBytes) {
            t.has_parameters = true;
            if (!skip_field(body, stop, twt)) return kMalformed;
          } else if (tf == 5 && twt == kBytes) {
            t.has_contents = true;
            if (!skip_field(body, stop, twt)) return kMalformed;
          } else if (!skip_field(body, stop, twt)) {
            return kMalformed;
          }
        }
        if (t.has_parameters || t.has_contents) out.plain = false;
        break;
      }
    }
  }
  return "";
}

}  // namespace aotiserve::wire
