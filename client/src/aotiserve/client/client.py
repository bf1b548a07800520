"""The synchronous client: ``Client(target).model(name)`` mirrors torch's AOTI runner.

Every method of ``torch._C._aoti.AOTIModelContainerRunner`` has a method of
the same name and arguments on :class:`Model`, executed by the server. The
extensions (rollback, versions, model management, health) are marked as such.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from aotiserve.client import health as _health
from aotiserve.client import local_shm, pytree
from aotiserve.client.channel import (
    DEFAULT_DOWNLOAD_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    WEIGHTS_VERSION_TRAILER,
    ChannelConfig,
    is_loopback_target,
    model_runner_stubs,
)
from aotiserve.client.errors import (
    ClientError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    from_rpc_error,
)
from aotiserve.client.model_info import ModelInfo, WeightsVersion
from aotiserve.client.tensor_codec import (
    DEFAULT_CHUNK_BYTES,
    ConstantsAssembler,
    OutputFormat,
    RecordingIterator,
    UploadItem,
    encode_upload,
    from_wire,
    resolve_format,
    run_request,
    upload_items,
)
from aotiserve.v1 import model_runner_pb2 as pb

ProgressCallback = Callable[[int, int], None]

# Retry pacing of wait_until_ready when the server drops the health stream.
_RETRY_MIN_S, _RETRY_MAX_S = 0.05, 0.5


def weights_version_of(response: pb.RunResponse, trailing_metadata) -> str | None:
    """The version that computed a Run response: the field, else the trailer
    (``trailing_metadata``: the call's metadata, or what returns it, read only then)."""
    if response.weights_version:
        return response.weights_version
    if callable(trailing_metadata):
        trailing_metadata = trailing_metadata()
    for key, value in trailing_metadata or ():
        if key == WEIGHTS_VERSION_TRAILER:
            return value
    return None


def decode_outputs(response: pb.RunResponse, fmt) -> list:
    return [from_wire(t, fmt, f"output {i}") for i, t in enumerate(response.outputs)]


def find_model(response: pb.ListModelsResponse, name: str) -> ModelInfo:
    for info in response.models:
        if info.name == name:
            return ModelInfo.from_proto(info)
    raise NotFoundError(f"model {name!r} is not loaded")


class Model:
    """A served model, with the methods of torch's AOTI model container runner.

    Created by :meth:`Client.model`; holds no server state of its own.
    """

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = name
        #: Id of the weights version that computed the last ``run`` (extension).
        self.last_weights_version: str | None = None

    def __repr__(self) -> str:
        return f"Model({self.name!r} at {self._client.target!r})"

    def __call__(self, *args: Any, output_format: OutputFormat | None = None, **kwargs: Any) -> Any:
        """Calls the model as torch's loaded package does (``AOTICompiledModel.__call__``).

        ``args``/``kwargs`` nest as the exported model's (tuples, lists, dicts of numpy
        arrays or torch tensors); the result nests as the model returns it (a dict, a tuple,
        one tensor...). The call structure (``get_call_spec``) is read once per client.
        """
        specs = self._client._call_specs
        if self.name not in specs:
            specs[self.name] = pytree.load_specs(self.get_call_spec())
        in_spec, out_spec = specs[self.name]
        try:
            outputs = self.run(
                pytree.flatten_call(in_spec, args, kwargs), output_format=output_format
            )
            return pytree.unflatten(out_spec, outputs)
        except (InvalidArgumentError, pytree.SpecMismatch):
            specs.pop(self.name, None)  # the model may have been reloaded since: read it again
            raise

    # ---- the runner API, one for one

    def run(self, inputs: Sequence[Any], *, output_format: OutputFormat | None = None) -> list:
        """Runs the model on ``inputs`` (numpy arrays or torch tensors, in input order).

        Returns the outputs as torch tensors when torch is importable, else
        numpy arrays (``output_format`` overrides the client's choice).
        """
        shm = self._client._local_shm
        if shm is not None and shm.wants(inputs):
            done = shm.run(self.name, inputs, self._client._format(output_format))
            if done is not None:
                outputs, self.last_weights_version = done
                return outputs
        client = self._client
        request = run_request(self.name, inputs)
        if self.name in client._versioned_runs:
            # Its responses carry their version: the plain call, cheaper than one that
            # keeps the call's trailers.
            response = client._call("Run", request)
            self.last_weights_version = response.weights_version or None
            if not response.weights_version:  # a server that sends it as a trailer only now
                client._versioned_runs.discard(self.name)
        else:
            response, call = client._call("Run", request, with_call=True)
            self.last_weights_version = weights_version_of(response, call.trailing_metadata)
            if response.weights_version:
                client._versioned_runs.add(self.name)
        return decode_outputs(response, client._format(output_format))

    def get_call_spec(self) -> list[str]:
        """[in_spec, out_spec]: the serialized pytree specs of inputs and outputs."""
        r = self._client._call("GetCallSpec", pb.GetCallSpecRequest(model=self.name))
        return [r.in_spec, r.out_spec]

    def get_constant_names_to_original_fqns(self) -> dict[str, str]:
        r = self._client._call(
            "GetConstantNamesToOriginalFqns",
            pb.GetConstantNamesToOriginalFqnsRequest(model=self.name),
        )
        return dict(r.fqns)

    def get_constant_names_to_dtypes(self) -> dict[str, int]:
        """Constant name -> c10::ScalarType code (see ``aotiserve.client.dtypes``)."""
        r = self._client._call(
            "GetConstantNamesToDtypes", pb.GetConstantNamesToDtypesRequest(model=self.name)
        )
        return dict(r.dtypes)

    def extract_constants_map(
        self, use_inactive: bool, *, chunk_bytes: int = 0, output_format: OutputFormat | None = None
    ) -> dict[str, Any]:
        """The constants of the active (or inactive) buffer, streamed and reassembled.

        Keys are as the runner gives them (original FQNs).
        """
        # Ask for chunks that fit this client's receive limit (not the server's default).
        chunk_bytes = self._client._config.fit_chunk(chunk_bytes or DEFAULT_DOWNLOAD_CHUNK_BYTES)
        request = pb.ExtractConstantsMapRequest(
            model=self.name, use_inactive=use_inactive, chunk_bytes=chunk_bytes
        )
        assembler = ConstantsAssembler(self._client._format(output_format))
        for chunk in self._client._stream("ExtractConstantsMap", request):
            assembler.add(chunk)
        return assembler.result()

    def update_constant_buffer(
        self,
        tensor_map: Mapping[str, Any],
        use_inactive: bool,
        validate_full_updates: bool,
        user_managed: bool = False,
        *,
        description: str = "",
        chunk_bytes: int | None = None,
        progress: ProgressCallback | None = None,
        gpu_direct: bool | None = None,
    ) -> WeightsVersion | None:
        """Writes constants (keys: constant names or original FQNs) into a buffer.

        The tensors stream in chunks of ``chunk_bytes`` after a header that
        declares them all, so any size travels and nothing is built as one
        message. Returns the version the written weights form (torch returns None).

        CUDA tensors (all on one GPU) staged with ``use_inactive=True`` are handed over
        GPU-direct when the daemon runs on the same host and GPU (``LoadWeightsFromCuda``:
        CUDA IPC handles, copied device to device, no host round trip); where it cannot
        (another host or GPU), they are streamed instead. ``gpu_direct=True`` insists
        (the daemon's FAILED_PRECONDITION, with its reason, is raised), ``False`` always
        streams.
        """
        from aotiserve.client import cuda_ipc

        if gpu_direct is not False and use_inactive and cuda_ipc.all_cuda(tensor_map):
            # Auto: only where the daemon says it shares this host and GPU (ListModels), so
            # nothing is shared that it would refuse; True: ask, and raise its reason.
            if gpu_direct or cuda_ipc.reachable(self.info().metadata, tensor_map):
                try:
                    return self.load_weights_from_cuda(
                        tensor_map,
                        validate_full_updates=validate_full_updates,
                        description=description,
                    )
                except ValueError:  # not shareable (the allocator's memory)
                    if gpu_direct:
                        raise
                except ClientError as e:
                    if gpu_direct or e.code not in (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.UNIMPLEMENTED,
                    ):
                        raise
        elif gpu_direct:
            raise ValueError(
                "gpu_direct=True needs use_inactive=True and "
                + (cuda_ipc.why_not_shareable(tensor_map) or "CUDA tensors")
            )
        return self.stream_constants(
            upload_items(tensor_map),
            use_inactive,
            validate_full_updates,
            user_managed,
            description=description,
            chunk_bytes=chunk_bytes,
            progress=progress,
        )

    def swap_constant_buffer(self) -> WeightsVersion | None:
        """Makes the inactive buffer active. Returns the version now serving."""
        r = self._client._call("SwapConstantBuffer", pb.SwapConstantBufferRequest(model=self.name))
        return WeightsVersion.from_proto(r.active_version)

    def free_inactive_constant_buffer(self) -> None:
        self._client._call(
            "FreeInactiveConstantBuffer", pb.FreeInactiveConstantBufferRequest(model=self.name)
        )

    def update_constant_buffer_from_blob(
        self, weights_path: str | os.PathLike
    ) -> WeightsVersion | None:
        """Loads weights from a blob file on the server (below its allowed roots)."""
        r = self._client._call(
            "UpdateConstantBufferFromBlob",
            pb.UpdateConstantBufferFromBlobRequest(
                model=self.name, weights_path=os.fspath(weights_path)
            ),
        )
        return WeightsVersion.from_proto(r.version)

    # ---- extensions

    def stream_constants(
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
        """Extension: ``update_constant_buffer`` from lazily loaded items (one
        tensor in memory at a time), e.g. straight from a safetensors file."""
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
            r = self._client._call("UpdateConstantBuffer", iter(requests))
        except ClientError:
            if requests.error is not None:  # the upload broke on our side: say why
                raise requests.error from None
            raise
        return WeightsVersion.from_proto(r.version)

    def load_weights(
        self, path: str | os.PathLike, *, validate_full_updates: bool = False, description: str = ""
    ) -> WeightsVersion | None:
        """Extension: stages a safetensors file on the server (or a folder of shards with
        ``model.safetensors.index.json``), below its allowed roots, into the inactive
        buffer: read there at disk/memory speed, validated and hashed as an upload.
        Swap it in with :meth:`swap_constant_buffer`."""
        r = self._client._call(
            "LoadWeights",
            pb.LoadWeightsRequest(
                model=self.name,
                path=os.fspath(path),
                validate_full_updates=validate_full_updates,
                description=description,
            ),
        )
        return WeightsVersion.from_proto(r.version)

    def load_weights_from_cuda(
        self,
        tensor_map: Mapping[str, Any],
        *,
        validate_full_updates: bool = False,
        description: str = "",
    ) -> WeightsVersion | None:
        """Extension: hands CUDA tensors over GPU-direct (CUDA IPC) into the inactive
        buffer; FAILED_PRECONDITION (with the reason) where the daemon cannot open them:
        another host, another GPU, a tensor freed meanwhile."""
        from aotiserve.client import cuda_ipc

        request = cuda_ipc.share(
            self.name,
            tensor_map,
            validate_full_updates=validate_full_updates,
            description=description,
        )
        r = self._client._call("LoadWeightsFromCuda", request)
        return WeightsVersion.from_proto(r.version)

    def rollback_constant_buffer(self) -> WeightsVersion | None:
        """Extension: swaps back to the previous weights (until they are freed)."""
        r = self._client._call(
            "RollbackConstantBuffer", pb.RollbackConstantBufferRequest(model=self.name)
        )
        return WeightsVersion.from_proto(r.active_version)

    def info(self) -> ModelInfo:
        """Extension: the server's description of this model (versions, devices, specs)."""
        return find_model(self._client._call("ListModels", pb.ListModelsRequest()), self.name)


class _Connection:
    """What :class:`Client` and :class:`~aotiserve.client.aio.AsyncClient` share: the
    settings, the channel (``grpc.aio``'s where ``_aio``) and its stubs."""

    _aio = False

    def __init__(
        self,
        target: str = "localhost:8500",
        *,
        admin_token: str | None = None,
        token: str | None = None,
        tls: bool | None = None,
        ca_cert: bytes | str | os.PathLike | None = None,
        client_cert: bytes | str | os.PathLike | None = None,
        client_key: bytes | str | os.PathLike | None = None,
        tls_server_name: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = None,
        output_format: OutputFormat = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        insecure: bool = False,
        shared_memory: bool | None = None,
        shared_memory_min_bytes: int = local_shm.DEFAULT_MIN_BYTES,
    ) -> None:
        self._config = ChannelConfig(
            target=target,
            admin_token=admin_token,
            token=token,
            tls=tls,
            ca_cert=ca_cert,
            client_cert=client_cert,
            client_key=client_key,
            tls_server_name=tls_server_name,
            credentials=credentials,
            max_message_bytes=max_message_bytes,
            options=tuple(options),
            insecure=insecure,
        )
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.timeout = timeout
        self.output_format = resolve_format(output_format)
        self.chunk_bytes = chunk_bytes
        self._metadata = self._config.metadata()
        self._metadata_of = self._config.metadata_of()
        self._channel = self._config.open(aio=self._aio)
        self._stubs = model_runner_stubs(self._channel)
        self._health_check, self._health_watch = _health.stubs(self._channel)
        # Model name -> its read call spec (Model.__call__), for every handle of this client;
        # dropped when the client loads or unloads the name, or a call is refused.
        self._call_specs: dict[str, tuple[pytree.Spec | None, pytree.Spec | None]] = {}
        # Models whose Run responses carry their weights version in the message (every
        # server since the field exists); the others' is read from the trailer.
        self._versioned_runs: set[str] = set()
        # Large runs through shared memory with a daemon on this host (local_shm); its calls
        # are blocking ones, on a channel of their own for AsyncClient.
        self._local_shm: local_shm.LocalSharedMemory | None = None
        if is_loopback_target(target) if shared_memory is None else shared_memory:
            self._local_shm = local_shm.LocalSharedMemory(
                self._oip_call, self._io_names, min_bytes=shared_memory_min_bytes
            )
        self._oip_stubs: dict[str, Callable] = {}
        self._admin_metadata = self._config.metadata(mutating=True)
        self._blocking_channel = None if self._aio else self._channel

    @property
    def target(self) -> str:
        return self._config.target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    def _upload_requests(
        self,
        model: str,
        items: Iterable[UploadItem],
        *,
        use_inactive: bool,
        validate_full_updates: bool,
        user_managed: bool,
        description: str,
        chunk_bytes: int | None,
        progress: ProgressCallback | None,
    ) -> RecordingIterator:
        """An ``UpdateConstantBuffer`` stream's requests, recording what broke on our side."""
        return RecordingIterator(
            encode_upload(
                model,
                list(items),
                use_inactive=use_inactive,
                validate_full_updates=validate_full_updates,
                user_managed=user_managed,
                description=description,
                chunk_bytes=self._config.fit_chunk(chunk_bytes or self.chunk_bytes),
                progress=progress,
            )
        )

    # ---- the shared-memory path's blocking calls (local_shm)

    def _blocking(self):
        if self._blocking_channel is None:
            self._blocking_channel = self._config.open(aio=False)
        return self._blocking_channel

    def _oip_call(self, rpc: str, request: bytes, admin: bool) -> bytes:
        """A unary call of the OIP service with hand-encoded bytes."""
        stub = self._oip_stubs.get(rpc)
        if stub is None:
            stub = self._oip_stubs[rpc] = self._blocking().unary_unary(local_shm.SERVICE + rpc)
        metadata = self._admin_metadata if admin else self._metadata
        return stub(request, metadata=metadata, timeout=self.timeout)

    def _io_names(self, model: str) -> tuple[list[str], list[str]]:
        """A model's input and output names, from ListModels."""
        listing = model_runner_stubs(self._blocking()).ListModels
        response = listing(pb.ListModelsRequest(), metadata=self._metadata, timeout=self.timeout)
        info = find_model(response, model)
        return [s.name for s in info.inputs], [s.name for s in info.outputs]

    def _format(self, output_format: OutputFormat | None):
        return self.output_format if output_format is None else resolve_format(output_format)


class Client(_Connection):
    """A connection to an aotiserve daemon.

    ``target`` is ``host:port``. TLS is used when ``tls`` is true or any
    certificate is given (``ca_cert``, and ``client_cert`` + ``client_key``
    for mutual TLS; each bytes, PEM text or a file path). ``admin_token`` is
    sent as ``authorization: Bearer <token>`` on mutating calls only (load,
    unload, weight changes); ``token`` is the inference token of a daemon that
    requires one, sent on every other call (health needs none). A token is never
    sent in plaintext to a target other than loopback: that raises ValueError
    unless TLS is on or ``insecure=True``. ``timeout`` (s)
    bounds every call. Outputs are torch tensors when torch is importable,
    numpy arrays otherwise (``output_format`` forces one).
    """

    # ---- plumbing: every call goes through here, so every error is a ClientError

    def _call(self, rpc: str, request, *, with_call: bool = False):
        stub = getattr(self._stubs, rpc)
        try:
            metadata = self._metadata_of[rpc]
            if with_call:
                return stub.with_call(request, metadata=metadata, timeout=self.timeout)
            return stub(request, metadata=metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _stream(self, rpc: str, request):
        try:
            yield from getattr(self._stubs, rpc)(
                request, metadata=self._metadata_of[rpc], timeout=self.timeout
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    # ---- models

    def model(self, name: str) -> Model:
        """A handle on the served model ``name`` (no call is made)."""
        return Model(self, name)

    def load_model(
        self,
        name: str,
        path: str | os.PathLike,
        devices: Sequence[str] | None = None,
        runners_per_device: int = 0,
        package_model: str = "",
    ) -> ModelInfo:
        """Loads the package at ``path`` (on the server) and serves it as ``name``."""
        self._call_specs.pop(name, None)
        r = self._call(
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

    def unload_model(self, name: str) -> None:
        """Stops serving ``name`` once its in-flight requests finish."""
        self._call_specs.pop(name, None)
        self._call("UnloadModel", pb.UnloadModelRequest(name=name))

    def list_models(self) -> list[ModelInfo]:
        return [
            ModelInfo.from_proto(m) for m in self._call("ListModels", pb.ListModelsRequest()).models
        ]

    # ---- health (standard grpc.health.v1)

    def health(self, service: str = "") -> str:
        """The server's health status: "SERVING", "NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN"."""
        try:
            return self._health_check(_health.encode_request(service), timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def wait_until_ready(self, timeout: float = 30.0, service: str = "") -> None:
        """Blocks until the server reports SERVING (it may not be listening yet).

        Follows the health Watch stream rather than polling; raises
        DeadlineExceededError after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last, pause = "no answer", _RETRY_MIN_S
        request = _health.encode_request(service)
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                for status in self._health_watch(request, timeout=remaining, wait_for_ready=True):
                    last = status
                    if status == "SERVING":
                        return
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    return self._poll_until_ready(deadline, request)
                if code not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise from_rpc_error(e) from None
                if code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    last = code.name
            # The server closed the stream (restarting, draining): try again shortly.
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _RETRY_MAX_S)
        raise DeadlineExceededError(f"{self.target} not SERVING after {timeout:g}s (last: {last})")

    def _poll_until_ready(self, deadline: float, request: bytes) -> None:
        last, pause = "no answer", _RETRY_MIN_S
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                last = self._health_check(request, timeout=remaining, wait_for_ready=True)
                if last == "SERVING":
                    return
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise from_rpc_error(e) from None
                last = e.code().name
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _RETRY_MAX_S)
        raise DeadlineExceededError(f"{self.target} not SERVING (last: {last})")

    # ---- lifetime

    def close(self) -> None:
        if self._local_shm is not None:
            self._local_shm.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
