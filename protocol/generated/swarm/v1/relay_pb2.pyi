from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AttachRequest(_message.Message):
    __slots__ = ("swarm_id", "peer_id")
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    swarm_id: str
    peer_id: str
    def __init__(self, swarm_id: _Optional[str] = ..., peer_id: _Optional[str] = ...) -> None: ...

class RelayEvent(_message.Message):
    __slots__ = ("endpoint", "tunnel", "connection", "token")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    tunnel: str
    connection: int
    token: bytes
    def __init__(self, endpoint: _Optional[str] = ..., tunnel: _Optional[str] = ..., connection: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...
