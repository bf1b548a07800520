"""The asyncio client: :class:`AsyncClient` has :class:`~aotiserve.client.Client`'s
surface with ``async`` methods (``grpc.aio`` underneath)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from aotiserve.client import health as _health
from aotiserve.client import pytree
from aotiserve.client.channel import (
    DEFAULT_DOWNLOAD_CHUNK_BYTES,
)
from aotiserve.client.client import (
    _RETRY_MAX_S,
    _RETRY_MIN_S,
    ProgressCallback,
    _Connection,
    decode_outputs,
    find_model,
    weights_version_of,
)
from aotiserve.client.errors import (
    ClientError,
    DeadlineExceededError,
    InvalidArgumentError,
    from_rpc_error,
)
from aotiserve.client.model_info import ModelInfo, WeightsVersion
from aotiserve.client.tensor_codec import (
    ConstantsAssembler,
    OutputFormat,
    UploadItem,
    run_request,
    upload_items,
)
from aotiserve.v1 import model_runner_pb2 as pb


class AsyncModel:
    """:class:`~aotiserve.client.Model` with ``async`` methods."""

    def __init__(self, client: AsyncClient, name: str) -> None:
        self._client = client
        self.name = name
        self.last_weights_version: str | None = None

    def __repr__(self) -> str:
        return f"AsyncModel({self.name!r} at {self._client.target!r})"

    async def __call__(
        self, *args: Any, output_format: OutputFormat | None = None, **kwargs: Any
    ) -> Any:
        """:meth:`Model.__call__ <aotiserve.client.Model.__call__>`: ``await model(x, k=y)``."""
        specs = self._client._call_specs
        if self.name not in specs:
            specs[self.name] = pytree.load_specs(await self.get_call_spec())
        in_spec, out_spec = specs[self.name]
        try:
            flat = pytree.flatten_call(in_spec, args, kwargs)
            return pytree.unflatten(out_spec, await self.run(flat, output_format=output_format))
        except (InvalidArgumentError, pytree.SpecMismatch):
            specs.pop(self.name, None)  # the model may have been reloaded since: read it again
            raise

    async def run(
        self, inputs: Sequence[Any], *, output_format: OutputFormat | None = None
    ) -> list:
        client = self._client
        shm = client._local_shm
        if shm is not None and shm.wants(inputs):
            fmt = client._format(output_format)
            done = await asyncio.to_thread(shm.run, self.name, inputs, fmt)
            if done is not None:
                outputs, self.last_weights_version = done
                return outputs
        request = run_request(self.name, inputs)
        try:
            call = client._stubs.Run(request, metadata=client._metadata, timeout=client.timeout)
            response = await call
            trailer = await call.trailing_metadata() if not response.weights_version else ()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        self.last_weights_version = weights_version_of(response, trailer)
        return decode_outputs(response, client._format(output_format))

    async def get_call_spec(self) -> list[str]:
        r = await self._client._call("GetCallSpec", pb.GetCallSpecRequest(model=self.name))
        return [r.in_spec, r.out_spec]

    async def get_constant_names_to_original_fqns(self) -> dict[str, str]:
        r = await self._client._call(
            "GetConstantNamesToOriginalFqns",
            pb.GetConstantNamesToOriginalFqnsRequest(model=self.name),
        )
        return dict(r.fqns)

    async def get_constant_names_to_dtypes(self) -> dict[str, int]:
        r = await self._client._call(
            "GetConstantNamesToDtypes", pb.GetConstantNamesToDtypesRequest(model=self.name)
        )
        return dict(r.dtypes)

    async def extract_constants_map(
        self, use_inactive: bool, *, chunk_bytes: int = 0, output_format: OutputFormat | None = None
    ) -> dict[str, Any]:
        # Ask for chunks that fit this client's receive limit (not the server's default).
        chunk_bytes = self._client._config.fit_chunk(chunk_bytes or DEFAULT_DOWNLOAD_CHUNK_BYTES)
        request = pb.ExtractConstantsMapRequest(
            model=self.name, use_inactive=use_inactive, chunk_bytes=chunk_bytes
        )
        client = self._client
        assembler = ConstantsAssembler(client._format(output_format))
        try:
            async for chunk in client._stubs.ExtractConstantsMap(
                request, metadata=client._metadata, timeout=client.timeout
            ):
                assembler.add(chunk)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return assembler.result()

    async def update_constant_buffer(
        self,
        tensor_map: Mapping[str, Any],
        use_inactive: bool,
        validate_full_updates: bool,
        user_managed: bool = False,
        *,
        description: str = "",
        chunk_bytes: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> WeightsVersion | None:
        return await self.stream_constants(
            upload_items(tensor_map),
            use_inactive,
            validate_full_updates,
            user_managed,
            description=description,
            chunk_bytes=chunk_bytes,
            progress=progress,
        )

    async def swap_constant_buffer(self) -> WeightsVersion | None:
        r = await self._client._call(
            "SwapConstantBuffer", pb.SwapConstantBufferRequest(model=self.name)
        )
        return WeightsVersion.from_proto(r.active_version)

    async def free_inactive_constant_buffer(self) -> None:
        await self._client._call(
            "FreeInactiveConstantBuffer", pb.FreeInactiveConstantBufferRequest(model=self.name)
        )

    async def update_constant_buffer_from_blob(
        self, weights_path: str | os.PathLike
    ) -> WeightsVersion | None:
        r = await self._client._call(
            "UpdateConstantBufferFromBlob",
            pb.UpdateConstantBufferFromBlobRequest(
                model=self.name, weights_path=os.fspath(weights_path)
            ),
        )
        return WeightsVersion.from_proto(r.version)

    async def load_weights(
        self, path: str | os.PathLike, *, validate_full_updates: bool = False, description: str = ""
    ) -> WeightsVersion | None:
        """Extension: the server stages a safetensors file from its own disk (see Model)."""
        r = await self._client._call(
            "LoadWeights",
            pb.LoadWeightsRequest(
                model=self.name,
                path=os.fspath(path),
                validate_full_updates=validate_full_updates,
                description=description,
            ),
        )
        return WeightsVersion.from_proto(r.version)

    async def load_weights_from_cuda(
        self, tensor_map, *, validate_full_updates: bool = False, description: str = ""
    ) -> WeightsVersion | None:
        """Extension: GPU-direct hand-off of CUDA tensors (see Model)."""
        from aotiserve.client import cuda_ipc

        r = await self._client._call(
            "LoadWeightsFromCuda",
            cuda_ipc.share(
                self.name,
                tensor_map,
                validate_full_updates=validate_full_updates,
                description=description,
            ),
        )
        return WeightsVersion.from_proto(r.version)

    async def stream_constants(
        self,
        items: Iterable[UploadItem],
        use_inactive: bool,
        validate_full_updates: bool,
        user_managed: bool = False,
        *,
        description: str = "",
        chunk_bytes: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> WeightsVersion | None:
        requests = self._client._upload_requests(
            self.name,
            items,
            use_inactive=use_inactive,
            validate_full_updates=validate_full_updates,
            user_managed=user_managed,
            description=description,
            chunk_bytes=chunk_bytes,
            progress=progress,
        )
        try:
            r = await self._client._call("UpdateConstantBuffer", iter(requests))
        except (ClientError, asyncio.CancelledError):
            # grpc.aio cancels the call when the request iterator raises; a
            # cancellation of the caller's own task has no recorded error.
            if requests.error is not None:
                raise requests.error from None
            raise
        return WeightsVersion.from_proto(r.version)

    async def rollback_constant_buffer(self) -> WeightsVersion | None:
        r = await self._client._call(
            "RollbackConstantBuffer", pb.RollbackConstantBufferRequest(model=self.name)
        )
        return WeightsVersion.from_proto(r.active_version)

    async def info(self) -> ModelInfo:
        return find_model(await self._client._call("ListModels", pb.ListModelsRequest()), self.name)


class AsyncClient(_Connection):
    """:class:`~aotiserve.client.Client` for asyncio: same arguments, ``async`` methods.

    Use as ``async with AsyncClient(target) as client:`` or ``await client.close()``;
    create it inside the event loop that will use it (``grpc.aio`` binds a channel
    to the loop it was made in).
    """

    _aio = True

    async def _call(self, rpc: str, request):
        try:
            return await getattr(self._stubs, rpc)(
                request, metadata=self._metadata_of[rpc], timeout=self.timeout
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def model(self, name: str) -> AsyncModel:
        return AsyncModel(self, name)

    async def load_model(
        self,
        name: str,
        path: str | os.PathLike,
        devices: Sequence[str] | None = None,
        runners_per_device: int = 0,
        package_model: str = "",
    ) -> ModelInfo:
        self._call_specs.pop(name, None)
        r = await self._call(
            "LoadModel",
            pb.LoadModelRequest(
                name=name,
                path=os.fspath(path),
                devices=list(devices or ()),
                runners_per_device=runners_per_device,
                package_model=package_model,
            ),
        )
        return ModelInfo.from_proto(r.model)

    async def unload_model(self, name: str) -> None:
        self._call_specs.pop(name, None)
        await self._call("UnloadModel", pb.UnloadModelRequest(name=name))

    async def list_models(self) -> list[ModelInfo]:
        r = await self._call("ListModels", pb.ListModelsRequest())
        return [ModelInfo.from_proto(m) for m in r.models]

    async def health(self, service: str = "") -> str:
        try:
            return await self._health_check(_health.encode_request(service), timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def wait_until_ready(self, timeout: float = 30.0, service: str = "") -> None:
        """Waits until the server reports SERVING (see ``Client.wait_until_ready``)."""
        deadline = time.monotonic() + timeout
        last, pause = "no answer", _RETRY_MIN_S
        request = _health.encode_request(service)
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                async for status in self._health_watch(
                    request, timeout=remaining, wait_for_ready=True
                ):
                    last = status
                    if status == "SERVING":
                        return
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    status = await self.health(service)
                    if status == "SERVING":
                        return
                elif code not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise from_rpc_error(e) from None
                if code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    last = code.name
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _RETRY_MAX_S)
        raise DeadlineExceededError(f"{self.target} not SERVING after {timeout:g}s (last: {last})")

    async def close(self) -> None:
        if self._local_shm is not None:
            await asyncio.to_thread(self._local_shm.close)
        if self._blocking_channel is not None:
            self._blocking_channel.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
