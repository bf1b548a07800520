"""``inference.GRPCInferenceService``: the Open Inference Protocol (KServe v2) over the data plane.

Like the native servicer, this only converts proto ↔ torch and calls
:class:`~aotiserve.server.dataplane.DataPlane`; status codes come from the
error table through the one interceptor. Served on the daemon's port next to
``aotiserve.v1.ModelRunner``, so Triton/KServe clients (``tritonclient``)
work unchanged.

Private descriptor pool. Our generated ``aotiserve.oip.inference_pb2`` and
tritonclient both register messages named ``inference.*`` in protobuf's
process-wide default pool, which refuses the second registration. So the
server never imports the generated module: it loads the same compiled
descriptor (read from that module's source, not executed) into a pool of its
own. A process embedding the server can then import tritonclient too (bench,
in-process tests); only ``aotiserve.oip`` and tritonclient still exclude each
other. Server reflection lists this service but cannot describe its messages.

What is served: health, server/model metadata, model config (a small
Triton-style subset), ModelInfer with ``raw_input_contents`` or typed
``contents`` (FP16/BF16 raw only), answers in ``raw_output_contents``,
requested-output filtering, id and parameter echo, ModelStreamInfer (one
response per request, in order, errors in-band: a request refused, even one that
does not decode, gets its error in its response and the stream goes on), and the
model repository (index, load, unload of ``<model-repository>/<name>.pt2``). A
model's version
is its active weights version (``initial`` for the packaged weights). BYTES
tensors, shared memory, trace/log settings and classification answer
UNIMPLEMENTED; sequence parameters INVALID_ARGUMENT. ModelStatistics: oip_statistics.py.

Bounds. protobuf builds one object per repeated entry, so inference requests are
walked first (``wire.check_bounds``, keeping nothing): more inputs, requested
outputs, parameters or raw_input_contents entries than ``max_inputs``, a shape
longer than ``max_tensor_rank`` or a dimension above ``max_tensor_elements`` is
INVALID_ARGUMENT before protobuf sees the bytes.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import grpc
import numpy as np
import torch
from google.protobuf import descriptor_pool, message_factory

from aotiserve.client import dtypes as dt
from aotiserve.client import wire

from . import oip_statistics
from . import tensor_codec as codec
from .config import ServeConfig
from .dataplane import DataPlane
from .errors import InvalidArgument, NotFound, ServeError, Unimplemented, to_status
from .model_registry import IOSpec, ModelState, ServedModel, repository_models

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "aotiserve"
PLATFORM = "pytorch_aoti"
BACKEND = "aotiserve"
EXTENSIONS = ("model_repository", "model_configuration", "parameters", "statistics")
_GENERATED_MODULE = "aotiserve.oip.inference_pb2"


# ---------------------------------------------------------------- messages (private pool)


def _serialized_descriptor() -> bytes:
    """The generated module's FileDescriptorProto, read from its source without running it.

    It is the literal the module passes to ``AddSerializedFile``, so protoc
    stays the only thing that compiles the proto. Where there is no source
    (a .pyc-only install) the module is imported after all, which puts its
    messages in the default pool too.
    """
    spec = importlib.util.find_spec(_GENERATED_MODULE)
    if spec is None:
        raise ImportError(f"{_GENERATED_MODULE} is missing; run `make proto`")
    try:
        tree = ast.parse(Path(spec.origin or "").read_text())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        log.warning("no source for %s; importing it (tritonclient can no longer be imported "
                    "into this process)", _GENERATED_MODULE)
        return importlib.import_module(_GENERATED_MODULE).DESCRIPTOR.serialized_pb
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile"
                and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, bytes)):
            return node.args[0].value
    raise ImportError(f"no serialized descriptor found in {spec.origin}")


@functools.cache
def messages() -> SimpleNamespace:
    """The ``inference.*`` message classes, from a private descriptor pool."""
    serialized = _serialized_descriptor()
    pool = descriptor_pool.DescriptorPool()
    file = pool.AddSerializedFile(serialized)
    ns = SimpleNamespace(pool=pool, service=pool.FindServiceByName(SERVICE_NAME))
    for name in file.message_types_by_name:
        setattr(ns, name, message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}")))
    ns.config_dtype = {v.name: v.number for v in pool.FindEnumTypeByName("inference.DataType").values}
    return ns


# ---------------------------------------------------------------- datatypes


def _torch(d: dt.DType) -> torch.dtype | None:
    value = getattr(torch, d.torch_name, None)
    return value if isinstance(value, torch.dtype) else None


TORCH_BY_OIP: dict[str, torch.dtype] = {
    d.oip_name: _torch(d) for d in dt.DTYPES if d.oip_name and _torch(d) is not None
}
OIP_BY_TORCH: dict[torch.dtype, str] = {v: k for k, v in TORCH_BY_OIP.items()}

# Which InferTensorContents field carries each datatype, and numpy's name for
# the field's own element type (the wire width, before narrowing).
_TYPED_FIELDS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "bool"),
    "INT8": ("int_contents", "int32"),
    "INT16": ("int_contents", "int32"),
    "INT32": ("int_contents", "int32"),
    "INT64": ("int64_contents", "int64"),
    "UINT8": ("uint_contents", "uint32"),
    "UINT16": ("uint_contents", "uint32"),
    "UINT32": ("uint_contents", "uint32"),
    "UINT64": ("uint64_contents", "uint64"),
    "FP32": ("fp32_contents", "float32"),
    "FP64": ("fp64_contents", "float64"),
}
_ALL_TYPED_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                     "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents")

_SHARED_MEMORY_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_SEQUENCE_PARAMS = ("sequence_id", "sequence_start", "sequence_end")


def _torch_dtype(datatype: str, what: str) -> torch.dtype:
    dtype = TORCH_BY_OIP.get(datatype)
    if dtype is not None:
        return dtype
    if datatype == "BYTES":
        raise Unimplemented(f"{what}: BYTES tensors are not supported; aotiserve models take "
                            "numeric tensors")
    raise InvalidArgument(f"{what}: unknown datatype {datatype!r} (expected one of "
                          f"{', '.join(sorted(TORCH_BY_OIP))})")


def _oip_datatype(dtype: torch.dtype, what: str) -> str:
    name = OIP_BY_TORCH.get(dtype)
    if name is None:
        raise Unimplemented(f"{what}: dtype {codec.dtype_name(dtype)} has no Open Inference "
                            "Protocol datatype; use the native aotiserve.v1 API")
    return name


# ---------------------------------------------------------------- tensors


def _decode_raw(data: bytes, dtype: torch.dtype, shape: Sequence[int], what: str,
                limits: codec.Limits) -> torch.Tensor:
    """A tensor over ``data`` without a copy (the same contract as tensor_codec.decode)."""
    numel = codec.checked_numel(shape, what, limits)
    expected = numel * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{what}: expected {expected} bytes for {codec.describe(dtype, shape)}, got {len(data)}")
    if numel == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    tensor = torch.frombuffer(data, dtype=dtype).view(tuple(shape))
    if dtype == torch.bool and tensor.view(torch.uint8).max() > 1:
        raise InvalidArgument(f"{what}: BOOL tensor holds bytes other than 0 and 1")
    return tensor


def _decode_typed(contents: Any, datatype: str, dtype: torch.dtype, shape: Sequence[int],
                  what: str, limits: codec.Limits) -> torch.Tensor:
    numel = codec.checked_numel(shape, what, limits)
    field = _TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidArgument(f"{what}: {datatype} data travels only in raw_input_contents "
                              "(the protocol has no typed field for it)")
    name, wire_np = field
    values = getattr(contents, name)
    if len(values) != numel:
        others = [f for f in _ALL_TYPED_FIELDS if f != name and len(getattr(contents, f))]
        hint = f" (the request filled {', '.join(others)})" if others else ""
        raise InvalidArgument(f"{what}: expected {numel} {datatype} values in contents.{name} "
                              f"for shape {list(shape)}, got {len(values)}{hint}")
    array = np.array(values, dtype=wire_np)
    target = np.dtype(dt.BY_OIP_NAME[datatype].numpy_name)
    if target != array.dtype:
        if array.size and np.issubdtype(target, np.integer):
            info = np.iinfo(target)
            if array.min() < info.min or array.max() > info.max:
                raise InvalidArgument(f"{what}: a value in contents.{name} is out of range for "
                                      f"{datatype}")
        array = array.astype(target)
    return torch.from_numpy(array).view(tuple(shape))


def _check_tensor_parameters(parameters, what: str) -> None:
    for key in _SHARED_MEMORY_PARAMS:
        if key in parameters:
            raise Unimplemented(f"{what}: shared-memory tensors are not supported; send the data "
                                "in the request")


def _check_request_parameters(parameters, model: str) -> None:
    for key in _SEQUENCE_PARAMS:
        if key in parameters:
            p = parameters[key]
            which = p.WhichOneof("parameter_choice")
            if which is not None and getattr(p, which):
                raise InvalidArgument(f"model {model!r} is not a sequence model: sequence "
                                      f"batching ({key}) is not supported")


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e7:  # grpc's "no deadline"
        return None
    return time.monotonic() + remaining


def _shape(spec: IOSpec) -> list[int]:
    return list(spec.shape) if spec.shape is not None else []


def _datatype(spec: IOSpec) -> str:
    return OIP_BY_TORCH.get(spec.dtype, "") if spec.dtype is not None else ""


# ---------------------------------------------------------------- bounded parsing

# ModelInferRequest as wire.check_bounds walks it (parameters are map entries).
_PARAMETERS = wire.Rule("entries", entries="parameters")
_INFER_REQUEST = {
    4: _PARAMETERS,
    5: wire.Rule("entries", {1: wire.Rule("name"), 3: wire.Rule("dims"), 4: _PARAMETERS},
                 entries="inputs"),
    6: wire.Rule("entries", {1: wire.Rule("name"), 2: _PARAMETERS}, entries="requested outputs"),
    7: wire.Rule("entries", entries="raw_input_contents entries"),
}


def _bounded(parse: Callable[[bytes], Any], bounds: wire.Bounds) -> Callable[[bytes], Any]:
    """``parse`` (protobuf's) behind a walk of the bytes within ``bounds``."""
    def deserialize(raw: bytes):
        try:
            wire.check_bounds(raw, _INFER_REQUEST, bounds, "ModelInferRequest")
        except wire.BoundError as exc:
            raise InvalidArgument(str(exc)) from None
        return parse(raw)
    deserialize.bounded = True  # the interceptor leaves its bytes to it
    return deserialize


class _Refused:
    """A streamed request that could not be read: its error, answered in the stream."""

    def __init__(self, error: ServeError):
        self.error = error
        self.model_name = self.model_version = self.id = ""


def _in_stream(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserialize``, answering an unreadable request with a :class:`_Refused`
    (the interceptor would end the whole stream)."""
    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except ServeError as exc:
            return _Refused(exc)
        except Exception:  # noqa: BLE001 (DecodeError, RecursionError...)
            return _Refused(InvalidArgument("ModelStreamInfer: a request is not a valid message"))
    parse.bounded = True
    return parse


# ---------------------------------------------------------------- the servicer


class OipServicer:
    """One method per RPC of ``inference.GRPCInferenceService``."""

    def __init__(self, plane: DataPlane, config: ServeConfig):
        self.plane = plane
        self.repository = Path(config.model_repository) if config.model_repository else None
        self.pb = messages()
        try:
            self.version = importlib.metadata.version("aotiserve")
        except importlib.metadata.PackageNotFoundError:
            self.version = "0+unknown"

    # Health ------------------------------------------------------------------

    def ServerLive(self, request, context):
        return self.pb.ServerLiveResponse(live=self.plane.live())

    def ServerReady(self, request, context):
        return self.pb.ServerReadyResponse(ready=self.plane.ready())

    def ModelReady(self, request, context):
        ready = self.plane.model_ready(request.name)
        if ready and request.version:
            ready = self._active_version(request.name) == request.version
        return self.pb.ModelReadyResponse(ready=ready)

    # Metadata ----------------------------------------------------------------

    def ServerMetadata(self, request, context):
        return self.pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    def ModelMetadata(self, request, context):
        info = self.plane.describe(request.name)
        version = info.active_version.id if info.active_version else ""
        self._check_version(request.name, request.version, version)
        tm = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=info.name, versions=[version] if version else [], platform=PLATFORM,
            inputs=[tm(name=s.name, datatype=_datatype(s), shape=_shape(s)) for s in info.inputs],
            outputs=[tm(name=s.name, datatype=_datatype(s), shape=_shape(s)) for s in info.outputs])

    def ModelConfig(self, request, context):
        info = self.plane.describe(request.name)
        self._check_version(request.name, request.version,
                            info.active_version.id if info.active_version else "")
        pb = self.pb

        def config_dtype(s: IOSpec) -> int:
            name = _datatype(s)
            return pb.config_dtype.get(f"TYPE_{name}", 0) if name else 0

        config = pb.ModelConfig(
            name=info.name, platform=PLATFORM, backend=BACKEND, max_batch_size=0,
            input=[pb.ModelInput(name=s.name, data_type=config_dtype(s), dims=_shape(s))
                   for s in info.inputs],
            output=[pb.ModelOutput(name=s.name, data_type=config_dtype(s), dims=_shape(s))
                    for s in info.outputs])
        return pb.ModelConfigResponse(config=config)

    # Inference ---------------------------------------------------------------

    def ModelInfer(self, request, context):
        model = self.plane.model(request.model_name)
        if request.model_version:
            self._check_version(model.name, request.model_version, model.weights.active.id)
        if request.parameters:
            _check_request_parameters(request.parameters, model.name)
        inputs = self._decode_inputs(model, request)
        selected = self._selected_outputs(model, request.outputs) if request.outputs else None
        result = self.plane.run(model, inputs, _deadline(context), context)
        response = self.pb.ModelInferResponse(
            model_name=model.name, model_version=result.weights_version, id=request.id)
        if request.parameters:
            for key, value in request.parameters.items():
                response.parameters[key].CopyFrom(value)
        outputs = result.outputs
        specs = model.outputs
        for i in (selected if selected is not None else range(len(outputs))):
            tensor = outputs[i]
            name = specs[i].name if i < len(specs) else f"output__{i}"
            response.outputs.add(name=name, datatype=_oip_datatype(tensor.dtype, f"output {name!r}"),
                                 shape=tensor.shape)
            response.raw_output_contents.append(codec.tensor_bytes(tensor))
        return response

    def ModelStreamInfer(self, request_iterator, context):
        """ModelInfer per streamed request, answered in order. As in Triton, a failed
        request's error travels in its response (``error_message``) and the stream goes on."""
        for request in request_iterator:
            try:
                if isinstance(request, _Refused):
                    raise request.error
                response = self.ModelInfer(request, context)
            except grpc.RpcError:
                raise  # the client went away
            except Exception as exc:  # noqa: BLE001 (answered in the stream; bugs logged)
                code, message = to_status(exc, "ModelStreamInfer")
                yield self.pb.ModelStreamInferResponse(
                    error_message=f"{code.name}: {message}",
                    infer_response=self.pb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version,
                        id=request.id))
                continue
            yield self.pb.ModelStreamInferResponse(infer_response=response)

    def _decode_inputs(self, model: ServedModel, request) -> list[torch.Tensor]:
        specs = model.inputs
        index = {s.name: i for i, s in enumerate(specs)}
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for "
                                  f"{len(request.inputs)} inputs")
        tensors: list[torch.Tensor | None] = [None] * len(specs)
        limits = self.plane.limits
        for i, inp in enumerate(request.inputs):
            what = f"input {inp.name!r}"
            slot = index.get(inp.name)
            if slot is None:
                raise InvalidArgument(f"{what}: model {model.name!r} has no such input "
                                      f"(its inputs: {', '.join(index)})")
            if tensors[slot] is not None:
                raise InvalidArgument(f"{what} is given twice")
            if inp.parameters:
                _check_tensor_parameters(inp.parameters, what)
            dtype = _torch_dtype(inp.datatype, what)
            want = specs[slot].dtype
            if want is not None and dtype != want:  # the data plane checks too; this speaks OIP
                raise InvalidArgument(f"{what}: datatype must be {_datatype(specs[slot])}, "
                                      f"got {inp.datatype}")
            has_contents = inp.HasField("contents")
            if raw:
                if has_contents:
                    raise InvalidArgument(f"{what}: typed contents and raw_input_contents cannot "
                                          "be mixed in one request")
                tensor = _decode_raw(raw[i], dtype, inp.shape, what, limits)
            elif has_contents:
                tensor = _decode_typed(inp.contents, inp.datatype, dtype, inp.shape, what, limits)
            else:
                raise InvalidArgument(f"{what} carries no data (neither contents nor "
                                      "raw_input_contents)")
            tensors[slot] = tensor
        missing = [specs[i].name for i, t in enumerate(tensors) if t is None]
        if missing:
            raise InvalidArgument(f"model {model.name!r}: missing input(s) "
                                  f"{', '.join(repr(m) for m in missing)}")
        return tensors  # type: ignore[return-value]

    @staticmethod
    def _selected_outputs(model: ServedModel, requested) -> list[int]:
        index = {s.name: i for i, s in enumerate(model.outputs)}
        selected = []
        for out in requested:
            what = f"requested output {out.name!r}"
            i = index.get(out.name)
            if i is None:
                raise InvalidArgument(f"{what}: model {model.name!r} has no such output "
                                      f"(its outputs: {', '.join(index)})")
            if out.parameters:
                _check_tensor_parameters(out.parameters, what)
                if "classification" in out.parameters:
                    raise Unimplemented(f"{what}: the classification extension is not supported")
            selected.append(i)
        return selected

    # Model repository ----------------------------------------------------------

    def RepositoryIndex(self, request, context):
        entry = self.pb.RepositoryIndexResponse.ModelIndex
        loaded = {m.name: m for m in self.plane.list_models()}
        models = []
        for name in sorted(set(loaded) | set(self._repository_names())):
            info = loaded.get(name)
            if info is None:
                models.append(entry(name=name, state="UNAVAILABLE", reason="unloaded"))
                continue
            state = {ModelState.READY: "READY", ModelState.LOADING: "LOADING",
                     ModelState.UNLOADING: "UNLOADING"}.get(info.state, "UNAVAILABLE")
            models.append(entry(
                name=name, state=state, reason=info.error,
                version=info.active_version.id if info.active_version else ""))
        if request.ready:
            models = [m for m in models if m.state == "READY"]
        return self.pb.RepositoryIndexResponse(models=models)

    def RepositoryModelLoad(self, request, context):
        name = request.model_name
        for key in request.parameters:
            if key == "config" or key.startswith("file:"):
                raise Unimplemented(f"RepositoryModelLoad: the {key!r} parameter is not "
                                    "supported; put the package in the model repository")
        if self.plane.model_ready(name):
            return self.pb.RepositoryModelLoadResponse()  # already serving: nothing to do
        self.plane.load_from_repository(name)
        return self.pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        self.plane.unload_model(request.model_name)
        return self.pb.RepositoryModelUnloadResponse()

    def _repository_names(self) -> list[str]:
        if self.repository is None or not self.repository.is_dir():
            return []
        return list(repository_models(self.repository))

    # Statistics --------------------------------------------------------------

    def ModelStatistics(self, request, context):
        if self.plane.metrics is None:
            raise Unimplemented("ModelStatistics: this server keeps no statistics")
        served = {m.name: m.weights.active.id if m.weights else ""
                  for m in self.plane.registry.models() if m.state == ModelState.READY}
        return oip_statistics.model_statistics(self.pb, self.plane.metrics.stats, served,
                                               request.name, request.version)

    # Versions ----------------------------------------------------------------

    def _active_version(self, name: str) -> str:
        info = self.plane.describe(name)
        return info.active_version.id if info.active_version else ""

    @staticmethod
    def _check_version(model: str, requested: str, active: str) -> None:
        if requested and requested != active:
            raise NotFound(f"model {model!r} has no version {requested!r} "
                           f"(serving version {active!r})")


# ---------------------------------------------------------------- registration


def _unimplemented(method: str) -> Callable:
    def handler(request_or_iterator, context):
        raise Unimplemented(f"{SERVICE_NAME}/{method} is not supported by aotiserve")
    return handler


def add_to_server(plane: DataPlane, config: ServeConfig, server: grpc.Server) -> None:
    """Registers the service (every method: the ones we serve, the rest UNIMPLEMENTED)."""
    servicer = OipServicer(plane, config)
    pb = servicer.pb
    infer = _bounded(pb.ModelInferRequest.FromString, plane.limits.wire)
    deserializers = {"ModelInfer": infer, "ModelStreamInfer": _in_stream(infer)}
    handlers = {}
    for method in pb.service.methods:
        fn = getattr(servicer, method.name, None) or _unimplemented(method.name)
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            fn, request_deserializer=deserializers.get(method.name, request_cls.FromString),
            response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
