"""Python client for aotiserve: torch's AOTI runner API, over gRPC.

    from aotiserve.client import Client
    with Client("localhost:8500") as client:
        model = client.model("demo")
        (y,) = model.run([x])

Needs only grpcio, protobuf and numpy; returns torch tensors when torch is
importable. Errors are :class:`ClientError` subclasses (``.code``, ``.details``).
"""

from aotiserve.client.aio import AsyncClient, AsyncModel
from aotiserve.client.client import Client, Model
from aotiserve.client.errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    ClientError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from aotiserve.client.model_info import ModelInfo, TensorSpec, WeightsVersion
from aotiserve.client.tensor_codec import UploadItem

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncModel",
    "CancelledError",
    "Client",
    "ClientError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "Model",
    "ModelInfo",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TensorSpec",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "UploadItem",
    "WeightsVersion",
]
