// The native data port (optional, built where gRPC C++ is found): aotiserve's
// Run served by gRPC C++ beside the Python server, for models the registry
// hands it (CPU replicas without dynamic batching). The Python daemon keeps
// everything else: it adds and removes models, takes a model's swap lock
// exclusive around every change of the serving weights and sets the version
// the trailer reports, and reads the request counts for its metrics.
//
// Same wire messages, status codes and error texts as the Python Run path
// (server/dataplane.py): a client can use either port.
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/support/method_handler.h>

#include <ATen/ATen.h>
#include <openssl/crypto.h>

#include <chrono>
#include <cstring>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <sstream>

#include "native_run.h"

namespace aotiserve {
namespace {

constexpr const char* kRun = "/aotiserve.v1.ModelRunner/Run";
constexpr const char* kTrailer = "aotiserve-weights-version";

struct WireType {
  at::ScalarType dtype;
  const char* name;
};

// DataType enum of proto/aotiserve/v1/model_runner.proto, by wire number.
const std::map<uint64_t, WireType>& wire_types() {
  static const std::map<uint64_t, WireType> types = {
      {1, {at::kFloat, "float32"}},   {2, {at::kDouble, "float64"}},
      {3, {at::kHalf, "float16"}},    {4, {at::kBFloat16, "bfloat16"}},
      {5, {at::kChar, "int8"}},       {6, {at::kShort, "int16"}},
      {7, {at::kInt, "int32"}},       {8, {at::kLong, "int64"}},
      {9, {at::kByte, "uint8"}},      {10, {at::kBool, "bool"}},
  };
  return types;
}

uint64_t wire_number(at::ScalarType dtype) {
  for (const auto& [n, type] : wire_types()) {
    if (type.dtype == dtype) return n;
  }
  return 0;
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

bool skip_field(const uint8_t*& p, const uint8_t* end, uint64_t wire_type) {
  uint64_t v;
  switch (wire_type) {
    case 0: return read_varint(p, end, v);
    case 1: if (end - p < 8) return false; p += 8; return true;
    case 5: if (end - p < 4) return false; p += 4; return true;
    case 2:
      if (!read_varint(p, end, v) || v > uint64_t(end - p)) return false;
      p += v;
      return true;
    default: return false;
  }
}

struct WireTensor {
  uint64_t dtype = 0;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  uint64_t size = 0;
};

struct Request {
  std::string model;
  std::vector<WireTensor> inputs;
};

bool parse_tensor(const uint8_t* p, const uint8_t* end, WireTensor& t) {
  while (p < end) {
    uint64_t tag, v;
    if (!read_varint(p, end, tag)) return false;
    uint64_t field = tag >> 3, wt = tag & 7;
    if (field == 1 && wt == 0) {
      if (!read_varint(p, end, t.dtype)) return false;
    } else if (field == 2 && wt == 2) {
      if (!read_varint(p, end, v) || v > uint64_t(end - p)) return false;
      const uint8_t* stop = p + v;
      while (p < stop) {
        if (!read_varint(p, stop, v)) return false;
        t.shape.push_back(int64_t(v));
      }
    } else if (field == 2 && wt == 0) {
      if (!read_varint(p, end, v)) return false;
      t.shape.push_back(int64_t(v));
    } else if (field == 3 && wt == 2) {
      if (!read_varint(p, end, v) || v > uint64_t(end - p)) return false;
      t.data = p;
      t.size = v;
      p += v;
    } else if (!skip_field(p, end, wt)) {
      return false;
    }
  }
  return true;
}

bool parse_request(const uint8_t* p, const uint8_t* end, Request& req) {
  while (p < end) {
    uint64_t tag, len;
    if (!read_varint(p, end, tag)) return false;
    uint64_t field = tag >> 3, wt = tag & 7;
    if ((field == 1 || field == 2) && wt == 2) {
      if (!read_varint(p, end, len) || len > uint64_t(end - p)) return false;
      if (field == 1) {
        req.model.assign(reinterpret_cast<const char*>(p), len);
      } else {
        req.inputs.emplace_back();
        if (!parse_tensor(p, p + len, req.inputs.back())) return false;
      }
      p += len;
    } else if (!skip_field(p, end, wt)) {
      return false;
    }
  }
  return true;
}

std::string dims(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

grpc::Status invalid(const std::string& msg) {
  return {grpc::StatusCode::INVALID_ARGUMENT, msg};
}

// Outputs this large go out as slices over the tensors' own memory (no copy); smaller
// ones are copied into the reply's one slice, which costs less than a slice apiece.
constexpr size_t kZeroCopyBytes = 64 * 1024;

// RunResponse{outputs=1 Tensor{dtype=1, shape=2, data=3}, weights_version=2}, framed by
// hand around the outputs' bytes: each output's field headers, then its data, copied
// once into the reply (small) or lent to grpc until the reply is sent (large).
grpc::ByteBuffer reply(const std::vector<at::Tensor>& outputs, const std::string& version,
                       uint64_t& copied) {
  std::vector<grpc::Slice> slices;
  std::string pending;  // bytes not yet in a slice
  auto flush = [&] {
    if (!pending.empty()) slices.emplace_back(pending);
    pending.clear();
  };
  for (const auto& o : outputs) {
    at::Tensor c = o.is_contiguous() ? o : o.contiguous();
    uint64_t nbytes = c.numel() * c.element_size();
    std::string shape, head;
    for (auto d : c.sizes()) put_varint(shape, uint64_t(d));
    head.push_back(char(1 << 3 | 0));
    put_varint(head, wire_number(c.scalar_type()));
    head.push_back(char(2 << 3 | 2));
    put_varint(head, shape.size());
    head += shape;
    head.push_back(char(3 << 3 | 2));
    put_varint(head, nbytes);
    pending.push_back(char(1 << 3 | 2));
    put_varint(pending, head.size() + nbytes);
    pending += head;
    if (nbytes < kZeroCopyBytes) {
      pending.append(static_cast<const char*>(c.data_ptr()), nbytes);
      copied += nbytes;
      continue;
    }
    flush();
    auto* keep = new at::Tensor(c);  // released by grpc with the slice
    slices.emplace_back(c.data_ptr(), nbytes,
                        +[](void* t) { delete static_cast<at::Tensor*>(t); }, keep);
  }
  pending.push_back(char(2 << 3 | 2));
  put_varint(pending, version.size());
  pending += version;
  flush();
  return grpc::ByteBuffer(slices.data(), slices.size());
}

}  // namespace

struct NativeModel {
  std::string name;
  RunFn run;
  SwapFn swap_buffers;
  int capacity = 1;
  std::vector<NativeInput> inputs;
  std::shared_mutex swap;  // runs: shared; a weights change: exclusive
  std::string version;     // guarded by swap
  std::mutex admit;
  std::condition_variable freed;
  int running = 0;         // guarded by admit
};

class NativeRunServer::Service : public grpc::Service {
 public:
  explicit Service(NativeRunServer* owner) : owner_(owner) {
    AddMethod(new grpc::internal::RpcServiceMethod(
        kRun, grpc::internal::RpcMethod::NORMAL_RPC,
        new grpc::internal::RpcMethodHandler<Service, grpc::ByteBuffer, grpc::ByteBuffer>(
            [](Service* s, grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
               grpc::ByteBuffer* resp) {
              grpc::Status status = s->owner_->run(ctx, req, resp);
              s->owner_->count(status.error_code());
              return status;
            },
            this)));
  }

 private:
  NativeRunServer* owner_;
};

NativeRunServer::NativeRunServer(const std::string& address, int max_message_bytes,
                                 const std::string& token, int max_queue, int64_t max_elements,
                                 int64_t max_rank, int workers)
    : token_(token),
      max_queue_(max_queue),
      max_elements_(max_elements),
      max_rank_(max_rank),
      service_(std::make_unique<Service>(this)) {
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port_);
  builder.SetMaxReceiveMessageSize(max_message_bytes);
  builder.SetMaxSendMessageSize(max_message_bytes);
  // Up to `workers` threads stay polling between requests. gRPC's default keeps two: under
  // more concurrent requests it then starts and ends a thread for nearly every request
  // (2 clients of a compute-bound model: 248 threads for 1,114 requests), and each new
  // thread pays for its stack and a fresh malloc arena in page faults.
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS,
                              std::max(2, workers));
  builder.RegisterService(service_.get());
  server_ = builder.BuildAndStart();
  if (!server_ || port_ == 0) {
    throw std::runtime_error("native data port: could not bind " + address);
  }
}

NativeRunServer::~NativeRunServer() { stop(0); }

void NativeRunServer::stop(double grace_s) {
  std::unique_ptr<grpc::Server> server;
  {
    std::lock_guard<std::mutex> lock(server_mu_);
    server.swap(server_);
  }
  if (server) {
    server->Shutdown(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(int64_t(grace_s * 1000)));
    server->Wait();
  }
}

void NativeRunServer::add_model(const std::string& name, RunFn run, SwapFn swap, int capacity,
                                std::vector<NativeInput> inputs, const std::string& version) {
  auto model = std::make_shared<NativeModel>();
  model->name = name;
  model->run = std::move(run);
  model->swap_buffers = std::move(swap);
  model->capacity = std::max(1, capacity);
  model->inputs = std::move(inputs);
  model->version = version;
  std::unique_lock<std::shared_mutex> lock(models_mu_);
  models_[name] = std::move(model);
}

std::shared_ptr<NativeModel> NativeRunServer::find(const std::string& name) {
  std::shared_lock<std::shared_mutex> lock(models_mu_);
  auto it = models_.find(name);
  return it == models_.end() ? nullptr : it->second;
}

void NativeRunServer::remove_model(const std::string& name) {
  std::shared_ptr<NativeModel> model;
  {
    std::unique_lock<std::shared_mutex> lock(models_mu_);
    auto it = models_.find(name);
    if (it == models_.end()) return;
    model = it->second;
    models_.erase(it);
  }
  // No new run finds it; wait for the ones in flight (they hold the lock shared).
  std::unique_lock<std::shared_mutex> wait(model->swap);
}

void NativeRunServer::flip(const std::string& name, const std::string& version) {
  auto model = find(name);
  if (!model) throw std::runtime_error("native data port: no model '" + name + "'");
  std::unique_lock<std::shared_mutex> lock(model->swap);
  model->swap_buffers();
  model->version = version;
}

void NativeRunServer::lock_weights(const std::string& name) {
  auto model = find(name);
  if (model) model->swap.lock();
}

void NativeRunServer::unlock_weights(const std::string& name, const std::string& version) {
  auto model = find(name);
  if (model) {
    model->version = version;
    model->swap.unlock();
  }
}

void NativeRunServer::set_draining(bool draining) { draining_ = draining; }

void NativeRunServer::count(grpc::StatusCode code) {
  size_t i = size_t(code);
  if (i < counts_.size()) counts_[i].fetch_add(1, std::memory_order_relaxed);
}

std::map<int, uint64_t> NativeRunServer::counts() {
  std::map<int, uint64_t> out;
  for (size_t i = 0; i < counts_.size(); ++i) {
    if (uint64_t n = counts_[i].load(std::memory_order_relaxed)) out[int(i)] = n;
  }
  return out;
}

bool NativeRunServer::authorized(grpc::ServerContext* ctx, grpc::Status& refusal) const {
  if (token_.empty()) return true;
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    refusal = {grpc::StatusCode::UNAUTHENTICATED,
               "Run needs a token (metadata 'authorization: Bearer <token>')"};
    return false;
  }
  std::string header(it->second.data(), it->second.size());
  std::string got = header.rfind("Bearer ", 0) == 0 ? header.substr(7) : header;
  if (got.size() != token_.size() ||
      CRYPTO_memcmp(got.data(), token_.data(), got.size()) != 0) {
    refusal = {grpc::StatusCode::PERMISSION_DENIED, "Run: wrong token"};
    return false;
  }
  return true;
}

grpc::Status NativeRunServer::run(grpc::ServerContext* ctx, const grpc::ByteBuffer* raw,
                                  grpc::ByteBuffer* resp) {
  if (draining_) return {grpc::StatusCode::UNAVAILABLE, "server is shutting down"};
  grpc::Status refusal;
  if (!authorized(ctx, refusal)) return refusal;
  // The request's bytes: grpc's own slice when it is one (no copy), else joined once
  // into a tensor of torch's allocator (huge pages for large requests where the daemon
  // turned them on). Input tensors view them, so they stay alive for the whole run.
  grpc::Slice single;
  at::Tensor joined;
  const uint8_t* begin;
  const uint8_t* end;
  if (raw->TrySingleSlice(&single).ok()) {
    begin = single.begin();
    end = single.end();
  } else {
    std::vector<grpc::Slice> slices;
    if (!raw->Dump(&slices).ok()) return invalid("Run: the request is not a valid message");
    joined = at::empty({int64_t(raw->Length())}, at::kByte);
    auto* w = joined.data_ptr<uint8_t>();
    for (auto& s : slices) {
      std::memcpy(w, s.begin(), s.size());
      w += s.size();
    }
    begin = joined.data_ptr<uint8_t>();
    end = w;
    copied_bytes_.fetch_add(joined.numel(), std::memory_order_relaxed);
  }
  Request req;
  if (!parse_request(begin, end, req)) return invalid("Run: the request is not a valid message");
  auto model = find(req.model);
  if (!model) {
    return {grpc::StatusCode::NOT_FOUND,
            "model '" + req.model + "' is not served on this port (not loaded, or served on "
            "the main port only)"};
  }
  // As the main port: decode every tensor (dtype known, rank and element limits, byte
  // count), then check them against the model's inputs (count, dtype, shape).
  const auto& specs = model->inputs;
  auto label = [&](size_t i) {
    return "input " + std::to_string(i) + (i < specs.size() ? " ('" + specs[i].name + "')" : "");
  };
  std::vector<at::Tensor> inputs;
  inputs.reserve(req.inputs.size());
  for (size_t i = 0; i < req.inputs.size(); ++i) {
    const auto& t = req.inputs[i];
    auto type = wire_types().find(t.dtype);
    if (type == wire_types().end()) {
      return invalid(label(i) + ": unknown or unsupported dtype " + std::to_string(t.dtype));
    }
    if (int64_t(t.shape.size()) > max_rank_) {
      return invalid(label(i) + ": rank " + std::to_string(t.shape.size()) +
                     " exceeds the limit of " + std::to_string(max_rank_));
    }
    uint64_t numel = 1;
    for (auto d : t.shape) {
      if (d < 0) {
        return invalid(label(i) + ": negative dimension " + std::to_string(d) + " in shape " +
                       dims(t.shape));
      }
      numel = (d != 0 && numel > uint64_t(max_elements_) / uint64_t(d)) ? uint64_t(max_elements_) + 1
                                                                        : numel * uint64_t(d);
      if (numel > uint64_t(max_elements_)) {
        return {grpc::StatusCode::RESOURCE_EXHAUSTED,
                label(i) + ": shape " + dims(t.shape) + " has more than " +
                    std::to_string(max_elements_) + " elements"};
      }
    }
    uint64_t want = numel * c10::elementSize(type->second.dtype);
    if (t.size != want) {
      return invalid(label(i) + ": expected " + std::to_string(want) + " bytes for " +
                     type->second.name + dims(t.shape) + ", got " + std::to_string(t.size));
    }
    if (type->second.dtype == at::kBool) {
      for (uint64_t b = 0; b < t.size; ++b) {
        if (t.data[b] > 1) return invalid(label(i) + ": bool tensor holds bytes other than 0 and 1");
      }
    }
    inputs.push_back(numel == 0 ? at::empty(t.shape, type->second.dtype)
                                // A view of the request bytes, alive for the whole run.
                                : at::from_blob(const_cast<uint8_t*>(t.data), t.shape,
                                                type->second.dtype));
  }
  if (inputs.size() != specs.size()) {
    std::string names;
    for (size_t i = 0; i < specs.size(); ++i) names += (i ? ", " : "") + specs[i].name;
    return invalid("model '" + model->name + "' takes " + std::to_string(specs.size()) +
                   " inputs (" + names + "), got " + std::to_string(inputs.size()));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    const auto& spec = specs[i];
    const auto& shape = req.inputs[i].shape;
    if (inputs[i].scalar_type() != spec.dtype) {
      return invalid(label(i) + ": dtype must be " + spec.dtype_name + ", got " +
                     wire_types().at(req.inputs[i].dtype).name);
    }
    if (shape.size() != spec.shape.size()) {
      return invalid(label(i) + ": expected " + std::to_string(spec.shape.size()) +
                     " dimensions " + dims(spec.shape) + ", got shape " + dims(shape));
    }
    for (size_t d = 0; d < shape.size(); ++d) {
      if (spec.shape[d] >= 0 && shape[d] != spec.shape[d]) {
        return invalid(label(i) + ": dimension " + std::to_string(d) + " must be " +
                       std::to_string(spec.shape[d]) + " (shape " + dims(spec.shape) +
                       "), got shape " + dims(shape));
      }
    }
  }
  // Admission: at most `capacity` runs at once, at most max_queue waiting.
  {
    std::unique_lock<std::mutex> lock(model->admit);
    if (model->running >= model->capacity) {
      if (waiting_ >= max_queue_) {
        return {grpc::StatusCode::RESOURCE_EXHAUSTED,
                "queue of the native data port is full (" + std::to_string(max_queue_) +
                    " waiting); retry later"};
      }
      ++waiting_;
      auto deadline = ctx->deadline();
      bool ok = model->freed.wait_until(lock, deadline, [&] {
        return model->running < model->capacity;
      });
      --waiting_;
      if (!ok) {
        return {grpc::StatusCode::DEADLINE_EXCEEDED,
                "deadline passed in the queue of the native data port; not computed"};
      }
    }
    ++model->running;
  }
  std::vector<at::Tensor> outputs;
  std::string version;
  grpc::Status failed = grpc::Status::OK;
  {
    std::shared_lock<std::shared_mutex> weights(model->swap);
    version = model->version;
    try {
      outputs = model->run(inputs);
    } catch (const c10::ValueError& e) {
      failed = invalid("model '" + model->name + "' rejected the inputs: " + e.what_without_backtrace());
    } catch (const std::exception& e) {
      std::string msg = e.what();
      msg = msg.substr(0, msg.find("\nException raised from"));
      failed = invalid("model '" + model->name + "' rejected the inputs: " + msg);
    }
  }
  {
    std::lock_guard<std::mutex> lock(model->admit);
    --model->running;
  }
  model->freed.notify_one();
  if (!failed.ok()) return failed;
  uint64_t copied = 0;
  *resp = reply(outputs, version, copied);
  copied_bytes_.fetch_add(copied, std::memory_order_relaxed);
  ctx->AddTrailingMetadata(kTrailer, version);
  return grpc::Status::OK;
}

void bind_native_run(py::module_& m) {
  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<NativeRunServer>(m, "NativeRunServer", py::module_local())
      .def(py::init<const std::string&, int, const std::string&, int, int64_t, int64_t, int>(),
           py::arg("address"), py::arg("max_message_bytes"), py::arg("token"),
           py::arg("max_queue"), py::arg("max_elements"), py::arg("max_rank"),
           py::arg("workers"), release())
      .def_property_readonly("port", &NativeRunServer::port)
      .def(
          "add_model",
          [](NativeRunServer& self, const std::string& name, py::capsule run_fn,
             py::capsule swap_fn, int capacity,
             const std::vector<std::tuple<std::string, at::ScalarType, std::string,
                                          std::vector<int64_t>>>& inputs,
             const std::string& version) {
            RunFn fn = *static_cast<RunFn*>(run_fn.get_pointer());
            SwapFn swap = *static_cast<SwapFn*>(swap_fn.get_pointer());
            std::vector<NativeInput> specs;
            for (const auto& [n, dtype, dtype_name, shape] : inputs) {
              specs.push_back({n, dtype, dtype_name, shape});
            }
            self.add_model(name, std::move(fn), std::move(swap), capacity, std::move(specs),
                           version);
          },
          py::arg("name"), py::arg("run_fn"), py::arg("swap_fn"), py::arg("capacity"),
          py::arg("inputs"), py::arg("version"))
      .def("flip", &NativeRunServer::flip, py::arg("name"), py::arg("version"), release())
      .def("remove_model", &NativeRunServer::remove_model, py::arg("name"), release())
      .def("lock_weights", &NativeRunServer::lock_weights, py::arg("name"), release())
      .def("unlock_weights", &NativeRunServer::unlock_weights, py::arg("name"),
           py::arg("version"), release())
      .def("set_draining", &NativeRunServer::set_draining, py::arg("draining"))
      .def("stop", &NativeRunServer::stop, py::arg("grace_s"), release())
      .def("counts", &NativeRunServer::counts)
      .def("copied_bytes", &NativeRunServer::copied_bytes);
}

}  // namespace aotiserve
