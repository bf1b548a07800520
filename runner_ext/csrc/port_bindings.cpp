// Python's view of the port (server/port.py, server/bridge.py).
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "port.h"

namespace py = pybind11;

namespace aotiserve {
namespace {

using release = py::call_guard<py::gil_scoped_release>;

py::object metadata_value(const std::string& key, const std::string& value) {
  if (key.size() > 4 && key.compare(key.size() - 4, 4, "-bin") == 0) return py::bytes(value);
  return py::str(value);
}

PortConfig make_config(const py::dict& d) {
  PortConfig c;
  auto get = [&](const char* k) { return d[k]; };
  c.max_message_bytes = get("max_message_bytes").cast<int>();
  c.admin_token = get("admin_token").cast<std::string>();
  c.inference_token = get("inference_token").cast<std::string>();
  c.limits.max_inputs = get("max_inputs").cast<int64_t>();
  c.limits.max_rank = get("max_rank").cast<int64_t>();
  c.limits.max_elements = get("max_elements").cast<int64_t>();
  c.max_queue = get("max_queue").cast<int>();
  c.workers = get("workers").cast<int>();
  c.max_threads = get("max_threads").cast<int>();
  c.max_pending = get("max_pending").cast<int>();
  c.max_calls = get("max_calls").cast<int>();
  c.max_streams = get("max_streams").cast<int>();
  c.stream_idle_s = get("stream_idle_s").cast<double>();
  c.max_concurrent_streams = get("max_concurrent_streams").cast<int>();
  c.max_connection_idle_ms = get("max_connection_idle_ms").cast<int64_t>();
  c.tls_cert = get("tls_cert").cast<std::string>();
  c.tls_key = get("tls_key").cast<std::string>();
  c.tls_ca = get("tls_ca").cast<std::string>();
  c.lowerbound_hint = get("lowerbound_hint").cast<std::string>();
  for (auto m : get("streaming")) c.streaming.insert(m.cast<std::string>());
  return c;
}

}  // namespace

void bind_port(py::module_& m) {
  m.def(
      "port_set_dtypes",
      [](const std::vector<std::tuple<uint64_t, int, std::string, std::string>>& table) {
        std::vector<wire::DType> out;
        for (const auto& [wire_number, scalar, name, oip] : table) {
          out.push_back({wire_number, static_cast<at::ScalarType>(scalar), name, oip});
        }
        wire::set_dtypes(std::move(out));
      },
      py::arg("table"));

  py::class_<BridgeCall, std::shared_ptr<BridgeCall>>(m, "BridgeCall", py::module_local())
      .def_readonly("id", &BridgeCall::id)
      .def_readonly("method", &BridgeCall::method)
      .def_readonly("peer", &BridgeCall::peer)
      .def_readonly("is_admin", &BridgeCall::is_admin)
      .def_readonly("admin_rpcs", &BridgeCall::admin_rpcs)
      .def_property_readonly("metadata",
                             [](const BridgeCall& c) {
                               py::list out;
                               for (const auto& [k, v] : c.metadata) {
                                 out.append(py::make_tuple(k, metadata_value(k, v)));
                               }
                               return py::tuple(out);
                             })
      .def("time_remaining",
           [](const BridgeCall& c) -> py::object {
             double left = c.time_remaining();
             return left < 0 ? py::object(py::none()) : py::object(py::float_(left));
           })
      .def("is_active", &BridgeCall::active, release())
      .def("read",
           [](BridgeCall& c) -> py::object {
             std::optional<grpc::ByteBuffer> msg;
             {
               py::gil_scoped_release unlocked;
               msg = c.read();
             }
             if (!msg) return py::none();
             // Straight from gRPC's slices into the bytes object: one copy, and the
             // slices are freed as soon as it is made.
             PyObject* out = PyBytes_FromStringAndSize(nullptr, Py_ssize_t(msg->Length()));
             if (!out) throw py::error_already_set();
             {
               py::gil_scoped_release unlocked;
               std::vector<grpc::Slice> slices;
               (void)msg->Dump(&slices);
               char* w = PyBytes_AS_STRING(out);
               for (const auto& s : slices) {
                 std::memcpy(w, s.begin(), s.size());
                 w += s.size();
               }
               slices.clear();
               msg.reset();
             }
             return py::reinterpret_steal<py::bytes>(out);
           })
      .def("write",
           [](BridgeCall& c, const py::bytes& data) {
             std::string msg = data;
             py::gil_scoped_release unlocked;
             return c.write(msg);
           })
      .def("finish", &BridgeCall::finish, py::arg("code"), py::arg("details"),
           py::arg("trailers"), release());

  py::class_<Stats, std::shared_ptr<Stats>>(m, "PortStats", py::module_local())
      .def(py::init<std::vector<double>>(), py::arg("latency_buckets"))
      .def("record_request",
           [](Stats& self, const std::string& model, const std::string& method, int code,
              double seconds) { self.method(model, method)->record(code, seconds); },
           py::arg("model"), py::arg("method"), py::arg("code"), py::arg("seconds"))
      .def("record_run",
           [](Stats& self, const std::string& model, const std::string& device, double queued,
              double computed) { self.device(model, device)->record(queued, computed); },
           py::arg("model"), py::arg("device"), py::arg("queued"), py::arg("computed"))
      .def("add_in_flight",
           [](Stats& self, const std::string& method, int delta) {
             self.in_flight(method)->fetch_add(delta);
           },
           py::arg("method"), py::arg("delta"))
      .def("record_batch",
           [](Stats& self, const std::string& model, int64_t rows, double computed) {
             self.batch(model, rows)->record(computed);
           },
           py::arg("model"), py::arg("rows"), py::arg("computed"))
      .def("add_load",
           [](Stats& self, const std::string& model, int in_flight, int queued) {
             auto* l = self.load(model);
             l->in_flight.fetch_add(in_flight);
             l->queued.fetch_add(queued);
           },
           py::arg("model"), py::arg("in_flight"), py::arg("queued"))
      .def("stats",
           [](Stats& self) {
             auto s = self.snapshot();
             py::dict out;
             out["methods"] = s.methods;
             out["devices"] = s.devices;
             out["in_flight"] = s.in_flight;
             out["outcomes"] = s.outcomes;
             out["batches"] = s.batches;
             out["load"] = s.load;
             out["io"] = s.io;
             py::dict hot;
             hot["Run"] = s.hot_run;
             hot["ModelInfer"] = s.hot_infer;
             out["hot"] = hot;
             out["buckets"] = self.bounds();
             return out;
           });

  py::class_<Port>(m, "PortServer", py::module_local())
      .def(py::init([](const py::dict& config, std::shared_ptr<Stats> stats) {
             return std::make_unique<Port>(make_config(config), std::move(stats));
           }),
           py::arg("config"), py::arg("stats"))
      .def("listen", &Port::listen, py::arg("address"), py::arg("admin_rpcs"), release())
      .def(
          "add_model",
          [](Port& self, const std::string& name,
             const std::vector<std::tuple<std::string, std::optional<uint64_t>,
                                          std::optional<std::vector<int64_t>>,
                                          std::vector<int64_t>, std::vector<int64_t>,
                                          std::string>>& inputs,
             const std::vector<std::string>& outputs,
             const std::vector<std::tuple<py::capsule, py::capsule, int, std::string>>& replicas,
             const std::string& version, int64_t batch_max_size, double batch_max_delay_s,
             const std::vector<std::vector<std::pair<int, int>>>& ties) {
            auto model = std::make_shared<PortModel>();
            model->name = name;
            model->ties = ties;
            if (batch_max_size >= 2) {
              model->batcher = std::make_unique<Batcher>(batch_max_size, batch_max_delay_s);
            }
            for (const auto& [n, wire_dtype, shape, lower, upper, bounds] : inputs) {
              InputSpec spec;
              spec.name = n;
              if (wire_dtype) spec.dtype = wire::by_wire(*wire_dtype);
              if (shape) {
                spec.has_shape = true;
                spec.shape = *shape;
              }
              spec.lower = lower;
              spec.upper = upper;
              spec.bounds_text = bounds;
              spec.run_label =
                  "input " + std::to_string(model->inputs.size()) + " ('" + spec.name + "')";
              spec.infer_label = "input '" + spec.name + "'";
              model->inputs.push_back(std::move(spec));
            }
            model->outputs = outputs;
            for (const auto& [run, swap, capacity, device] : replicas) {
              PortReplica r;
              r.run = *static_cast<RunFn*>(run.get_pointer());
              r.swap = *static_cast<SwapFn*>(swap.get_pointer());
              r.capacity = std::max(1, capacity);
              for (int slot = r.capacity - 1; slot >= 0; --slot) r.free_slots.push_back(slot);
              r.pool = self.pool(device);
              r.stats = self.stats().device(name, device);
              model->replicas.push_back(std::move(r));
            }
            model->version = version;
            model->load = self.stats().load(name);
            self.add_model(std::move(model));
          },
          py::arg("name"), py::arg("inputs"), py::arg("outputs"), py::arg("replicas"),
          py::arg("version"), py::arg("batch_max_size") = 0, py::arg("batch_max_delay_s") = 0.0,
          py::arg("ties") = std::vector<std::vector<std::pair<int, int>>>{})
      .def("warm", &Port::warm, py::arg("name"), py::arg("inputs"), release())
      .def("remove_model", &Port::remove_model, py::arg("name"), release())
      .def("flip", &Port::flip, py::arg("name"), py::arg("version"), release())
      .def("lock_weights", &Port::lock_weights, py::arg("name"), release())
      .def("unlock_weights", &Port::unlock_weights, py::arg("name"), py::arg("version"), release())
      .def("set_region", &Port::set_region, py::arg("kind"), py::arg("name"), py::arg("bytes"),
           release())
      .def("drop_region", &Port::drop_region, py::arg("kind"), py::arg("name"), release())
      .def("set_health", &Port::set_health, py::arg("service"), py::arg("serving"))
      .def("set_draining", &Port::set_draining)
      .def("wait_idle", &Port::wait_idle, py::arg("timeout_s"), release())
      .def("stop", &Port::stop, py::arg("grace_s"), release())
      .def("next_item",
           [](Port& self) -> py::object {
             std::optional<BridgeItem> item;
             {
               py::gil_scoped_release unlocked;
               item = self.bridge().next();
             }
             if (!item) return py::none();
             if (item->call) return py::cast(item->call);
             return py::int_(item->cancelled);
           })
      .def("next_log",
           [](Port& self) -> py::object {
             std::optional<std::string> line;
             {
               py::gil_scoped_release unlocked;
               line = self.next_log();
             }
             return line ? py::object(py::str(*line)) : py::object(py::none());
           })
      .def("copied_bytes", &Port::copied_bytes)
      .def("pending_log", &Port::pending_log)
      .def("watchers", &Port::watchers)
      .def("hold_runner", &Port::hold_runner, py::arg("name"))
      .def("release_runner", &Port::release_runner, py::arg("name"))
      .def("pool_state",
           [](Port& self, const std::string& device) {
             auto* p = self.pool(device);
             return py::make_tuple(p->running.load(), p->waiting.load());
           },
           py::arg("device"));
}

}  // namespace aotiserve
