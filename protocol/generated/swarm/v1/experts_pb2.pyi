from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertRequest(_message.Message):
    __slots__ = ("swarm_id", "expert_id", "sha256", "offset", "auth")
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    swarm_id: str
    expert_id: str
    sha256: str
    offset: int
    auth: bytes
    def __init__(self, swarm_id: _Optional[str] = ..., expert_id: _Optional[str] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ..., auth: _Optional[bytes] = ...) -> None: ...

class ExpertChunk(_message.Message):
    __slots__ = ("offset", "total", "sha256", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    total: int
    sha256: str
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., total: _Optional[int] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...
