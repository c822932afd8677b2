from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    PROTOCOL_MISMATCH: _ClassVar[Reason]
    TOKENIZER_MISMATCH: _ClassVar[Reason]
    FAMILY_MISMATCH: _ClassVar[Reason]
    BAD_CERTIFICATE: _ClassVar[Reason]
    BAD_SIGNATURE: _ClassVar[Reason]
    WRONG_RECIPIENT: _ClassVar[Reason]
    TAMPERED: _ClassVar[Reason]
    OUT_OF_ORDER: _ClassVar[Reason]
    TRUNCATED: _ClassVar[Reason]
    REPLAY: _ClassVar[Reason]
    STALE_ROUND: _ClassVar[Reason]
    SHAPE_MISMATCH: _ClassVar[Reason]
    NOT_FINITE: _ClassVar[Reason]
    MALFORMED: _ClassVar[Reason]
    OVERSIZE: _ClassVar[Reason]
    UNKNOWN_PEER: _ClassVar[Reason]
    NOT_READY: _ClassVar[Reason]
    NO_STATE: _ClassVar[Reason]
    RATE_LIMITED: _ClassVar[Reason]
    STALE_EPOCH: _ClassVar[Reason]
    FUTURE_EPOCH: _ClassVar[Reason]
    NOT_PROPOSER: _ClassVar[Reason]
    BAD_LEVEL: _ClassVar[Reason]
    BAD_SEED: _ClassVar[Reason]
    BAD_ACTIVATION: _ClassVar[Reason]
    TOO_SOON: _ClassVar[Reason]
    CONFLICTING_PROPOSAL: _ClassVar[Reason]
    BAD_ACK: _ClassVar[Reason]
    DUPLICATE_ACK: _ClassVar[Reason]
    UNPROVEN_AGREEMENT: _ClassVar[Reason]
    LOSS_JUMP: _ClassVar[Reason]
    DUPLICATE_IDENTITY: _ClassVar[Reason]
REASON_UNSPECIFIED: Reason
PROTOCOL_MISMATCH: Reason
TOKENIZER_MISMATCH: Reason
FAMILY_MISMATCH: Reason
BAD_CERTIFICATE: Reason
BAD_SIGNATURE: Reason
WRONG_RECIPIENT: Reason
TAMPERED: Reason
OUT_OF_ORDER: Reason
TRUNCATED: Reason
REPLAY: Reason
STALE_ROUND: Reason
SHAPE_MISMATCH: Reason
NOT_FINITE: Reason
MALFORMED: Reason
OVERSIZE: Reason
UNKNOWN_PEER: Reason
NOT_READY: Reason
NO_STATE: Reason
RATE_LIMITED: Reason
STALE_EPOCH: Reason
FUTURE_EPOCH: Reason
NOT_PROPOSER: Reason
BAD_LEVEL: Reason
BAD_SEED: Reason
BAD_ACTIVATION: Reason
TOO_SOON: Reason
CONFLICTING_PROPOSAL: Reason
BAD_ACK: Reason
DUPLICATE_ACK: Reason
UNPROVEN_AGREEMENT: Reason
LOSS_JUMP: Reason
DUPLICATE_IDENTITY: Reason

class Capabilities(_message.Message):
    __slots__ = ("max_level", "step_time_s", "memory_bytes")
    MAX_LEVEL_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_level: int
    step_time_s: float
    memory_bytes: int
    def __init__(self, max_level: _Optional[int] = ..., step_time_s: _Optional[float] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class HelloBody(_message.Message):
    __slots__ = ("node_id", "protocol_version", "tokenizer_hash", "family_hash", "payload_public_key", "address", "incarnation", "capabilities", "issued_unix_ms", "heartbeat_anchor", "heartbeat_base")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    FAMILY_HASH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ANCHOR_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_BASE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    protocol_version: int
    tokenizer_hash: str
    family_hash: str
    payload_public_key: bytes
    address: str
    incarnation: int
    capabilities: Capabilities
    issued_unix_ms: int
    heartbeat_anchor: bytes
    heartbeat_base: int
    def __init__(self, node_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., tokenizer_hash: _Optional[str] = ..., family_hash: _Optional[str] = ..., payload_public_key: _Optional[bytes] = ..., address: _Optional[str] = ..., incarnation: _Optional[int] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., issued_unix_ms: _Optional[int] = ..., heartbeat_anchor: _Optional[bytes] = ..., heartbeat_base: _Optional[int] = ...) -> None: ...

class SignedHello(_message.Message):
    __slots__ = ("body", "signature", "certificate_der")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_DER_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    certificate_der: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_der: _Optional[bytes] = ...) -> None: ...

class PeerRecord(_message.Message):
    __slots__ = ("hello", "heartbeat", "left", "last_round", "negotiation", "heartbeat_proof", "farewell")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    NEGOTIATION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_PROOF_FIELD_NUMBER: _ClassVar[int]
    FAREWELL_FIELD_NUMBER: _ClassVar[int]
    hello: SignedHello
    heartbeat: int
    left: bool
    last_round: int
    negotiation: SignedBlob
    heartbeat_proof: bytes
    farewell: SignedBlob
    def __init__(self, hello: _Optional[_Union[SignedHello, _Mapping]] = ..., heartbeat: _Optional[int] = ..., left: _Optional[bool] = ..., last_round: _Optional[int] = ..., negotiation: _Optional[_Union[SignedBlob, _Mapping]] = ..., heartbeat_proof: _Optional[bytes] = ..., farewell: _Optional[_Union[SignedBlob, _Mapping]] = ...) -> None: ...

class Farewell(_message.Message):
    __slots__ = ("node_id", "incarnation")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class SignedBlob(_message.Message):
    __slots__ = ("body", "signature", "certificate_der")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_DER_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    certificate_der: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_der: _Optional[bytes] = ...) -> None: ...

class Agreement(_message.Message):
    __slots__ = ("epoch", "level", "previous_level", "activate_round", "proposer", "growth_seed")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_LEVEL_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_ROUND_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_FIELD_NUMBER: _ClassVar[int]
    GROWTH_SEED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    level: int
    previous_level: int
    activate_round: int
    proposer: str
    growth_seed: int
    def __init__(self, epoch: _Optional[int] = ..., level: _Optional[int] = ..., previous_level: _Optional[int] = ..., activate_round: _Optional[int] = ..., proposer: _Optional[str] = ..., growth_seed: _Optional[int] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("epoch", "level", "activate_round", "proposer", "growth_seed", "direction")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_ROUND_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_FIELD_NUMBER: _ClassVar[int]
    GROWTH_SEED_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    level: int
    activate_round: int
    proposer: str
    growth_seed: int
    direction: str
    def __init__(self, epoch: _Optional[int] = ..., level: _Optional[int] = ..., activate_round: _Optional[int] = ..., proposer: _Optional[str] = ..., growth_seed: _Optional[int] = ..., direction: _Optional[str] = ...) -> None: ...

class NegotiationRecord(_message.Message):
    __slots__ = ("node_id", "seq", "round", "ceiling", "over_budget_streak", "messenger_loss", "probe_signature", "committed", "proposal", "ack", "tokens")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CEILING_FIELD_NUMBER: _ClassVar[int]
    OVER_BUDGET_STREAK_FIELD_NUMBER: _ClassVar[int]
    MESSENGER_LOSS_FIELD_NUMBER: _ClassVar[int]
    PROBE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    seq: int
    round: int
    ceiling: int
    over_budget_streak: int
    messenger_loss: float
    probe_signature: bytes
    committed: Agreement
    proposal: Proposal
    ack: Proposal
    tokens: int
    def __init__(self, node_id: _Optional[str] = ..., seq: _Optional[int] = ..., round: _Optional[int] = ..., ceiling: _Optional[int] = ..., over_budget_streak: _Optional[int] = ..., messenger_loss: _Optional[float] = ..., probe_signature: _Optional[bytes] = ..., committed: _Optional[_Union[Agreement, _Mapping]] = ..., proposal: _Optional[_Union[Proposal, _Mapping]] = ..., ack: _Optional[_Union[Proposal, _Mapping]] = ..., tokens: _Optional[int] = ...) -> None: ...

class Digest(_message.Message):
    __slots__ = ("sender_id", "records", "revocation_list")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_LIST_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    records: _containers.RepeatedCompositeFieldContainer[PeerRecord]
    revocation_list: bytes
    def __init__(self, sender_id: _Optional[str] = ..., records: _Optional[_Iterable[_Union[PeerRecord, _Mapping]]] = ..., revocation_list: _Optional[bytes] = ...) -> None: ...

class EnvelopeHeader(_message.Message):
    __slots__ = ("sender_id", "recipient_id", "epoch", "round", "message_id", "kind", "ephemeral_public_key", "total_size", "chunk_size", "chunk_count", "first_chunk", "weight", "content_sha256", "created_unix_ms", "level")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    recipient_id: str
    epoch: int
    round: int
    message_id: bytes
    kind: str
    ephemeral_public_key: bytes
    total_size: int
    chunk_size: int
    chunk_count: int
    first_chunk: int
    weight: float
    content_sha256: str
    created_unix_ms: int
    level: int
    def __init__(self, sender_id: _Optional[str] = ..., recipient_id: _Optional[str] = ..., epoch: _Optional[int] = ..., round: _Optional[int] = ..., message_id: _Optional[bytes] = ..., kind: _Optional[str] = ..., ephemeral_public_key: _Optional[bytes] = ..., total_size: _Optional[int] = ..., chunk_size: _Optional[int] = ..., chunk_count: _Optional[int] = ..., first_chunk: _Optional[int] = ..., weight: _Optional[float] = ..., content_sha256: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., level: _Optional[int] = ...) -> None: ...

class EnvelopeStart(_message.Message):
    __slots__ = ("header", "signature", "sender_certificate_der")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SENDER_CERTIFICATE_DER_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    signature: bytes
    sender_certificate_der: bytes
    def __init__(self, header: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., sender_certificate_der: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("start", "index", "data", "last")
    START_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    start: EnvelopeStart
    index: int
    data: bytes
    last: bool
    def __init__(self, start: _Optional[_Union[EnvelopeStart, _Mapping]] = ..., index: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("accepted", "reason", "detail", "bytes_received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: Reason
    detail: str
    bytes_received: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[_Union[Reason, str]] = ..., detail: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("requester_id", "min_round", "from_chunk", "content_sha256")
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_ROUND_FIELD_NUMBER: _ClassVar[int]
    FROM_CHUNK_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    requester_id: str
    min_round: int
    from_chunk: int
    content_sha256: str
    def __init__(self, requester_id: _Optional[str] = ..., min_round: _Optional[int] = ..., from_chunk: _Optional[int] = ..., content_sha256: _Optional[str] = ...) -> None: ...
