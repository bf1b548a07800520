from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_BFLOAT16: _ClassVar[DataType]
    DATA_TYPE_INT8: _ClassVar[DataType]
    DATA_TYPE_INT16: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_BOOL: _ClassVar[DataType]
    DATA_TYPE_FLOAT8_E4M3FN: _ClassVar[DataType]
    DATA_TYPE_FLOAT8_E5M2: _ClassVar[DataType]
    DATA_TYPE_FLOAT8_E4M3FNUZ: _ClassVar[DataType]
    DATA_TYPE_FLOAT8_E5M2FNUZ: _ClassVar[DataType]
    DATA_TYPE_UINT16: _ClassVar[DataType]
    DATA_TYPE_UINT32: _ClassVar[DataType]
    DATA_TYPE_UINT64: _ClassVar[DataType]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_UNLOADING: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT64: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_BFLOAT16: DataType
DATA_TYPE_INT8: DataType
DATA_TYPE_INT16: DataType
DATA_TYPE_INT32: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_BOOL: DataType
DATA_TYPE_FLOAT8_E4M3FN: DataType
DATA_TYPE_FLOAT8_E5M2: DataType
DATA_TYPE_FLOAT8_E4M3FNUZ: DataType
DATA_TYPE_FLOAT8_E5M2FNUZ: DataType
DATA_TYPE_UINT16: DataType
DATA_TYPE_UINT32: DataType
DATA_TYPE_UINT64: DataType
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_UNLOADING: ModelState
MODEL_STATE_FAILED: ModelState

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class WeightsVersion(_message.Message):
    __slots__ = ("id", "sha256", "created_unix_ms", "author", "description", "digest")
    ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    sha256: str
    created_unix_ms: int
    author: str
    description: str
    digest: str
    def __init__(self, id: _Optional[str] = ..., sha256: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., author: _Optional[str] = ..., description: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "path", "devices", "runners_per_device", "state", "active_version", "staged_version", "previous_version", "updatable_constants", "inputs", "outputs", "metadata", "error")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    RUNNERS_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATABLE_CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    runners_per_device: int
    state: ModelState
    active_version: WeightsVersion
    staged_version: WeightsVersion
    previous_version: WeightsVersion
    updatable_constants: _containers.RepeatedScalarFieldContainer[str]
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    metadata: _containers.ScalarMap[str, str]
    error: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., runners_per_device: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., active_version: _Optional[_Union[WeightsVersion, _Mapping]] = ..., staged_version: _Optional[_Union[WeightsVersion, _Mapping]] = ..., previous_version: _Optional[_Union[WeightsVersion, _Mapping]] = ..., updatable_constants: _Optional[_Iterable[str]] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., error: _Optional[str] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("model", "inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("outputs", "weights_version")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    weights_version: str
    def __init__(self, outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., weights_version: _Optional[str] = ...) -> None: ...

class GetCallSpecRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetCallSpecResponse(_message.Message):
    __slots__ = ("in_spec", "out_spec")
    IN_SPEC_FIELD_NUMBER: _ClassVar[int]
    OUT_SPEC_FIELD_NUMBER: _ClassVar[int]
    in_spec: str
    out_spec: str
    def __init__(self, in_spec: _Optional[str] = ..., out_spec: _Optional[str] = ...) -> None: ...

class GetConstantNamesToOriginalFqnsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetConstantNamesToOriginalFqnsResponse(_message.Message):
    __slots__ = ("fqns",)
    class FqnsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FQNS_FIELD_NUMBER: _ClassVar[int]
    fqns: _containers.ScalarMap[str, str]
    def __init__(self, fqns: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetConstantNamesToDtypesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetConstantNamesToDtypesResponse(_message.Message):
    __slots__ = ("dtypes",)
    class DtypesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    dtypes: _containers.ScalarMap[str, int]
    def __init__(self, dtypes: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ExtractConstantsMapRequest(_message.Message):
    __slots__ = ("model", "use_inactive", "chunk_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USE_INACTIVE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    use_inactive: bool
    chunk_bytes: int
    def __init__(self, model: _Optional[str] = ..., use_inactive: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class ConstantChunk(_message.Message):
    __slots__ = ("name", "offset", "data", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class UpdateConstantBufferHeader(_message.Message):
    __slots__ = ("model", "use_inactive", "validate_full_updates", "user_managed", "constants", "description")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USE_INACTIVE_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_FULL_UPDATES_FIELD_NUMBER: _ClassVar[int]
    USER_MANAGED_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    use_inactive: bool
    validate_full_updates: bool
    user_managed: bool
    constants: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    description: str
    def __init__(self, model: _Optional[str] = ..., use_inactive: _Optional[bool] = ..., validate_full_updates: _Optional[bool] = ..., user_managed: _Optional[bool] = ..., constants: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., description: _Optional[str] = ...) -> None: ...

class UpdateConstantBufferRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateConstantBufferHeader
    chunk: ConstantChunk
    def __init__(self, header: _Optional[_Union[UpdateConstantBufferHeader, _Mapping]] = ..., chunk: _Optional[_Union[ConstantChunk, _Mapping]] = ...) -> None: ...

class UpdateConstantBufferResponse(_message.Message):
    __slots__ = ("version", "bytes_received", "updated")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    version: WeightsVersion
    bytes_received: int
    updated: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[_Union[WeightsVersion, _Mapping]] = ..., bytes_received: _Optional[int] = ..., updated: _Optional[_Iterable[str]] = ...) -> None: ...

class SwapConstantBufferRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class SwapConstantBufferResponse(_message.Message):
    __slots__ = ("active_version",)
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    active_version: WeightsVersion
    def __init__(self, active_version: _Optional[_Union[WeightsVersion, _Mapping]] = ...) -> None: ...

class RollbackConstantBufferRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RollbackConstantBufferResponse(_message.Message):
    __slots__ = ("active_version",)
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    active_version: WeightsVersion
    def __init__(self, active_version: _Optional[_Union[WeightsVersion, _Mapping]] = ...) -> None: ...

class FreeInactiveConstantBufferRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class FreeInactiveConstantBufferResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateConstantBufferFromBlobRequest(_message.Message):
    __slots__ = ("model", "weights_path")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_PATH_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights_path: str
    def __init__(self, model: _Optional[str] = ..., weights_path: _Optional[str] = ...) -> None: ...

class UpdateConstantBufferFromBlobResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: WeightsVersion
    def __init__(self, version: _Optional[_Union[WeightsVersion, _Mapping]] = ...) -> None: ...

class LoadWeightsRequest(_message.Message):
    __slots__ = ("model", "path", "validate_full_updates", "description")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_FULL_UPDATES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    path: str
    validate_full_updates: bool
    description: str
    def __init__(self, model: _Optional[str] = ..., path: _Optional[str] = ..., validate_full_updates: _Optional[bool] = ..., description: _Optional[str] = ...) -> None: ...

class LoadWeightsResponse(_message.Message):
    __slots__ = ("version", "bytes_staged", "updated")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_STAGED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    version: WeightsVersion
    bytes_staged: int
    updated: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[_Union[WeightsVersion, _Mapping]] = ..., bytes_staged: _Optional[int] = ..., updated: _Optional[_Iterable[str]] = ...) -> None: ...

class CudaIpcTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "stride", "storage_offset", "storage_handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STORAGE_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    storage_offset: int
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., stride: _Optional[_Iterable[int]] = ..., storage_offset: _Optional[int] = ..., storage_handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class LoadWeightsFromCudaRequest(_message.Message):
    __slots__ = ("model", "host_id", "device_uuid", "tensors", "validate_full_updates", "description")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_FULL_UPDATES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    host_id: str
    device_uuid: str
    tensors: _containers.RepeatedCompositeFieldContainer[CudaIpcTensor]
    validate_full_updates: bool
    description: str
    def __init__(self, model: _Optional[str] = ..., host_id: _Optional[str] = ..., device_uuid: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[CudaIpcTensor, _Mapping]]] = ..., validate_full_updates: _Optional[bool] = ..., description: _Optional[str] = ...) -> None: ...

class LoadWeightsFromCudaResponse(_message.Message):
    __slots__ = ("version", "bytes_staged", "updated")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_STAGED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    version: WeightsVersion
    bytes_staged: int
    updated: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[_Union[WeightsVersion, _Mapping]] = ..., bytes_staged: _Optional[int] = ..., updated: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "path", "devices", "runners_per_device", "package_model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    RUNNERS_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    runners_per_device: int
    package_model: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., runners_per_device: _Optional[int] = ..., package_model: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
