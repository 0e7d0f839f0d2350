from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_DONE: _ClassVar[StopReason]
    STOP_REASON_SHUTDOWN: _ClassVar[StopReason]
    STOP_REASON_REJECTED: _ClassVar[StopReason]
    STOP_REASON_DIVERGED: _ClassVar[StopReason]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_DONE: StopReason
STOP_REASON_SHUTDOWN: StopReason
STOP_REASON_REJECTED: StopReason
STOP_REASON_DIVERGED: StopReason

class Tensor(_message.Message):
    __slots__ = ("dtype", "numel", "data", "chunked")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    numel: int
    data: bytes
    chunked: bool
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., numel: _Optional[int] = ..., data: _Optional[bytes] = ..., chunked: _Optional[bool] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ParameterSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ParameterLayout(_message.Message):
    __slots__ = ("parameters",)
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterSpec]
    def __init__(self, parameters: _Optional[_Iterable[_Union[ParameterSpec, _Mapping]]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("requested_worker_id", "name", "slowdown", "layout", "accepts_chunks")
    REQUESTED_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    requested_worker_id: int
    name: str
    slowdown: float
    layout: ParameterLayout
    accepts_chunks: bool
    def __init__(self, requested_worker_id: _Optional[int] = ..., name: _Optional[str] = ..., slowdown: _Optional[float] = ..., layout: _Optional[_Union[ParameterLayout, _Mapping]] = ..., accepts_chunks: _Optional[bool] = ...) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("algorithm", "model", "dataset", "num_classes", "batch_size", "weight_decay", "seed", "total_iterations", "num_workers", "num_parameters", "wire_dtype")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    model: str
    dataset: str
    num_classes: int
    batch_size: int
    weight_decay: float
    seed: int
    total_iterations: int
    num_workers: int
    num_parameters: int
    wire_dtype: DType
    def __init__(self, algorithm: _Optional[str] = ..., model: _Optional[str] = ..., dataset: _Optional[str] = ..., num_classes: _Optional[int] = ..., batch_size: _Optional[int] = ..., weight_decay: _Optional[float] = ..., seed: _Optional[int] = ..., total_iterations: _Optional[int] = ..., num_workers: _Optional[int] = ..., num_parameters: _Optional[int] = ..., wire_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("worker_id", "config", "data_seed", "layout", "parameters_wanted", "chunk_bytes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DATA_SEED_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_WANTED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    config: RunConfig
    data_seed: int
    layout: ParameterLayout
    parameters_wanted: bool
    chunk_bytes: int
    def __init__(self, worker_id: _Optional[int] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ..., data_seed: _Optional[int] = ..., layout: _Optional[_Union[ParameterLayout, _Mapping]] = ..., parameters_wanted: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class Gradient(_message.Message):
    __slots__ = ("tensor", "iteration_index", "loss", "sample_count")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ITERATION_INDEX_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    iteration_index: int
    loss: float
    sample_count: int
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., iteration_index: _Optional[int] = ..., loss: _Optional[float] = ..., sample_count: _Optional[int] = ...) -> None: ...

class Parameters(_message.Message):
    __slots__ = ("tensor", "iteration_index", "epoch")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ITERATION_INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    iteration_index: int
    epoch: float
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., iteration_index: _Optional[int] = ..., epoch: _Optional[float] = ...) -> None: ...

class Stop(_message.Message):
    __slots__ = ("reason", "detail")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: StopReason
    detail: str
    def __init__(self, reason: _Optional[_Union[StopReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("layout", "parameters")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    layout: ParameterLayout
    parameters: Tensor
    def __init__(self, layout: _Optional[_Union[ParameterLayout, _Mapping]] = ..., parameters: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("register", "gradient", "ready", "chunk")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    register: Register
    gradient: Gradient
    ready: Ready
    chunk: TensorChunk
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., gradient: _Optional[_Union[Gradient, _Mapping]] = ..., ready: _Optional[_Union[Ready, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("welcome", "parameters", "stop", "chunk")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    parameters: Parameters
    stop: Stop
    chunk: TensorChunk
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., parameters: _Optional[_Union[Parameters, _Mapping]] = ..., stop: _Optional[_Union[Stop, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ("training_client",)
    TRAINING_CLIENT_FIELD_NUMBER: _ClassVar[int]
    training_client: bool
    def __init__(self, training_client: _Optional[bool] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Status(_message.Message):
    __slots__ = ("iteration", "epoch", "workers_connected", "gradients_applied", "gradients_rejected", "done", "config", "uptime_seconds", "train_loss", "diverged", "gradients_discarded")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORKERS_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    DIVERGED_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_DISCARDED_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    epoch: float
    workers_connected: int
    gradients_applied: int
    gradients_rejected: int
    done: bool
    config: RunConfig
    uptime_seconds: float
    train_loss: float
    diverged: bool
    gradients_discarded: int
    def __init__(self, iteration: _Optional[int] = ..., epoch: _Optional[float] = ..., workers_connected: _Optional[int] = ..., gradients_applied: _Optional[int] = ..., gradients_rejected: _Optional[int] = ..., done: _Optional[bool] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ..., uptime_seconds: _Optional[float] = ..., train_loss: _Optional[float] = ..., diverged: _Optional[bool] = ..., gradients_discarded: _Optional[int] = ...) -> None: ...
