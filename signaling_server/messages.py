"""The signaling protocol: JSON messages over one WebSocket per peer at ``/ws``.

The server relays pairing messages between the two peers of a room and nothing else. It
never sees the join code's secret: a room is named by ``room``, a one-way digest of the
secret (see ``duet.codes``), and the SDP it relays is opaque, authenticated end to end by
the peers.

Flow (``version`` is :data:`PROTOCOL_VERSION`)::

    owner      -> create{room}            <- created{room, ttl, idle_timeout}
    researcher -> join{room}              <- joined{room, idle_timeout};  owner <- peer_joined
    owner      -> signal{kind=offer}      researcher <- signal{kind=offer}
    researcher -> signal{kind=answer}     owner <- signal{kind=answer}; the room is deleted
    either     -> leave{reason}           other <- peer_left{reason}; the room is deleted
    either     -> ping                    <- pong   (keeps an idle connection alive)

Any failure answers ``error{code, message}``; the server stays up.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

PROTOCOL_VERSION = 1
ROOM_ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_PAYLOAD_CHARS = 64 * 1024
MAX_REASON_CHARS = 500

RoomId = Annotated[str, Field(pattern=ROOM_ID_PATTERN)]
SignalKind = Literal["offer", "answer"]
ErrorCode = Literal[
    "malformed",  # not JSON, or not a valid message
    "unsupported_version",
    "bad_state",  # message not allowed now (e.g. signal before pairing)
    "room_exists",
    "unknown_room",
    "room_full",  # a researcher already joined
    "expired",
    "too_large",
    "limit",  # max rooms or connections per address reached
    "idle_timeout",
    "shutting_down",
    "unavailable",  # the shared room store (Redis) does not answer; try again
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- client -> server ---------------------------------------------------------------------
class Create(_Message):
    type: Literal["create"] = "create"
    version: int = PROTOCOL_VERSION
    room: RoomId


class Join(_Message):
    type: Literal["join"] = "join"
    version: int = PROTOCOL_VERSION
    room: RoomId


class Signal(_Message):
    """An SDP offer or answer; opaque to the server (a MAC-protected envelope)."""

    type: Literal["signal"] = "signal"
    kind: SignalKind
    payload: str = Field(max_length=MAX_PAYLOAD_CHARS)


class Leave(_Message):
    type: Literal["leave"] = "leave"
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


class Ping(_Message):
    type: Literal["ping"] = "ping"


# -- server -> client ---------------------------------------------------------------------
class Created(_Message):
    type: Literal["created"] = "created"
    room: RoomId
    ttl: float
    idle_timeout: float


class Joined(_Message):
    type: Literal["joined"] = "joined"
    room: RoomId
    idle_timeout: float


class PeerJoined(_Message):
    type: Literal["peer_joined"] = "peer_joined"


class PeerLeft(_Message):
    type: Literal["peer_left"] = "peer_left"
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


class Pong(_Message):
    type: Literal["pong"] = "pong"


class Error(_Message):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str


ClientMessage = Annotated[Create | Join | Signal | Leave | Ping, Field(discriminator="type")]
# Signal travels both ways: the server forwards it unchanged.
ServerMessage = Annotated[
    Created | Joined | PeerJoined | Signal | PeerLeft | Pong | Error,
    Field(discriminator="type"),
]

client_message_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
server_message_adapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)
