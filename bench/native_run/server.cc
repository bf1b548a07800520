// A measuring instrument, not part of the daemon: aotiserve's native Run served by
// gRPC C++ with the model run through torch's AOTIModelPackageLoader, to tell what a
// native data path would give against the Python servers (see bench/native_run/README.md).
//
// Serves only /aotiserve.v1.ModelRunner/Run for float32 inputs; the RunRequest and
// RunResponse wire bytes are read and written by hand (no protobuf library).

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/support/method_handler.h>
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace {

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

struct WireTensor {
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t size = 0;
  uint64_t dtype = 0;
};

// RunRequest{model=1, inputs=2 Tensor{dtype=1, shape=2, data=3}}.
bool parse_request(const std::string& buf, std::vector<WireTensor>& inputs) {
  auto p = reinterpret_cast<const uint8_t*>(buf.data());
  auto end = p + buf.size();
  while (p < end) {
    uint64_t tag, len;
    if (!read_varint(p, end, tag) || (tag & 7) != 2 || !read_varint(p, end, len) ||
        len > uint64_t(end - p))
      return false;
    if ((tag >> 3) == 2) {
      WireTensor t;
      auto q = p, qend = p + len;
      while (q < qend) {
        uint64_t ftag, v;
        if (!read_varint(q, qend, ftag)) return false;
        uint64_t field = ftag >> 3, wt = ftag & 7;
        if (field == 1 && wt == 0) {
          if (!read_varint(q, qend, t.dtype)) return false;
        } else if (field == 2 && wt == 2) {
          uint64_t n;
          if (!read_varint(q, qend, n) || n > uint64_t(qend - q)) return false;
          auto send = q + n;
          while (q < send) {
            if (!read_varint(q, send, v)) return false;
            t.shape.push_back(int64_t(v));
          }
        } else if (field == 2 && wt == 0) {
          if (!read_varint(q, qend, v)) return false;
          t.shape.push_back(int64_t(v));
        } else if (field == 3 && wt == 2) {
          uint64_t n;
          if (!read_varint(q, qend, n) || n > uint64_t(qend - q)) return false;
          t.data = q;
          t.size = n;
          q += n;
        } else {
          return false;
        }
      }
      inputs.push_back(std::move(t));
    }
    p += len;
  }
  return true;
}

class RunService : public grpc::Service {
 public:
  explicit RunService(torch::inductor::AOTIModelPackageLoader* model) : model_(model) {
    AddMethod(new grpc::internal::RpcServiceMethod(
        "/aotiserve.v1.ModelRunner/Run", grpc::internal::RpcMethod::NORMAL_RPC,
        new grpc::internal::RpcMethodHandler<RunService, grpc::ByteBuffer, grpc::ByteBuffer>(
            [](RunService* s, grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
               grpc::ByteBuffer* resp) { return s->Run(ctx, req, resp); },
            this)));
  }

  grpc::Status Run(grpc::ServerContext* ctx, const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) {
    std::vector<grpc::Slice> slices;
    if (!req->Dump(&slices).ok()) return {grpc::StatusCode::INTERNAL, "could not read the request"};
    std::string buf;
    for (auto& s : slices) buf.append(reinterpret_cast<const char*>(s.begin()), s.size());
    std::vector<WireTensor> wire;
    if (!parse_request(buf, wire)) return {grpc::StatusCode::INVALID_ARGUMENT, "bad RunRequest"};
    std::vector<at::Tensor> inputs;
    for (auto& t : wire) {
      if (t.dtype != 1) return {grpc::StatusCode::INVALID_ARGUMENT, "float32 only"};
      auto x = at::from_blob(const_cast<uint8_t*>(t.data), t.shape, at::kFloat);
      if (size_t(x.numel()) * 4 != t.size) return {grpc::StatusCode::INVALID_ARGUMENT, "size"};
      inputs.push_back(std::move(x));
    }
    std::vector<at::Tensor> outputs = model_->run(inputs);
    std::string out;
    for (auto& o : outputs) {
      o = o.contiguous();
      std::string shape, tensor;
      for (auto d : o.sizes()) put_varint(shape, uint64_t(d));
      tensor.push_back(char(1 << 3 | 0));
      put_varint(tensor, 1);
      tensor.push_back(char(2 << 3 | 2));
      put_varint(tensor, shape.size());
      tensor += shape;
      tensor.push_back(char(3 << 3 | 2));
      size_t nbytes = o.numel() * o.element_size();
      put_varint(tensor, nbytes);
      tensor.append(static_cast<const char*>(o.data_ptr()), nbytes);
      out.push_back(char(1 << 3 | 2));
      put_varint(out, tensor.size());
      out += tensor;
    }
    out.push_back(char(2 << 3 | 2));
    put_varint(out, 7);
    out += "initial";
    ctx->AddTrailingMetadata("aotiserve-weights-version", "initial");
    grpc::Slice slice(out);
    *resp = grpc::ByteBuffer(&slice, 1);
    return grpc::Status::OK;
  }

 private:
  torch::inductor::AOTIModelPackageLoader* model_;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s PACKAGE.pt2 RUNNERS READY_FILE\n", argv[0]);
    return 2;
  }
  torch::inductor::AOTIModelPackageLoader model(argv[1], "model", false, std::stoul(argv[2]));
  RunService service(&model);
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  auto server = builder.BuildAndStart();
  {
    std::ofstream ready(std::string(argv[3]) + ".tmp");
    ready << "{\"port\": " << port << "}";
  }
  std::rename((std::string(argv[3]) + ".tmp").c_str(), argv[3]);
  server->Wait();
  return 0;
}
