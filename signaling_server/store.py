"""Room state and the relay mailboxes, behind a small async interface.

The relay logic in :mod:`signaling_server.app` talks only to :class:`RoomStore`. The in-memory
implementation serves one process; a shared implementation (Redis: a hash per room with an
expiry, a key per tombstone, a list per mailbox read with BLPOP) can back several replicas behind a
load balancer, since the owner and the researcher of a room may land on different replicas.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

from .messages import ErrorCode

__all__ = [
    "GoneReason",
    "InMemoryRoomStore",
    "Mailbox",
    "Role",
    "RoomError",
    "RoomStore",
]

Role = Literal["owner", "researcher"]
GoneReason = Literal["expired", "used", "closed"]
"""Why a room was deleted; remembered for a while so a late join gets a precise answer."""

_GONE_ANSWERS: dict[GoneReason, tuple[ErrorCode, str]] = {
    "expired": ("expired", "the room expired before pairing"),
    "used": ("room_full", "the room was already used for a pairing"),
    "closed": ("unknown_room", "the room was closed by its owner"),
}


class RoomError(Exception):
    """A room operation was refused; ``code`` is what the client is told."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


class Mailbox(Protocol):
    """The messages relayed to one peer of one room, in order."""

    #: Seconds the room had left when this mailbox opened: each peer's connection expires the
    #: room on time by itself, so a peer whose partner's server died still hears of it.
    expires_in: float

    async def get(self) -> str: ...

    async def close(self) -> None: ...


class RoomStore(Protocol):
    """Rooms (with expiry and tombstones) and the mailboxes that relay between their peers.

    Any method may raise ``RoomError("unavailable", ...)`` when a shared store is unreachable.
    """

    kind: str

    async def create(self, room: str, ttl: float) -> Mailbox:
        """Register a room awaiting its researcher and open the owner's mailbox.

        RoomError room_exists or limit. Claiming the role and opening its mailbox is one step,
        so nothing published to the owner right after can be lost.
        """

    async def join(self, room: str) -> Mailbox:
        """Claim the room's single researcher seat and open the researcher's mailbox.

        RoomError unknown_room, room_full or expired.
        """

    async def delete(self, room: str, reason: GoneReason) -> bool:
        """Delete the room and leave a tombstone; False if it was already gone."""

    async def room_count(self) -> int:
        """Rooms currently open (for /healthz and the max_rooms limit)."""

    async def publish(self, room: str, to_role: Role, message: str) -> bool:
        """Deliver ``message`` to the peer's mailbox; False if that mailbox is closed."""

    async def healthy(self) -> bool:
        """Whether the store answers (always, in memory)."""

    async def close(self) -> None:
        """Release connections (on server shutdown)."""


@dataclass(slots=True)
class _Room:
    expires_at: float
    joined: bool = False


class _QueueMailbox:
    def __init__(self, store: InMemoryRoomStore, key: tuple[str, Role], expires_in: float) -> None:
        self._store = store
        self._key = key
        self.expires_in = expires_in
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    async def get(self) -> str:
        return await self.queue.get()

    async def close(self) -> None:
        if self._store._mailboxes.get(self._key) is self:
            del self._store._mailboxes[self._key]


class InMemoryRoomStore:
    """A :class:`RoomStore` for a single server process."""

    kind = "memory"

    def __init__(self, max_rooms: int, tombstone_ttl: float) -> None:
        self._max_rooms = max_rooms
        self._tombstone_ttl = tombstone_ttl
        # Tombstones are bounded in number too, so a flood of short-lived rooms cannot grow memory.
        self._max_tombstones = 10 * max_rooms
        self._rooms: dict[str, _Room] = {}
        self._tombstones: OrderedDict[str, tuple[float, GoneReason]] = OrderedDict()
        self._mailboxes: dict[tuple[str, Role], _QueueMailbox] = {}

    def _live(self, room: str) -> _Room | None:
        """The room if it exists and has not expired; expiry is applied lazily here."""
        state = self._rooms.get(room)
        if state is not None and state.expires_at <= time.monotonic():
            self._bury(room, "expired")
            return None
        return state

    def _bury(self, room: str, reason: GoneReason) -> None:
        del self._rooms[room]
        now = time.monotonic()
        self._tombstones[room] = (now + self._tombstone_ttl, reason)
        self._tombstones.move_to_end(room)
        while self._tombstones:
            oldest, (until, _) = next(iter(self._tombstones.items()))
            if until > now and len(self._tombstones) <= self._max_tombstones:
                break
            del self._tombstones[oldest]

    def _gone(self, room: str) -> RoomError | None:
        entry = self._tombstones.get(room)
        if entry is None or entry[0] <= time.monotonic():
            return None
        code, message = _GONE_ANSWERS[entry[1]]
        return RoomError(code, message)

    def _open_mailbox(self, room: str, role: Role) -> Mailbox:
        expires_in = self._rooms[room].expires_at - time.monotonic()
        mailbox = _QueueMailbox(self, (room, role), expires_in)
        self._mailboxes[(room, role)] = mailbox
        return mailbox

    async def create(self, room: str, ttl: float) -> Mailbox:
        if self._live(room) is not None:
            raise RoomError("room_exists", "a room with this id already exists")
        gone = self._gone(room)
        if gone is not None:
            raise RoomError("room_exists", "this room id was used before; generate a new code")
        if len(self._rooms) >= self._max_rooms:
            raise RoomError("limit", f"the server holds its maximum of {self._max_rooms} rooms")
        self._rooms[room] = _Room(expires_at=time.monotonic() + ttl)
        return self._open_mailbox(room, "owner")

    async def join(self, room: str) -> Mailbox:
        state = self._live(room)
        if state is None:
            raise self._gone(room) or RoomError("unknown_room", "no room with this id")
        if state.joined:
            raise RoomError("room_full", "a researcher already joined this room")
        state.joined = True
        return self._open_mailbox(room, "researcher")

    async def delete(self, room: str, reason: GoneReason) -> bool:
        if room not in self._rooms:
            return False
        self._bury(room, reason)
        return True

    async def room_count(self) -> int:
        return len(self._rooms)

    async def publish(self, room: str, to_role: Role, message: str) -> bool:
        mailbox = self._mailboxes.get((room, to_role))
        if mailbox is None:
            return False
        mailbox.queue.put_nowait(message)
        return True

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        self._mailboxes.clear()
