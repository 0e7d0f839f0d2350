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
    __slots__ = ("requested_worker_id", "name", "slowdown", "layout", "accepts_chunks", "session")
    REQUESTED_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    requested_worker_id: int
    name: str
    slowdown: float
    layout: ParameterLayout
    accepts_chunks: bool
    session: int
    def __init__(self, requested_worker_id: _Optional[int] = ..., name: _Optional[str] = ..., slowdown: _Optional[float] = ..., layout: _Optional[_Union[ParameterLayout, _Mapping]] = ..., accepts_chunks: _Optional[bool] = ..., session: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("worker_id", "config", "data_seed", "layout", "parameters_wanted", "chunk_bytes", "shards", "session")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DATA_SEED_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_WANTED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    config: RunConfig
    data_seed: int
    layout: ParameterLayout
    parameters_wanted: bool
    chunk_bytes: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardEndpoint]
    session: int
    def __init__(self, worker_id: _Optional[int] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ..., data_seed: _Optional[int] = ..., layout: _Optional[_Union[ParameterLayout, _Mapping]] = ..., parameters_wanted: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardEndpoint, _Mapping]]] = ..., session: _Optional[int] = ...) -> None: ...

class ShardEndpoint(_message.Message):
    __slots__ = ("address", "start", "end")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    address: str
    start: int
    end: int
    def __init__(self, address: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

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

class ShardAttach(_message.Message):
    __slots__ = ("run_json", "iterations_per_epoch", "index", "shards", "start", "end", "numel", "params", "chunk_bytes")
    RUN_JSON_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    run_json: str
    iterations_per_epoch: int
    index: int
    shards: int
    start: int
    end: int
    numel: int
    params: Tensor
    chunk_bytes: int
    def __init__(self, run_json: _Optional[str] = ..., iterations_per_epoch: _Optional[int] = ..., index: _Optional[int] = ..., shards: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., numel: _Optional[int] = ..., params: _Optional[_Union[Tensor, _Mapping]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class ShardInitial(_message.Message):
    __slots__ = ("params",)
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    params: Tensor
    def __init__(self, params: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ShardAdmit(_message.Message):
    __slots__ = ("worker", "session", "name")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    worker: int
    session: int
    name: str
    def __init__(self, worker: _Optional[int] = ..., session: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class ShardStart(_message.Message):
    __slots__ = ("ready",)
    READY_FIELD_NUMBER: _ClassVar[int]
    ready: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ready: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardRejoin(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: int
    def __init__(self, worker: _Optional[int] = ...) -> None: ...

class ShardDeactivate(_message.Message):
    __slots__ = ("worker", "end_session", "core")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    END_SESSION_FIELD_NUMBER: _ClassVar[int]
    CORE_FIELD_NUMBER: _ClassVar[int]
    worker: int
    end_session: bool
    core: bool
    def __init__(self, worker: _Optional[int] = ..., end_session: _Optional[bool] = ..., core: _Optional[bool] = ...) -> None: ...

class ShardDeactivateAll(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardPush(_message.Message):
    __slots__ = ("worker", "session", "iteration_index", "g_max", "trial")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ITERATION_INDEX_FIELD_NUMBER: _ClassVar[int]
    G_MAX_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    worker: int
    session: int
    iteration_index: int
    g_max: float
    trial: bool
    def __init__(self, worker: _Optional[int] = ..., session: _Optional[int] = ..., iteration_index: _Optional[int] = ..., g_max: _Optional[float] = ..., trial: _Optional[bool] = ...) -> None: ...

class ShardResolve(_message.Message):
    __slots__ = ("commit", "bound")
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    commit: bool
    bound: float
    def __init__(self, commit: _Optional[bool] = ..., bound: _Optional[float] = ...) -> None: ...

class ShardDrop(_message.Message):
    __slots__ = ("worker", "session")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker: int
    session: int
    def __init__(self, worker: _Optional[int] = ..., session: _Optional[int] = ...) -> None: ...

class ShardSnapshot(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardCheckpoint(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ShardLoad(_message.Message):
    __slots__ = ("path", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class ShardFinish(_message.Message):
    __slots__ = ("stop",)
    STOP_FIELD_NUMBER: _ClassVar[int]
    stop: Stop
    def __init__(self, stop: _Optional[_Union[Stop, _Mapping]] = ...) -> None: ...

class ShardCommand(_message.Message):
    __slots__ = ("seq", "attach", "admit", "start", "rejoin", "deactivate", "deactivate_all", "push", "resolve", "drop", "snapshot", "checkpoint", "load", "finish", "initial")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    ADMIT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    REJOIN_FIELD_NUMBER: _ClassVar[int]
    DEACTIVATE_FIELD_NUMBER: _ClassVar[int]
    DEACTIVATE_ALL_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    attach: ShardAttach
    admit: ShardAdmit
    start: ShardStart
    rejoin: ShardRejoin
    deactivate: ShardDeactivate
    deactivate_all: ShardDeactivateAll
    push: ShardPush
    resolve: ShardResolve
    drop: ShardDrop
    snapshot: ShardSnapshot
    checkpoint: ShardCheckpoint
    load: ShardLoad
    finish: ShardFinish
    initial: ShardInitial
    def __init__(self, seq: _Optional[int] = ..., attach: _Optional[_Union[ShardAttach, _Mapping]] = ..., admit: _Optional[_Union[ShardAdmit, _Mapping]] = ..., start: _Optional[_Union[ShardStart, _Mapping]] = ..., rejoin: _Optional[_Union[ShardRejoin, _Mapping]] = ..., deactivate: _Optional[_Union[ShardDeactivate, _Mapping]] = ..., deactivate_all: _Optional[_Union[ShardDeactivateAll, _Mapping]] = ..., push: _Optional[_Union[ShardPush, _Mapping]] = ..., resolve: _Optional[_Union[ShardResolve, _Mapping]] = ..., drop: _Optional[_Union[ShardDrop, _Mapping]] = ..., snapshot: _Optional[_Union[ShardSnapshot, _Mapping]] = ..., checkpoint: _Optional[_Union[ShardCheckpoint, _Mapping]] = ..., load: _Optional[_Union[ShardLoad, _Mapping]] = ..., finish: _Optional[_Union[ShardFinish, _Mapping]] = ..., initial: _Optional[_Union[ShardInitial, _Mapping]] = ...) -> None: ...

class ShardVerdict(_message.Message):
    __slots__ = ("worker", "session", "iteration_index", "ok", "code", "reason", "message", "g_max", "loss", "sample_count")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ITERATION_INDEX_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    G_MAX_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    worker: int
    session: int
    iteration_index: int
    ok: bool
    code: str
    reason: str
    message: str
    g_max: float
    loss: float
    sample_count: int
    def __init__(self, worker: _Optional[int] = ..., session: _Optional[int] = ..., iteration_index: _Optional[int] = ..., ok: _Optional[bool] = ..., code: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., g_max: _Optional[float] = ..., loss: _Optional[float] = ..., sample_count: _Optional[int] = ...) -> None: ...

class ShardAttached(_message.Message):
    __slots__ = ("bound",)
    BOUND_FIELD_NUMBER: _ClassVar[int]
    bound: float
    def __init__(self, bound: _Optional[float] = ...) -> None: ...

class ShardTrial(_message.Message):
    __slots__ = ("finite", "bound", "bound_before")
    FINITE_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    BOUND_BEFORE_FIELD_NUMBER: _ClassVar[int]
    finite: bool
    bound: float
    bound_before: float
    def __init__(self, finite: _Optional[bool] = ..., bound: _Optional[float] = ..., bound_before: _Optional[float] = ...) -> None: ...

class ShardSlice(_message.Message):
    __slots__ = ("params", "iteration")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    params: Tensor
    iteration: int
    def __init__(self, params: _Optional[_Union[Tensor, _Mapping]] = ..., iteration: _Optional[int] = ...) -> None: ...

class ShardCheckpointed(_message.Message):
    __slots__ = ("path", "sha256", "iteration")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    iteration: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., iteration: _Optional[int] = ...) -> None: ...

class ShardLoaded(_message.Message):
    __slots__ = ("iteration", "bound")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    bound: float
    def __init__(self, iteration: _Optional[int] = ..., bound: _Optional[float] = ...) -> None: ...

class ShardReport(_message.Message):
    __slots__ = ("seq", "verdict", "attached", "trial", "slice", "checkpointed", "loaded", "failed", "done")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTED_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    verdict: ShardVerdict
    attached: ShardAttached
    trial: ShardTrial
    slice: ShardSlice
    checkpointed: ShardCheckpointed
    loaded: ShardLoaded
    failed: str
    done: bool
    def __init__(self, seq: _Optional[int] = ..., verdict: _Optional[_Union[ShardVerdict, _Mapping]] = ..., attached: _Optional[_Union[ShardAttached, _Mapping]] = ..., trial: _Optional[_Union[ShardTrial, _Mapping]] = ..., slice: _Optional[_Union[ShardSlice, _Mapping]] = ..., checkpointed: _Optional[_Union[ShardCheckpointed, _Mapping]] = ..., loaded: _Optional[_Union[ShardLoaded, _Mapping]] = ..., failed: _Optional[str] = ..., done: _Optional[bool] = ...) -> None: ...

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
