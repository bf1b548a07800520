"""``inference.GRPCInferenceService``: the Open Inference Protocol (KServe v2) over the data plane.

Like the ``aotiserve.v1`` servicer, this only converts proto ↔ torch (``oip_codec``) and
calls :class:`~aotiserve.server.dataplane.DataPlane`; status codes come from the
error table through the one interceptor. Served on the daemon's port next to
``aotiserve.v1.ModelRunner``, so Triton/KServe clients (``tritonclient``)
work unchanged. ``ModelInfer`` reaches this servicer only for requests the port's C++
hot path leaves to Python (``port.Port.why_not``), one message of a ``ModelStreamInfer``
stream included: the port answers streams itself, message by message, and hands such a
message here as a ``ModelInfer``.

What is served: health, server/model metadata, model config (a small
Triton-style subset), ModelInfer with ``raw_input_contents`` or typed
``contents`` (FP16/BF16 raw only), answers in ``raw_output_contents``,
requested-output filtering, id and parameter echo, and the model repository
(index, load, unload of ``<model-repository>/<name>.pt2``). A
model's version is its active weights version (``initial`` for the packaged weights).
Inputs and outputs in system or CUDA shared memory (``shared_memory.py``; the
register/status/unregister RPCs are served here). BYTES tensors, trace/log settings and
classification answer UNIMPLEMENTED; sequence parameters INVALID_ARGUMENT.
ModelStatistics: oip_statistics.py.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import torch

from . import oip_codec as oc
from . import oip_statistics
from . import tensor_codec as codec
from .config import ServeConfig
from .dataplane import DataPlane
from .errors import InvalidArgument, NotFound, Unimplemented
from .interceptors import call_deadline
from .io_specs import IOSpec
from .oip_codec import SERVICE_NAME
from .oip_regions import SharedMemoryRpcs
from .oip_repository import RepositoryRpcs
from .served_model import ServedModel

log = logging.getLogger(__name__)

SERVER_NAME = "aotiserve"
PLATFORM = "pytorch_aoti"
BACKEND = "aotiserve"
# ServerMetadata's extensions, beside the shared-memory ones this daemon serves
# (SharedMemoryRegions.extensions).
EXTENSIONS = ("model_repository", "model_configuration", "parameters", "statistics")


# ---------------------------------------------------------------- the servicer


class OipServicer(RepositoryRpcs, SharedMemoryRpcs):
    """One method per RPC of ``inference.GRPCInferenceService`` (the model repository's and
    shared memory's in their own modules)."""

    def __init__(self, plane: DataPlane, config: ServeConfig):
        self.plane = plane
        self.repository = Path(config.model_repository) if config.model_repository else None
        self.pb = oc.messages()
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
            name=SERVER_NAME,
            version=self.version,
            extensions=EXTENSIONS + self.plane.shared_memory.extensions,
        )

    def ModelMetadata(self, request, context):
        info = self.plane.describe(request.name)
        version = info.active_version.id if info.active_version else ""
        self._check_version(request.name, request.version, version)
        tm = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=info.name,
            versions=[version] if version else [],
            platform=PLATFORM,
            inputs=[
                tm(name=s.name, datatype=oc.spec_datatype(s), shape=oc.spec_shape(s))
                for s in info.inputs
            ],
            outputs=[
                tm(name=s.name, datatype=oc.spec_datatype(s), shape=oc.spec_shape(s))
                for s in info.outputs
            ],
        )

    def ModelConfig(self, request, context):
        info = self.plane.describe(request.name)
        self._check_version(
            request.name, request.version, info.active_version.id if info.active_version else ""
        )
        pb = self.pb

        def config_dtype(s: IOSpec) -> int:
            name = oc.spec_datatype(s)
            return pb.config_dtype.get(f"TYPE_{name}", 0) if name else 0

        config = pb.ModelConfig(
            name=info.name,
            platform=PLATFORM,
            backend=BACKEND,
            max_batch_size=0,
            input=[
                pb.ModelInput(name=s.name, data_type=config_dtype(s), dims=oc.spec_shape(s))
                for s in info.inputs
            ],
            output=[
                pb.ModelOutput(name=s.name, data_type=config_dtype(s), dims=oc.spec_shape(s))
                for s in info.outputs
            ],
        )
        return pb.ModelConfigResponse(config=config)

    # Inference ---------------------------------------------------------------

    def ModelInfer(self, request, context):
        model = self.plane.model(request.model_name)
        if request.model_version:
            self._check_version(model.name, request.model_version, self.plane.active_version(model))
        if request.parameters:
            oc.check_request_parameters(request.parameters, model.name)
        inputs = self._decode_inputs(model, request)
        selected = self._selected_outputs(model, request.outputs) if request.outputs else None
        result = self.plane.run(model, inputs, call_deadline(context), context)
        response = self.pb.ModelInferResponse(
            model_name=model.name, model_version=result.weights_version, id=request.id
        )
        if request.parameters:
            for key, value in request.parameters.items():
                response.parameters[key].CopyFrom(value)
        outputs = result.outputs
        specs = model.outputs
        if selected is None:
            selected = [(i, None, None) for i in range(len(outputs))]
        # As in Triton, an output in shared memory has an empty raw entry where others
        # have theirs (raw_output_contents lines up with outputs), and none when all are.
        any_raw = any(dest is None for _i, dest, _out in selected)
        for i, dest, requested in selected:
            tensor = outputs[i]
            name = specs[i].name if i < len(specs) else f"output__{i}"
            what = f"output {name!r}"
            entry = response.outputs.add(
                name=name, datatype=oc.oip_datatype(tensor.dtype, what), shape=tensor.shape
            )
            if dest is None:
                response.raw_output_contents.append(codec.tensor_bytes(tensor))
                continue
            nbytes = oc.write_region(dest, tensor, what)
            for key in ("shared_memory_region", "shared_memory_offset"):
                if key in requested.parameters:
                    entry.parameters[key].CopyFrom(requested.parameters[key])
            entry.parameters["shared_memory_byte_size"].int64_param = nbytes
            if any_raw:
                response.raw_output_contents.append(b"")
        self.plane.shared_memory.check_unshrunk([*request.inputs, *request.outputs])
        return response

    def _decode_inputs(self, model: ServedModel, request) -> list[torch.Tensor]:
        specs = model.inputs
        index = {s.name: i for i, s in enumerate(specs)}
        shared = [self._in_shared_memory(inp) for inp in request.inputs]
        raw = request.raw_input_contents
        # As in Triton, raw_input_contents holds one entry per input not in shared memory.
        sent = len(shared) - sum(shared)
        if raw and len(raw) != sent:
            raise InvalidArgument(
                f"raw_input_contents has {len(raw)} entries for {sent} inputs "
                "(inputs in shared memory have none)"
            )
        tensors: list[torch.Tensor | None] = [None] * len(specs)
        limits = self.plane.limits
        next_raw = 0
        for inp, in_shared in zip(request.inputs, shared):
            what = f"input {inp.name!r}"
            slot = index.get(inp.name)
            if slot is None:
                raise InvalidArgument(
                    f"{what}: model {model.name!r} has no such input "
                    f"(its inputs: {', '.join(index)})"
                )
            if tensors[slot] is not None:
                raise InvalidArgument(f"{what} is given twice")
            dtype = oc.torch_dtype(inp.datatype, what)
            want = specs[slot].dtype
            if want is not None and dtype != want:  # the data plane checks too; this speaks OIP
                raise InvalidArgument(
                    f"{what}: datatype must be {oc.spec_datatype(specs[slot])}, got {inp.datatype}"
                )
            has_contents = inp.HasField("contents")
            if in_shared:
                if has_contents:
                    raise InvalidArgument(
                        f"{what}: its data is in shared memory; the request must not carry it too"
                    )
                tensor = self._shared_input(inp, dtype, what, limits)
                if tensor.device.type == "cuda" and not any(
                    d.startswith("cuda") for d in model.devices
                ):
                    tensor = tensor.cpu()  # a CUDA region's input for a model on the CPU
            elif raw:
                if has_contents:
                    raise InvalidArgument(
                        f"{what}: typed contents and raw_input_contents cannot "
                        "be mixed in one request"
                    )
                tensor = oc.decode_raw(raw[next_raw], dtype, inp.shape, what, limits)
                next_raw += 1
            elif has_contents:
                tensor = oc.decode_typed(inp.contents, inp.datatype, dtype, inp.shape, what, limits)
            else:
                raise InvalidArgument(
                    f"{what} carries no data (neither contents nor raw_input_contents)"
                )
            tensors[slot] = tensor
        missing = [specs[i].name for i, t in enumerate(tensors) if t is None]
        if missing:
            raise InvalidArgument(
                f"model {model.name!r}: missing input(s) {', '.join(repr(m) for m in missing)}"
            )
        return tensors  # type: ignore[return-value]

    @staticmethod
    def _in_shared_memory(tensor) -> bool:
        return "shared_memory_region" in tensor.parameters

    def _shared_input(self, inp, dtype: torch.dtype, what: str, limits) -> torch.Tensor:
        """An input read in place from a shared-memory region (a copy where its offset
        does not meet torch's alignment for the dtype)."""
        numel = codec.checked_numel(inp.shape, what, limits)
        data = self.plane.shared_memory.tensor_bytes(inp.parameters, what, numel * dtype.itemsize)
        return oc.decode_region(data, dtype, inp.shape, what)

    def _selected_outputs(
        self, model: ServedModel, requested
    ) -> list[tuple[int, torch.Tensor | None, Any]]:
        """(output index, the shared-memory bytes it goes to or None, the request's entry)
        per requested output; regions are checked before the run."""
        index = {s.name: i for i, s in enumerate(model.outputs)}
        selected = []
        for out in requested:
            what = f"requested output {out.name!r}"
            i = index.get(out.name)
            if i is None:
                raise InvalidArgument(
                    f"{what}: model {model.name!r} has no such output "
                    f"(its outputs: {', '.join(index)})"
                )
            if "classification" in out.parameters:
                raise Unimplemented(f"{what}: the classification extension is not supported")
            dest = self.plane.shared_memory.tensor_bytes(out.parameters, what, None)
            selected.append((i, dest, out))
        return selected

    # Statistics --------------------------------------------------------------

    def ModelStatistics(self, request, context):
        if self.plane.metrics is None:
            raise Unimplemented("ModelStatistics: this server keeps no statistics")
        return oip_statistics.model_statistics(
            self.pb,
            self.plane.metrics.stats,
            self.plane.served_versions(),
            request.name,
            request.version,
        )

    # Versions ----------------------------------------------------------------

    def _active_version(self, name: str) -> str:
        info = self.plane.describe(name)
        return info.active_version.id if info.active_version else ""

    @staticmethod
    def _check_version(model: str, requested: str, active: str) -> None:
        if requested and requested != active:
            raise NotFound(
                f"model {model!r} has no version {requested!r} (serving version {active!r})"
            )


# ---------------------------------------------------------------- registration


def _unimplemented(method: str) -> Callable:
    def handler(request_or_iterator, context):
        raise Unimplemented(f"{SERVICE_NAME}/{method} is not supported by aotiserve")

    return handler


def add_to_server(plane: DataPlane, config: ServeConfig, server: grpc.Server) -> None:
    """Registers the service (every method: the ones we serve, the rest UNIMPLEMENTED)."""
    servicer = OipServicer(plane, config)
    pb = servicer.pb
    infer = oc.bounded(pb.ModelInferRequest.FromString, plane.limits.wire)
    deserializers = {"ModelInfer": infer}
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
            fn,
            request_deserializer=deserializers.get(method.name, request_cls.FromString),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
