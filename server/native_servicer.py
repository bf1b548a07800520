"""``aotiserve.v1.ModelRunner``: converts proto ↔ domain and calls the data plane.

No decisions and no status codes here: the data plane decides, and
``interceptors.ServingInterceptor`` turns its exceptions into status codes.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Iterable, Iterator

import grpc

from aotiserve.v1 import model_runner_pb2 as pb
from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc

from . import run_wire, upload_codec
from . import tensor_codec as codec
from .dataplane import DataPlane, ModelInfo
from .errors import InvalidArgument
from .interceptors import current_call, set_call_model
from .model_registry import IOSpec
from .weights import WeightsVersion

log = logging.getLogger(__name__)

WEIGHTS_VERSION_TRAILER = "aotiserve-weights-version"
SERVICE_NAME = "aotiserve.v1.ModelRunner"


def _version(v: WeightsVersion | None) -> pb.WeightsVersion | None:
    return v.to_proto() if v is not None else None


def _spec(s: IOSpec) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=s.name,
        dtype=codec.WIRE_BY_TORCH_DTYPE.get(s.dtype, pb.DATA_TYPE_UNSPECIFIED) if s.dtype else 0,
        shape=list(s.shape) if s.shape is not None else [])


def model_info_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name, path=info.path, devices=info.devices,
        runners_per_device=info.runners_per_device, state=int(info.state),
        active_version=_version(info.active_version),
        staged_version=_version(info.staged_version),
        previous_version=_version(info.previous_version),
        updatable_constants=info.updatable_constants,
        inputs=[_spec(s) for s in info.inputs], outputs=[_spec(s) for s in info.outputs],
        metadata=info.metadata, error=info.error)


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    # grpc reports "no deadline" as an enormous remaining time.
    if remaining is None or remaining > 1e7:
        return None
    return time.monotonic() + remaining


def _author(context: grpc.ServicerContext) -> str:
    call = current_call()
    return "admin" if call is not None and call.is_admin else context.peer()


class NativeServicer(pb_grpc.ModelRunnerServicer):
    def __init__(self, plane: DataPlane, extract_chunk_bytes: int, max_message_bytes: int):
        self.plane = plane
        self.chunk_bytes = extract_chunk_bytes
        # Room for the chunk's other fields inside one message.
        self.max_chunk_bytes = max(1024, max_message_bytes - 64 * 1024)

    def Run(self, request: run_wire.RunRequestView, context) -> bytes:
        model = self.plane.model(request.model)
        inputs = self.plane.decode_inputs(model, request.inputs)
        result = self.plane.run(model, inputs, _deadline(context), context)
        context.set_trailing_metadata(((WEIGHTS_VERSION_TRAILER, result.weights_version),))
        # RunResponse wire bytes in one join (see add_to_server and run_wire).
        outputs = result.outputs
        return run_wire.write_run_response(
            outputs, [codec.wire_dtype(t.dtype) for t in outputs], result.weights_version)

    def GetCallSpec(self, request, context) -> pb.GetCallSpecResponse:
        in_spec, out_spec = self.plane.call_spec(request.model)
        return pb.GetCallSpecResponse(in_spec=in_spec, out_spec=out_spec)

    def GetConstantNamesToOriginalFqns(self, request, context):
        return pb.GetConstantNamesToOriginalFqnsResponse(fqns=self.plane.constant_fqns(request.model))

    def GetConstantNamesToDtypes(self, request, context):
        return pb.GetConstantNamesToDtypesResponse(dtypes=self.plane.constant_dtypes(request.model))

    def ExtractConstantsMap(self, request: pb.ExtractConstantsMapRequest,
                            context) -> Iterator[pb.ConstantChunk]:
        if request.chunk_bytes < 0:
            raise InvalidArgument(f"chunk_bytes must be >= 0, got {request.chunk_bytes}")
        chunk = min(request.chunk_bytes or self.chunk_bytes, self.max_chunk_bytes)
        with self.plane.weight_stream("ExtractConstantsMap"):
            yield from self._extract_chunks(request, context, chunk)

    def _extract_chunks(self, request: pb.ExtractConstantsMapRequest, context,
                        chunk: int) -> Iterator[pb.ConstantChunk]:
        model = self.plane.model(request.model)
        tensors, _version = self.plane.extract_constants(request.model, request.use_inactive)
        # The tensors alias the runner's buffers (no copy). Each read holds the buffers
        # alive (an unload waits for it, and fails later reads) and checks they still
        # hold the weights the stream started with (a swap or upload aborts the stream).
        snapshot = model.weights_snapshot()
        for name in sorted(tensors):
            tensor = tensors[name]
            dtype = codec.wire_dtype(tensor.dtype)
            shape = list(tensor.shape)
            with model.using_buffers():
                model.check_weights(snapshot)
                host = tensor if tensor.device.type == "cpu" else tensor.cpu()
                data = codec.byte_view(host.contiguous()).numpy()
            size = data.nbytes
            offset = 0
            while True:
                if not context.is_active():
                    return
                end = min(size, offset + chunk)
                with model.using_buffers():
                    model.check_weights(snapshot)
                    payload = data[offset:end].tobytes()
                yield pb.ConstantChunk(name=name, offset=offset, data=payload,
                                       dtype=dtype, shape=shape)
                offset = end
                if offset >= size:
                    break

    def UpdateConstantBuffer(self, request_iterator: Iterable[pb.UpdateConstantBufferRequest],
                             context) -> pb.UpdateConstantBufferResponse:
        with self.plane.weight_stream("UpdateConstantBuffer"):
            it = iter(request_iterator)
            first = next(it, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidArgument("the first message of an upload must be its header")
            set_call_model(first.header.model)
            upload = self.plane.begin_upload(first.header, _author(context))

            def receive() -> None:
                for message in it:
                    if message.WhichOneof("part") != "chunk":
                        raise InvalidArgument("only chunks may follow the header")
                    upload.add_chunk(message.chunk)

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
            version=version.to_proto(), bytes_received=received, updated=names)

    def SwapConstantBuffer(self, request, context) -> pb.SwapConstantBufferResponse:
        return pb.SwapConstantBufferResponse(active_version=self.plane.swap(request.model).to_proto())

    def RollbackConstantBuffer(self, request, context) -> pb.RollbackConstantBufferResponse:
        return pb.RollbackConstantBufferResponse(
            active_version=self.plane.rollback(request.model).to_proto())

    def FreeInactiveConstantBuffer(self, request, context):
        self.plane.free_inactive(request.model)
        return pb.FreeInactiveConstantBufferResponse()

    def UpdateConstantBufferFromBlob(self, request, context):
        version = self.plane.update_from_blob(request.model, request.weights_path, _author(context))
        return pb.UpdateConstantBufferFromBlobResponse(version=version.to_proto())

    def LoadWeights(self, request: pb.LoadWeightsRequest, context) -> pb.LoadWeightsResponse:
        with self.plane.weight_stream("LoadWeights"):
            version, staged, names = self.plane.load_weights(
                request.model, request.path, request.validate_full_updates, request.description,
                _author(context), context.is_active)
        return pb.LoadWeightsResponse(version=version.to_proto(), bytes_staged=staged,
                                      updated=names)

    def LoadWeightsFromCuda(self, request: pb.LoadWeightsFromCudaRequest,
                            context) -> pb.LoadWeightsFromCudaResponse:
        with self.plane.weight_stream("LoadWeightsFromCuda"):
            version, staged, names = self.plane.load_weights_from_cuda(
                request, _author(context), context.is_active)
        return pb.LoadWeightsFromCudaResponse(version=version.to_proto(), bytes_staged=staged,
                                              updated=names)

    def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        info = self.plane.load_model(request.name, request.path, list(request.devices),
                                     request.runners_per_device, request.package_model or None)
        return pb.LoadModelResponse(model=model_info_proto(info))

    def UnloadModel(self, request, context) -> pb.UnloadModelResponse:
        self.plane.unload_model(request.name)
        return pb.UnloadModelResponse()

    def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info_proto(i) for i in self.plane.list_models()])


class _WithWireRun:
    """The server as the generated ``add_ModelRunnerServicer_to_server`` sees it: Run's
    handler is swapped for one that parses and writes the wire bytes itself
    (``run_wire``: tensor data viewed where grpcio received it, one copy out), and
    UpdateConstantBuffer's parser for ``upload_codec``'s (chunk payloads viewed), both
    within the server's bounds. Same service, same messages on the wire; every other
    method keeps the generated codec."""

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
            response_serializer=run_wire.identity)
        upload = handlers["UpdateConstantBuffer"]
        handlers["UpdateConstantBuffer"] = grpc.stream_unary_rpc_method_handler(
            upload.stream_unary,
            request_deserializer=_counting(upload_codec.decode_update_request, self._bounds),
            response_serializer=upload.response_serializer)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),))
        self._server.add_registered_method_handlers(service, handlers)


def _counting(parse, bounds):
    """``parse`` with ``bounds``, marked as counting what it reads (the interceptor
    leaves its bytes to it)."""
    deserialize = functools.partial(parse, bounds=bounds)
    deserialize.bounded = True
    return deserialize


def add_to_server(plane: DataPlane, config, server: grpc.Server) -> None:
    pb_grpc.add_ModelRunnerServicer_to_server(
        NativeServicer(plane, config.extract_chunk_bytes, config.max_message_bytes),
        _WithWireRun(server, plane.limits.wire))
