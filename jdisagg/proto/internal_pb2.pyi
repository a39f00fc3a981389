from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceInfo(_message.Message):
    __slots__ = ("role", "index", "control", "transfer", "max_batch", "pages", "page_size", "buffer_tokens", "processes", "mesh", "layouts")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    MESH_FIELD_NUMBER: _ClassVar[int]
    LAYOUTS_FIELD_NUMBER: _ClassVar[int]
    role: str
    index: int
    control: str
    transfer: str
    max_batch: int
    pages: int
    page_size: int
    buffer_tokens: int
    processes: int
    mesh: str
    layouts: _containers.RepeatedCompositeFieldContainer[Layout]
    def __init__(self, role: _Optional[str] = ..., index: _Optional[int] = ..., control: _Optional[str] = ..., transfer: _Optional[str] = ..., max_batch: _Optional[int] = ..., pages: _Optional[int] = ..., page_size: _Optional[int] = ..., buffer_tokens: _Optional[int] = ..., processes: _Optional[int] = ..., mesh: _Optional[str] = ..., layouts: _Optional[_Iterable[_Union[Layout, _Mapping]]] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("shape", "parts")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    parts: _containers.RepeatedCompositeFieldContainer[Part]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., parts: _Optional[_Iterable[_Union[Part, _Mapping]]] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("layouts", "checksum")
    LAYOUTS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    layouts: _containers.RepeatedCompositeFieldContainer[Layout]
    checksum: bool
    def __init__(self, layouts: _Optional[_Iterable[_Union[Layout, _Mapping]]] = ..., checksum: _Optional[bool] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("seconds",)
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    def __init__(self, seconds: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceInfo
    def __init__(self, instance: _Optional[_Union[InstanceInfo, _Mapping]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("router",)
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    router: str
    def __init__(self, router: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("control",)
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    control: str
    def __init__(self, control: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("interval_s",)
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    def __init__(self, interval_s: _Optional[float] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("queued", "queued_tokens", "held", "held_tokens", "leases", "running", "waiting", "pages_used", "pages_total", "lease_expiries", "transfer_failures", "draining")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    HELD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PAGES_USED_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRIES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FAILURES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    queued: int
    queued_tokens: int
    held: int
    held_tokens: int
    leases: int
    running: int
    waiting: int
    pages_used: int
    pages_total: int
    lease_expiries: int
    transfer_failures: int
    draining: bool
    def __init__(self, queued: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., held: _Optional[int] = ..., held_tokens: _Optional[int] = ..., leases: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., pages_used: _Optional[int] = ..., pages_total: _Optional[int] = ..., lease_expiries: _Optional[int] = ..., transfer_failures: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "ignore_eos", "logprobs")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ...) -> None: ...

class Logprob(_message.Message):
    __slots__ = ("logprob", "top_ids", "top_logprobs")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class PrefillCall(_message.Message):
    __slots__ = ("id", "prompt", "output", "sampling")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    id: int
    prompt: _containers.RepeatedScalarFieldContainer[int]
    output: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    def __init__(self, id: _Optional[int] = ..., prompt: _Optional[_Iterable[int]] = ..., output: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class PrefixHandle(_message.Message):
    __slots__ = ("uuid", "transfer", "control", "length", "held_tokens", "nbytes", "shape", "dtype")
    UUID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    HELD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    uuid: int
    transfer: str
    control: str
    length: int
    held_tokens: int
    nbytes: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, uuid: _Optional[int] = ..., transfer: _Optional[str] = ..., control: _Optional[str] = ..., length: _Optional[int] = ..., held_tokens: _Optional[int] = ..., nbytes: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class PrefillEvent(_message.Message):
    __slots__ = ("has_first_token", "first_token", "first_logprob", "prefix", "finish_reason")
    HAS_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    has_first_token: bool
    first_token: int
    first_logprob: Logprob
    prefix: PrefixHandle
    finish_reason: str
    def __init__(self, has_first_token: _Optional[bool] = ..., first_token: _Optional[int] = ..., first_logprob: _Optional[_Union[Logprob, _Mapping]] = ..., prefix: _Optional[_Union[PrefixHandle, _Mapping]] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, start: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[int]] = ...) -> None: ...

class Part(_message.Message):
    __slots__ = ("boxes",)
    BOXES_FIELD_NUMBER: _ClassVar[int]
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    def __init__(self, boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ...) -> None: ...

class StageRequest(_message.Message):
    __slots__ = ("uuid", "parts", "timeout_s", "checksum")
    UUID_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    uuid: int
    parts: _containers.RepeatedCompositeFieldContainer[Part]
    timeout_s: float
    checksum: bool
    def __init__(self, uuid: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[Part, _Mapping]]] = ..., timeout_s: _Optional[float] = ..., checksum: _Optional[bool] = ...) -> None: ...

class StageResponse(_message.Message):
    __slots__ = ("checksums",)
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeCall(_message.Message):
    __slots__ = ("id", "prompt", "output", "sampling", "prefix")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    id: int
    prompt: _containers.RepeatedScalarFieldContainer[int]
    output: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    prefix: PrefixHandle
    def __init__(self, id: _Optional[int] = ..., prompt: _Optional[_Iterable[int]] = ..., output: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., prefix: _Optional[_Union[PrefixHandle, _Mapping]] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("ids", "logprobs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[Logprob]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[Logprob, _Mapping]]] = ...) -> None: ...

class Pulled(_message.Message):
    __slots__ = ("transfer_s", "transfer_bytes")
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    transfer_s: float
    transfer_bytes: int
    def __init__(self, transfer_s: _Optional[float] = ..., transfer_bytes: _Optional[int] = ...) -> None: ...

class Ended(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("tokens", "pulled", "ended")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PULLED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    tokens: Tokens
    pulled: Pulled
    ended: Ended
    def __init__(self, tokens: _Optional[_Union[Tokens, _Mapping]] = ..., pulled: _Optional[_Union[Pulled, _Mapping]] = ..., ended: _Optional[_Union[Ended, _Mapping]] = ...) -> None: ...

class FaultRequest(_message.Message):
    __slots__ = ("stage_hang", "prefill_delay_s")
    STAGE_HANG_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    stage_hang: int
    prefill_delay_s: float
    def __init__(self, stage_hang: _Optional[int] = ..., prefill_delay_s: _Optional[float] = ...) -> None: ...

class FaultResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
