// See wire.h.
#include "wire.h"

#include <algorithm>
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

// Set once per process: models keep pointers into the table.
void set_dtypes(std::vector<DType> t) {
  static std::once_flag once;
  std::call_once(once, [&] { table() = std::move(t); });
}

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

bool read_tag(const uint8_t*& p, const uint8_t* end, uint64_t& tag) {
  if (!read_varint(p, end, tag)) return false;
  uint64_t field = tag >> 3;
  return field >= 1 && field <= 0x1FFFFFFF;  // protobuf's field numbers; others: corrupt
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

std::string checked_numel(const std::vector<int64_t>& shape, int64_t rank, const Limits& limits,
                          const std::string& what, uint64_t& numel, bool& too_many) {
  too_many = false;
  numel = 0;
  if (rank > limits.max_rank) {
    return what + ": rank " + std::to_string(rank) + " exceeds the limit of " +
           std::to_string(limits.max_rank);
  }
  bool empty = std::find(shape.begin(), shape.end(), 0) != shape.end();
  uint64_t n = 1;  // of the non-zero dimensions
  for (size_t i = 0; i < shape.size(); ++i) {
    int64_t d = shape[i];
    if (d < 0) return what + ": negative dimension " + std::to_string(d) + " in shape " + dims(shape);
    if (d > limits.max_elements) {
      return what + ": dimension " + std::to_string(i) + " of shape " + dims(shape) +
             " is above the limit of " + std::to_string(limits.max_elements) +
             " (max_tensor_elements)";
    }
    uint64_t f = uint64_t(std::max<int64_t>(d, 1));
    if (n > uint64_t(limits.max_elements) / f) {
      if (empty) {
        return what + ": shape " + dims(shape) + " has no elements, but its other dimensions "
               "multiply to more than " + std::to_string(limits.max_elements) +
               " (max_tensor_elements)";
      }
      too_many = true;
      return what + ": shape " + dims(shape) + " has more than " +
             std::to_string(limits.max_elements) + " elements";
    }
    n *= f;
  }
  numel = empty ? 0 : n;
  return "";
}

namespace {

// A repeated int64 field entry (packed or not) of tensor `t`: the first max_rank
// dimensions are kept, the rest only counted, up to kMaxCountedRank.
std::string read_shape(const uint8_t*& p, const uint8_t* end, uint64_t wt, const Limits& limits,
                       WireTensor& t) {
  auto add = [&](uint64_t v) -> std::string {
    if (++t.rank > kMaxCountedRank) {
      return "rank exceeds the limit of " + std::to_string(limits.max_rank);
    }
    if (int64_t(t.shape.size()) < limits.max_rank) t.shape.push_back(int64_t(v));
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

// Skips a field of any wire type; a group's fields count as fields of the message.
bool skip_counted(const uint8_t*& p, const uint8_t* end, uint64_t tag, int64_t& fields,
                  int depth = 0) {
  uint64_t wt = tag & 7;
  if (wt == 4) return false;  // an end without a start
  if (wt != 3) return skip_field(p, end, wt);
  if (depth > 32) return false;
  while (p < end) {
    uint64_t inner;
    if (!read_tag(p, end, inner)) return false;
    if ((inner & 7) == 4) return (inner >> 3) == (tag >> 3);
    if (++fields > kMaxFields) return true;  // the caller sees the count
    if (!skip_counted(p, end, inner, fields, depth + 1)) return false;
  }
  return false;
}

std::string too_many_fields(const std::string& what) {
  return "the " + what + " request has more than " + std::to_string(kMaxFields) +
         " fields besides its bounded repeated entries (repeated or unknown fields), the limit";
}

const char* kMalformed = "the request is not a valid message";

}  // namespace

ParseError parse_run_request(const uint8_t* p, const uint8_t* end, const Limits& limits,
                             RunRequest& out) {
  int64_t fields = 0;
  while (p < end) {
    uint64_t tag;
    if (!read_tag(p, end, tag)) return {kMalformed};
    uint64_t field = tag >> 3, wt = tag & 7;
    const uint8_t* body;
    uint64_t len;
    if (field == 2 && wt == kBytes) {
      if (int64_t(out.inputs.size()) >= limits.max_inputs) {
        return {"the Run request has more than " + std::to_string(limits.max_inputs) +
                " inputs, the limit (max_inputs)"};
      }
      if (!read_bytes(p, end, body, len)) return {kMalformed};
      const uint8_t* stop = body + len;
      WireTensor& t = out.inputs.emplace_back();
      int64_t index = int64_t(out.inputs.size()) - 1;
      int64_t tfields = 0;
      while (body < stop) {
        uint64_t ttag;
        if (!read_tag(body, stop, ttag)) return {kMalformed};
        uint64_t tf = ttag >> 3, twt = ttag & 7;
        if (tf == 2 && (twt == kVarint || twt == kBytes)) {
          auto err = read_shape(body, stop, twt, limits, t);
          if (err == "bad") return {kMalformed};
          if (!err.empty()) return {err, index};
          continue;
        }
        if (++tfields > kMaxFields) {
          return {"has more than " + std::to_string(kMaxFields) + " fields besides its shape "
                  "(repeated or unknown fields), the limit", index};
        }
        if (tf == 1 && twt == kVarint) {
          if (!read_varint(body, stop, t.dtype)) return {kMalformed};
        } else if (tf == 3 && twt == kBytes) {
          if (!read_bytes(body, stop, t.data.data, t.data.size)) return {kMalformed};
        } else if (!skip_counted(body, stop, ttag, tfields)) {
          return {kMalformed};
        }
      }
      continue;
    }
    if (++fields > kMaxFields) return {too_many_fields("Run")};
    if (field == 1 && wt == kBytes) {
      if (!read_bytes(p, end, body, len)) return {kMalformed};
      out.model.assign(reinterpret_cast<const char*>(body), len);
    } else if (!skip_counted(p, end, tag, fields)) {
      return {kMalformed};
    }
    if (fields > kMaxFields) return {too_many_fields("Run")};
  }
  return {};
}

// One entry of a map<string, InferParameter> (a tensor's or requested output's
// parameters): the shared-memory ones are read into `ref`, any other is noted.
static bool read_parameter(const uint8_t* p, const uint8_t* end, SharedRef& ref) {
  Span key;
  const uint8_t* value = nullptr;
  uint64_t value_len = 0;
  while (p < end) {
    uint64_t tag;
    if (!read_tag(p, end, tag)) return false;
    uint64_t f = tag >> 3, wt = tag & 7;
    const uint8_t* body;
    uint64_t len;
    if ((f == 1 || f == 2) && wt == kBytes) {
      if (!read_bytes(p, end, body, len)) return false;
      if (f == 1) key = {body, len};
      else value = body, value_len = len;
    } else if (!skip_field(p, end, wt)) {
      return false;
    }
  }
  std::string name = key.str();
  bool is_region = name == "shared_memory_region";
  bool is_size = name == "shared_memory_byte_size", is_offset = name == "shared_memory_offset";
  if (!is_region && !is_size && !is_offset) {
    ref.other = true;
    return true;
  }
  // The InferParameter: a string for the region, an integer (int64 or uint64) otherwise.
  uint64_t kind = 0, number = 0;
  Span text;
  const uint8_t* q = value;
  const uint8_t* stop = value ? value + value_len : nullptr;
  while (q && q < stop) {
    uint64_t tag;
    if (!read_tag(q, stop, tag)) return false;
    uint64_t f = tag >> 3, wt = tag & 7;
    if (f == 3 && wt == kBytes) {
      const uint8_t* body;
      uint64_t len;
      if (!read_bytes(q, stop, body, len)) return false;
      text = {body, len};
      kind = 3;
    } else if ((f == 2 || f == 5) && wt == kVarint) {
      if (!read_varint(q, stop, number)) return false;
      kind = f;
    } else {
      if (!skip_field(q, stop, wt)) return false;
      kind = f;
    }
  }
  if (is_region) {
    if (kind != 3 || text.size == 0) ref.malformed = true;
    ref.region = text;
  } else if (kind != 2 && kind != 5) {
    ref.malformed = true;
  } else if (int64_t(number) < 0) {
    ref.malformed = true;  // negative, or past int64's range
  } else {
    (is_size ? ref.byte_size : ref.offset) = int64_t(number);
  }
  return true;
}

ParseError parse_infer_request(const uint8_t* p, const uint8_t* end, const Limits& limits,
                               InferRequest& out) {
  int64_t fields = 0, parameters = 0, outputs = 0;
  auto bound = [&](const char* what) -> ParseError {
    return {"the ModelInfer request has more than " + std::to_string(limits.max_inputs) + " " +
            what + ", the limit (max_inputs)"};
  };
  while (p < end) {
    uint64_t tag;
    if (!read_tag(p, end, tag)) return {kMalformed};
    uint64_t field = tag >> 3, wt = tag & 7;
    const uint8_t* body;
    uint64_t len;
    bool counted = wt == kBytes && field >= 4 && field <= 7;
    if (!counted) {
      if (++fields > kMaxFields) return {too_many_fields("ModelInfer")};
      if (wt == kBytes && field >= 1 && field <= 3) {
        if (!read_bytes(p, end, body, len)) return {kMalformed};
        Span span{body, len};
        (field == 1 ? out.model_name : field == 2 ? out.model_version : out.id) = span;
      } else if (!skip_counted(p, end, tag, fields)) {
        return {kMalformed};
      }
      if (fields > kMaxFields) return {too_many_fields("ModelInfer")};
      continue;
    }
    if (!read_bytes(p, end, body, len)) return {kMalformed};
    Span span{body, len};
    switch (field) {
      case 4:  // request parameters: Python's to serve
        if (++parameters > limits.max_inputs) return bound("parameters");
        out.plain = false;
        break;
      case 6: {  // a requested output: its name, and where its bytes go
        if (++outputs > limits.max_inputs) return bound("requested outputs");
        RequestedOutput& o = out.outputs.emplace_back();
        const uint8_t* q = body;
        const uint8_t* stop = body + len;
        int64_t ofields = 0;
        while (q < stop) {
          uint64_t otag;
          if (!read_tag(q, stop, otag)) return {kMalformed};
          uint64_t of = otag >> 3, owt = otag & 7;
          const uint8_t* b2;
          uint64_t l2;
          if (++ofields > kMaxFields) {
            return {"a requested output has more than " + std::to_string(kMaxFields) +
                    " fields (names, parameters, unknown fields), the limit"};
          }
          if ((of == 1 || of == 2) && owt == kBytes) {
            if (!read_bytes(q, stop, b2, l2)) return {kMalformed};
            if (of == 1) o.name.assign(reinterpret_cast<const char*>(b2), l2);
            else if (!read_parameter(b2, b2 + l2, o.shared)) return {kMalformed};
          } else if (!skip_counted(q, stop, otag, ofields)) {
            return {kMalformed};
          }
        }
        if (o.shared.other || o.shared.malformed) out.plain = false;
        break;
      }
      case 7:
        if (int64_t(out.raw.size()) >= limits.max_inputs) return bound("raw_input_contents entries");
        out.raw.push_back(span);
        break;
      case 5: {
        if (int64_t(out.inputs.size()) >= limits.max_inputs) return bound("inputs");
        WireTensor& t = out.inputs.emplace_back();
        int64_t index = int64_t(out.inputs.size()) - 1;
        const uint8_t* stop = body + len;
        int64_t tfields = 0, tparams = 0;
        while (body < stop) {
          uint64_t ttag;
          if (!read_tag(body, stop, ttag)) return {kMalformed};
          uint64_t tf = ttag >> 3, twt = ttag & 7;
          const uint8_t* b2;
          uint64_t l2;
          if (tf == 3 && (twt == kVarint || twt == kBytes)) {
            auto err = read_shape(body, stop, twt, limits, t);
            if (err == "bad") return {kMalformed};
            if (!err.empty()) return {err, index};
            continue;
          }
          if (tf == 4 && twt == kBytes) {
            if (++tparams > limits.max_inputs) {
              return {"has more than " + std::to_string(limits.max_inputs) +
                      " parameters, the limit (max_inputs)", index};
            }
            t.has_parameters = true;
            if (!read_bytes(body, stop, b2, l2)) return {kMalformed};
            if (!read_parameter(b2, b2 + l2, t.shared)) return {kMalformed};
            continue;
          }
          if (++tfields > kMaxFields) {
            return {"has more than " + std::to_string(kMaxFields) + " fields besides its "
                    "shape and parameters (repeated or unknown fields), the limit", index};
          }
          if ((tf == 1 || tf == 2) && twt == kBytes) {
            if (!read_bytes(body, stop, b2, l2)) return {kMalformed};
            (tf == 1 ? t.name : t.datatype).assign(reinterpret_cast<const char*>(b2), l2);
          } else if (tf == 5 && twt == kBytes) {
            t.has_contents = true;
            if (!skip_field(body, stop, twt)) return {kMalformed};
          } else if (!skip_counted(body, stop, ttag, tfields)) {
            return {kMalformed};
          }
        }
        if (t.has_contents || t.shared.other || t.shared.malformed) out.plain = false;
        break;
      }
    }
  }
  return {};
}

}  // namespace aotiserve::wire
