// The server's wire codec: protobuf's encoding read and written by hand, with bounds,
// for the hot path (aotiserve.v1 Run and OIP ModelInfer). Every parser stops at its
// bound before it allocates per entry, so a hostile message costs at most its size.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace aotiserve::wire {

// One element type as the wire names it. The table is handed over by the Python
// package at start-up (aotiserve.client.dtypes), so both sides read one table.
struct DType {
  uint64_t wire = 0;            // aotiserve.v1.DataType
  at::ScalarType scalar;        // torch's element type
  std::string name;             // "float32"
  std::string oip;              // "FP32"; empty: no OIP datatype
};

void set_dtypes(std::vector<DType> table);  // the first call wins: entries never move
const DType* by_wire(uint64_t wire);
const DType* by_scalar(at::ScalarType scalar);
const DType* by_oip(const std::string& oip);

struct Limits {
  int64_t max_inputs = 64;
  int64_t max_rank = 16;
  int64_t max_elements = int64_t(1) << 31;
};

// protobuf's varint / length-delimited primitives.
bool read_varint(const uint8_t*& p, const uint8_t* end, uint64_t& v);
// A field's tag; false for a malformed varint or a field number protobuf refuses.
bool read_tag(const uint8_t*& p, const uint8_t* end, uint64_t& tag);
void put_varint(std::string& out, uint64_t v);
bool skip_field(const uint8_t*& p, const uint8_t* end, uint64_t wire_type);
// A length-delimited field's body: [p, p + len) after the length.
bool read_bytes(const uint8_t*& p, const uint8_t* end, const uint8_t*& body, uint64_t& len);

struct Span {
  const uint8_t* data = nullptr;
  uint64_t size = 0;
  std::string str() const { return {reinterpret_cast<const char*>(data), size_t(size)}; }
};

// OIP's shared-memory parameters of a tensor: its bytes lie in a registered region
// (shared_memory_region), at shared_memory_offset, shared_memory_byte_size of them.
struct SharedRef {
  Span region;             // empty: the tensor's bytes travel in the message
  int64_t byte_size = -1;  // -1: not given
  int64_t offset = 0;
  bool other = false;      // any other parameter (the hot path leaves those to Python)
  bool malformed = false;  // a shared-memory parameter of the wrong kind or value
  bool used() const { return region.size > 0 || byte_size >= 0 || offset != 0; }
};

// A tensor as it arrived: element type, shape, a view of its bytes.
struct WireTensor {
  int64_t rank = 0;        // shape entries sent (shape keeps max_rank of them)
  std::string name;        // OIP only
  std::string datatype;    // OIP only
  uint64_t dtype = 0;      // aotiserve.v1 only
  std::vector<int64_t> shape;
  Span data;
  bool has_contents = false;     // OIP typed contents
  bool has_parameters = false;   // OIP per-tensor parameters
  SharedRef shared;              // OIP shared-memory parameters
};

// An OIP requested output: which, and where its bytes go (shared memory, or the reply).
struct RequestedOutput {
  std::string name;
  SharedRef shared;
};

// What a parser refused: `detail`, about input `input` (-1: the message as a whole),
// for the caller to label with the input's name once it knows the model.
struct ParseError {
  std::string detail;
  int64_t input = -1;
  bool empty() const { return detail.empty(); }
};

// Shape entries past this many are not even counted: the message is refused as it is.
constexpr int64_t kMaxCountedRank = 1024;
// Fields of one message besides its bounded repeated entries (names, ids, repeats,
// unknown fields, fields inside groups).
constexpr int64_t kMaxFields = 64;

// aotiserve.v1.RunRequest.
struct RunRequest {
  std::string model;
  std::vector<WireTensor> inputs;
};
ParseError parse_run_request(const uint8_t* p, const uint8_t* end, const Limits& limits,
                             RunRequest& out);

// inference.ModelInferRequest, the parts the hot path serves. `plain` is false when
// the request uses anything the hot path leaves to the full implementation: request
// parameters, tensor parameters other than shared memory's, typed contents.
struct InferRequest {
  Span model_name, model_version, id;
  std::vector<WireTensor> inputs;
  std::vector<Span> raw;
  std::vector<RequestedOutput> outputs;
  bool plain = true;
};
ParseError parse_infer_request(const uint8_t* p, const uint8_t* end, const Limits& limits,
                               InferRequest& out);

// "[1, 2, 3]"
std::string dims(const std::vector<int64_t>& shape);
std::string dims(at::IntArrayRef shape);

// Elements of `shape` (`rank` entries sent), or an error naming `what` (the words of
// server/tensor_codec.py's checked_numel): too many dimensions, a negative one, one past
// limits.max_elements, a zero-element shape whose others multiply past it (`too_many`
// false: INVALID_ARGUMENT), or more elements than that (`too_many` true: RESOURCE_EXHAUSTED).
std::string checked_numel(const std::vector<int64_t>& shape, int64_t rank, const Limits& limits,
                          const std::string& what, uint64_t& numel, bool& too_many);

// Field headers of a length-delimited field `field` of `len` bytes.
void put_header(std::string& out, uint32_t field, uint64_t len);
void put_string(std::string& out, uint32_t field, const std::string& s);

}  // namespace aotiserve::wire
