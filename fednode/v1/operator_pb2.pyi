from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "address", "state", "round", "epoch", "level", "peers_alive", "peers_suspect", "peers_dead", "last_loss", "bytes_sent", "bytes_received", "uptime_s", "version", "rounds_target", "rejected", "cert_expires_in_s", "mode", "ceiling", "quorum_level", "trained_level", "negotiation")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PEERS_ALIVE_FIELD_NUMBER: _ClassVar[int]
    PEERS_SUSPECT_FIELD_NUMBER: _ClassVar[int]
    PEERS_DEAD_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TARGET_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CERT_EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CEILING_FIELD_NUMBER: _ClassVar[int]
    QUORUM_LEVEL_FIELD_NUMBER: _ClassVar[int]
    TRAINED_LEVEL_FIELD_NUMBER: _ClassVar[int]
    NEGOTIATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: str
    round: int
    epoch: int
    level: int
    peers_alive: int
    peers_suspect: int
    peers_dead: int
    last_loss: float
    bytes_sent: int
    bytes_received: int
    uptime_s: float
    version: str
    rounds_target: int
    rejected: int
    cert_expires_in_s: float
    mode: str
    ceiling: int
    quorum_level: int
    trained_level: int
    negotiation: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., round: _Optional[int] = ..., epoch: _Optional[int] = ..., level: _Optional[int] = ..., peers_alive: _Optional[int] = ..., peers_suspect: _Optional[int] = ..., peers_dead: _Optional[int] = ..., last_loss: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., uptime_s: _Optional[float] = ..., version: _Optional[str] = ..., rounds_target: _Optional[int] = ..., rejected: _Optional[int] = ..., cert_expires_in_s: _Optional[float] = ..., mode: _Optional[str] = ..., ceiling: _Optional[int] = ..., quorum_level: _Optional[int] = ..., trained_level: _Optional[int] = ..., negotiation: _Optional[str] = ...) -> None: ...

class PeersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("node_id", "address", "state", "heartbeat", "last_round", "last_seen_s", "incarnation")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: str
    heartbeat: int
    last_round: int
    last_seen_s: float
    incarnation: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., heartbeat: _Optional[int] = ..., last_round: _Optional[int] = ..., last_seen_s: _Optional[float] = ..., incarnation: _Optional[int] = ...) -> None: ...

class PeersReply(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    def __init__(self, peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...
