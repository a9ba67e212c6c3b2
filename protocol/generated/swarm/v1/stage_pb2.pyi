from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hop(_message.Message):
    __slots__ = ("stage", "peer_id", "endpoint")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    stage: int
    peer_id: str
    endpoint: str
    def __init__(self, stage: _Optional[int] = ..., peer_id: _Optional[str] = ..., endpoint: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("swarm_id", "round", "microbatch", "path", "hop", "auth", "attempt")
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOP_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    swarm_id: str
    round: int
    microbatch: int
    path: _containers.RepeatedCompositeFieldContainer[Hop]
    hop: int
    auth: bytes
    attempt: int
    def __init__(self, swarm_id: _Optional[str] = ..., round: _Optional[int] = ..., microbatch: _Optional[int] = ..., path: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., hop: _Optional[int] = ..., auth: _Optional[bytes] = ..., attempt: _Optional[int] = ...) -> None: ...

class TensorMeta(_message.Message):
    __slots__ = ("dtype", "shape", "codec", "nbytes", "block_size", "rank")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    nbytes: int
    block_size: int
    rank: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., nbytes: _Optional[int] = ..., block_size: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("envelope", "meta", "data")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    meta: TensorMeta
    data: bytes
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., meta: _Optional[_Union[TensorMeta, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("queued", "tokens", "checked")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    queued: int
    tokens: int
    checked: bool
    def __init__(self, queued: _Optional[int] = ..., tokens: _Optional[int] = ..., checked: _Optional[bool] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("peer_id", "time")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    time: float
    def __init__(self, peer_id: _Optional[str] = ..., time: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("peer_id", "swarm_id", "stages", "round", "version")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    swarm_id: str
    stages: _containers.RepeatedScalarFieldContainer[int]
    round: int
    version: str
    def __init__(self, peer_id: _Optional[str] = ..., swarm_id: _Optional[str] = ..., stages: _Optional[_Iterable[int]] = ..., round: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("swarm_id", "stage", "include_grads", "min_round")
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GRADS_FIELD_NUMBER: _ClassVar[int]
    MIN_ROUND_FIELD_NUMBER: _ClassVar[int]
    swarm_id: str
    stage: int
    include_grads: bool
    min_round: int
    def __init__(self, swarm_id: _Optional[str] = ..., stage: _Optional[int] = ..., include_grads: _Optional[bool] = ..., min_round: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("round", "data")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    round: int
    data: bytes
    def __init__(self, round: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("swarm_id", "round", "microbatch", "attempt", "failed_peer", "reason", "sender")
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FAILED_PEER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    swarm_id: str
    round: int
    microbatch: int
    attempt: int
    failed_peer: str
    reason: str
    sender: SenderProof
    def __init__(self, swarm_id: _Optional[str] = ..., round: _Optional[int] = ..., microbatch: _Optional[int] = ..., attempt: _Optional[int] = ..., failed_peer: _Optional[str] = ..., reason: _Optional[str] = ..., sender: _Optional[_Union[SenderProof, _Mapping]] = ...) -> None: ...

class SenderProof(_message.Message):
    __slots__ = ("public_key", "signature")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    signature: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class FailureAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RerouteNotice(_message.Message):
    __slots__ = ("swarm_id", "round", "microbatch", "attempt", "path", "sender")
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    swarm_id: str
    round: int
    microbatch: int
    attempt: int
    path: _containers.RepeatedCompositeFieldContainer[Hop]
    sender: SenderProof
    def __init__(self, swarm_id: _Optional[str] = ..., round: _Optional[int] = ..., microbatch: _Optional[int] = ..., attempt: _Optional[int] = ..., path: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., sender: _Optional[_Union[SenderProof, _Mapping]] = ...) -> None: ...

class RoundDoneNotice(_message.Message):
    __slots__ = ("swarm_id", "round", "origin", "sender")
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    swarm_id: str
    round: int
    origin: str
    sender: SenderProof
    def __init__(self, swarm_id: _Optional[str] = ..., round: _Optional[int] = ..., origin: _Optional[str] = ..., sender: _Optional[_Union[SenderProof, _Mapping]] = ...) -> None: ...

class GradientRequest(_message.Message):
    __slots__ = ("swarm_id", "stage", "round", "shard", "shards", "averaged")
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    AVERAGED_FIELD_NUMBER: _ClassVar[int]
    swarm_id: str
    stage: int
    round: int
    shard: int
    shards: int
    averaged: bool
    def __init__(self, swarm_id: _Optional[str] = ..., stage: _Optional[int] = ..., round: _Optional[int] = ..., shard: _Optional[int] = ..., shards: _Optional[int] = ..., averaged: _Optional[bool] = ...) -> None: ...

class ReachabilityRequest(_message.Message):
    __slots__ = ("endpoint", "maddrs")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, endpoint: _Optional[str] = ..., maddrs: _Optional[_Iterable[str]] = ...) -> None: ...

class ReachabilityReply(_message.Message):
    __slots__ = ("grpc_reachable", "dht_reachable", "detail", "observed_host")
    GRPC_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    DHT_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_HOST_FIELD_NUMBER: _ClassVar[int]
    grpc_reachable: bool
    dht_reachable: bool
    detail: str
    observed_host: str
    def __init__(self, grpc_reachable: _Optional[bool] = ..., dht_reachable: _Optional[bool] = ..., detail: _Optional[str] = ..., observed_host: _Optional[str] = ...) -> None: ...
