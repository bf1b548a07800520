"""``aotiserve.v1.ModelRunner``: proto ↔ domain (``runner_codec``), then one data-plane call.

No decisions and no status codes here: the data plane decides, and
``interceptors.ServingInterceptor`` turns its exceptions into status codes. ``Run``
reaches this servicer only for models the port's C++ hot path leaves to Python
(``port.Port.why_not``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator

import grpc

from aotiserve.client import wire
from aotiserve.v1 import model_runner_pb2 as pb
from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc

from . import run_wire, upload_codec
from . import runner_codec as rc
from . import tensor_codec as codec
from .dataplane import DataPlane
from .errors import InvalidArgument
from .interceptors import call_deadline, current_call, set_call_model

log = logging.getLogger(__name__)

WEIGHTS_VERSION_TRAILER = "aotiserve-weights-version"
SERVICE_NAME = "aotiserve.v1.ModelRunner"


def _author(context: grpc.ServicerContext) -> str:
    call = current_call()
    return "admin" if call is not None and call.is_admin else context.peer()


class RunnerServicer(pb_grpc.ModelRunnerServicer):
    def __init__(self, plane: DataPlane, extract_chunk_bytes: int, max_message_bytes: int):
        self.plane = plane
        self.chunk_bytes = extract_chunk_bytes
        # Room for the chunk's other fields inside one message.
        self.max_chunk_bytes = max(1024, max_message_bytes - 64 * 1024)

    def Run(self, request: run_wire.RunRequestView, context) -> bytes:
        model = self.plane.model(request.model)
        inputs = rc.decode_inputs(request.inputs, self.plane.input_plan(model), self.plane.limits)
        result = self.plane.run(model, inputs, call_deadline(context), context)
        context.set_trailing_metadata(((WEIGHTS_VERSION_TRAILER, result.weights_version),))
        # RunResponse wire bytes in one join (see add_to_server and run_wire).
        outputs = result.outputs
        return run_wire.write_run_response(
            outputs, [codec.wire_dtype(t.dtype) for t in outputs], result.weights_version
        )

    def GetCallSpec(self, request, context) -> pb.GetCallSpecResponse:
        in_spec, out_spec = self.plane.call_spec(request.model)
        return pb.GetCallSpecResponse(in_spec=in_spec, out_spec=out_spec)

    def GetConstantNamesToOriginalFqns(self, request, context):
        return pb.GetConstantNamesToOriginalFqnsResponse(
            fqns=self.plane.constant_fqns(request.model)
        )

    def GetConstantNamesToDtypes(self, request, context):
        return pb.GetConstantNamesToDtypesResponse(dtypes=self.plane.constant_dtypes(request.model))

    def ExtractConstantsMap(
        self, request: pb.ExtractConstantsMapRequest, context
    ) -> Iterator[pb.ConstantChunk]:
        if request.chunk_bytes < 0:
            raise InvalidArgument(f"chunk_bytes must be >= 0, got {request.chunk_bytes}")
        chunk = min(request.chunk_bytes or self.chunk_bytes, self.max_chunk_bytes)
        with self.plane.weight_stream("ExtractConstantsMap"):
            yield from self._extract_chunks(request, context, chunk)

    def _extract_chunks(
        self, request: pb.ExtractConstantsMapRequest, context, chunk: int
    ) -> Iterator[pb.ConstantChunk]:
        for piece in self.plane.extract_chunks(
            request.model, request.use_inactive, chunk, context.is_active
        ):
            yield rc.constant_chunk(piece)

    def UpdateConstantBuffer(
        self, request_iterator: Iterable[pb.UpdateConstantBufferRequest], context
    ) -> pb.UpdateConstantBufferResponse:
        with self.plane.weight_stream("UpdateConstantBuffer"):
            it = iter(request_iterator)
            first = next(it, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidArgument("the first message of an upload must be its header")
            set_call_model(first.header.model)
            upload = self.plane.begin_upload(rc.upload_header(first.header), _author(context))

            def receive() -> None:
                for message in it:
                    if message.WhichOneof("part") != "chunk":
                        raise InvalidArgument("only chunks may follow the header")
                    chunk = message.chunk
                    upload.add_chunk(chunk.name, chunk.offset, chunk.data)

            try:
                self.plane.in_background(receive)
            except BaseException:
                upload.discard()  # cancel or bad chunk: nothing applied, staging freed
                raise
            if not context.is_active():
                upload.discard()
                return pb.UpdateConstantBufferResponse()
            version, received, names = upload.commit()
        return pb.UpdateConstantBufferResponse(
            version=rc.version(version), bytes_received=received, updated=names
        )

    def SwapConstantBuffer(self, request, context) -> pb.SwapConstantBufferResponse:
        return pb.SwapConstantBufferResponse(
            active_version=rc.version(self.plane.swap(request.model))
        )

    def RollbackConstantBuffer(self, request, context) -> pb.RollbackConstantBufferResponse:
        return pb.RollbackConstantBufferResponse(
            active_version=rc.version(self.plane.rollback(request.model))
        )

    def FreeInactiveConstantBuffer(self, request, context):
        self.plane.free_inactive(request.model)
        return pb.FreeInactiveConstantBufferResponse()

    def UpdateConstantBufferFromBlob(self, request, context):
        version = self.plane.update_from_blob(request.model, request.weights_path, _author(context))
        return pb.UpdateConstantBufferFromBlobResponse(version=rc.version(version))

    def LoadWeights(self, request: pb.LoadWeightsRequest, context) -> pb.LoadWeightsResponse:
        with self.plane.weight_stream("LoadWeights"):
            version, staged, names = self.plane.load_weights(
                request.model,
                request.path,
                request.validate_full_updates,
                request.description,
                _author(context),
                context.is_active,
            )
        return pb.LoadWeightsResponse(
            version=rc.version(version), bytes_staged=staged, updated=names
        )

    def LoadWeightsFromCuda(
        self, request: pb.LoadWeightsFromCudaRequest, context
    ) -> pb.LoadWeightsFromCudaResponse:
        with self.plane.weight_stream("LoadWeightsFromCuda"):
            version, staged, names = self.plane.load_weights_from_cuda(
                rc.cuda_handoff(request), _author(context), context.is_active
            )
        return pb.LoadWeightsFromCudaResponse(
            version=rc.version(version), bytes_staged=staged, updated=names
        )

    def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        info = self.plane.load_model(
            request.name,
            request.path,
            list(request.devices),
            request.runners_per_device,
            request.package_model or None,
        )
        return pb.LoadModelResponse(model=rc.model_info(info))

    def UnloadModel(self, request, context) -> pb.UnloadModelResponse:
        self.plane.unload_model(request.name)
        return pb.UnloadModelResponse()

    def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[rc.model_info(i) for i in self.plane.list_models()])


class _WithWireRun:
    """The server as the generated ``add_ModelRunnerServicer_to_server`` sees it: Run's
    handler is swapped for one that parses and writes the wire bytes itself
    (``run_wire``: tensor data viewed where grpcio received it, one copy out), and
    UpdateConstantBuffer's parser for ``upload_codec``'s (chunk payloads viewed), and
    LoadWeightsFromCuda's for one that counts its tensors (one per constant, as many as
    an upload may declare), all within the server's bounds. Same service, same messages on
    the wire; every other method keeps the generated codec."""

    def __init__(self, server: grpc.Server, bounds):
        self._server = server
        self._bounds = bounds

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # added with the registered ones below, Run swapped

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        handlers = dict(handlers)
        run = handlers["Run"]
        handlers["Run"] = grpc.unary_unary_rpc_method_handler(
            run.unary_unary,
            request_deserializer=_counting(run_wire.parse_run_request, self._bounds),
            response_serializer=run_wire.identity,
        )
        handoff = handlers["LoadWeightsFromCuda"]
        handlers["LoadWeightsFromCuda"] = grpc.unary_unary_rpc_method_handler(
            handoff.unary_unary,
            request_deserializer=_counting(_parse_cuda_handoff, self._bounds),
            response_serializer=handoff.response_serializer,
        )
        upload = handlers["UpdateConstantBuffer"]
        handlers["UpdateConstantBuffer"] = grpc.stream_unary_rpc_method_handler(
            upload.stream_unary,
            request_deserializer=_counting(upload_codec.decode_update_request, self._bounds),
            response_serializer=upload.response_serializer,
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),)
        )
        self._server.add_registered_method_handlers(service, handlers)


# LoadWeightsFromCudaRequest as wire.check_bounds walks it: a tensor per constant (bounded
# as an upload header's declared constants are), each with a shape and strides.
_CUDA_HANDOFF = {
    4: wire.Rule(
        "entries",
        {3: wire.Rule("dims"), 4: wire.Rule("dims")},
        entries="tensors",
        bound="max_constants",
    )
}


def _parse_cuda_handoff(raw: bytes, bounds: wire.Bounds) -> pb.LoadWeightsFromCudaRequest:
    """Past a bound: ``wire.BoundError``, which the interceptor answers INVALID_ARGUMENT."""
    wire.check_bounds(raw, _CUDA_HANDOFF, bounds, "LoadWeightsFromCudaRequest")
    return pb.LoadWeightsFromCudaRequest.FromString(raw)


def _counting(parse, bounds):
    """``parse`` with ``bounds``, marked as counting what it reads (the interceptor
    leaves its bytes to it)."""
    deserialize = functools.partial(parse, bounds=bounds)
    deserialize.bounded = True
    return deserialize


def add_to_server(plane: DataPlane, config, server: grpc.Server) -> None:
    pb_grpc.add_ModelRunnerServicer_to_server(
        RunnerServicer(plane, config.extract_chunk_bytes, config.max_message_bytes),
        _WithWireRun(server, plane.limits.wire),
    )
