"""A :class:`~signaling_server.store.RoomStore` on Redis, so several replicas share rooms.

An owner and a researcher of one room may be connected to different replicas behind a load
balancer. Everything a replica knows about a room lives in Redis, under ``duet:`` keys:

    duet:room:<id>          hash {joined: 0|1}, expiring with the room (PEXPIRE)
    duet:rooms              sorted set id -> expiry time: counts open rooms, tells "expired"
    duet:gone:<id>          tombstone: why the room is gone (expires after tombstone_ttl)
    duet:graves             sorted set id -> burial time: bounds the tombstones' number
    duet:open:<id>:<role>   present while that peer's mailbox is open
    duet:box:<id>:<role>    list: messages relayed to that peer, oldest first

The one-researcher rule and every other check-then-change is a Lua script, which Redis runs
atomically: of 100 replicas' joins racing for one room, exactly one sees ``joined == 0``.

Relaying uses a list per peer read with a blocking pop (BLPOP), not pub/sub: a message
published before its reader is listening (the offer, sent the moment the researcher joined)
waits in the list instead of being lost, and order is the list's order. Failure modes: if Redis
restarts, lists and rooms are gone and blocked readers get a connection error; the replicas
tell the peers ``unavailable`` and close, so pairings in flight fail with a clear error and
new ones work once Redis is back. A replica that dies leaves its peer's room until the room
expires: each peer's connection runs its own timer to the room's deadline (kept in
``duet:rooms``), so the peer on a live replica is told "expired" on time, and the room's keys
vanish from Redis a grace period later.

Redis holds only room ids (digests of the join secret), roles and the relayed messages (SDP
sealed with the join secret): nothing that lets it join or read a session. It must still not
be exposed: give it a password (``redis://:password@host:6379/0``) and TLS (``rediss://``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from .store import _GONE_ANSWERS, GoneReason, Role, RoomError

__all__ = ["RedisRoomStore"]

_PREFIX = "duet:"
_MAILBOX_TTL_MS = 120_000  # relayed messages nobody reads are dropped after this
# A room's keys outlive its deadline by this much: the replica holding the owner expires the
# room on time and tells both peers; Redis cleans up after replicas that died.
_GRACE_MS = 30_000

_CREATE = """
local room, gone, rooms, open = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, ttl_ms, max_rooms, id = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if redis.call('EXISTS', room) == 1 then return 'room_exists' end
if redis.call('EXISTS', gone) == 1 then return 'used_before' end
redis.call('ZREMRANGEBYSCORE', rooms, '-inf', now)
if redis.call('ZCARD', rooms) >= max_rooms then return 'limit' end
redis.call('HSET', room, 'joined', 0)
redis.call('PEXPIRE', room, ttl_ms + tonumber(ARGV[5]))
redis.call('ZADD', rooms, now + ttl_ms / 1000, id)
redis.call('SET', open, 1, 'PX', ttl_ms + 60000)
return 'ok'
"""

_JOIN = """
local room, gone, rooms, open = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, id = tonumber(ARGV[1]), ARGV[2]
local expiry = redis.call('ZSCORE', rooms, id)
if expiry and tonumber(expiry) <= now then return 'gone:expired' end
if redis.call('EXISTS', room) == 0 then
  local reason = redis.call('GET', gone)
  if reason then return 'gone:' .. reason end
  return 'unknown_room'
end
-- past its deadline, pruned from the index by a later create, its keys in their grace period
if not expiry then return 'gone:expired' end
if redis.call('HGET', room, 'joined') == '1' then return 'room_full' end
redis.call('HSET', room, 'joined', 1)
redis.call('SET', open, 1, 'PX', redis.call('PTTL', room) + 60000)
return 'ok:' .. expiry
"""

# Tombstones are bounded in number as in memory (10 per room the server may hold): otherwise
# a client creating and leaving rooms in a loop adds a key per room for tombstone_ttl (an hour)
# and grows Redis without limit. Past the bound the oldest tombstones go first; their keys are
# derived in the script (ARGV[6] is the key prefix), which a single Redis, not a cluster, allows.
_DELETE = """
local room, gone, rooms, graves = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local reason, tombstone_s, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now, max_graves, prefix = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
if redis.call('DEL', room) == 0 then return 0 end
redis.call('ZREM', rooms, id)
if tombstone_s > 0 then
  redis.call('SET', gone, reason, 'EX', tombstone_s)
  redis.call('ZADD', graves, now, id)
  redis.call('ZREMRANGEBYSCORE', graves, '-inf', now - tombstone_s)
  local excess = redis.call('ZCARD', graves) - max_graves
  if excess > 0 then
    local popped = redis.call('ZPOPMIN', graves, excess)  -- id, score, id, score, ...
    for i = 1, #popped, 2 do redis.call('DEL', prefix .. 'gone:' .. popped[i]) end
  end
  redis.call('EXPIRE', graves, tombstone_s)
end
return 1
"""

_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""


def _unavailable(exc: Exception) -> RoomError:
    return RoomError("unavailable", f"the signaling server's room store is unreachable "
                     f"({type(exc).__name__}); try again shortly")


class _RedisMailbox:
    def __init__(self, store: RedisRoomStore, room: str, role: Role, expires_in: float) -> None:
        self._store = store
        self.expires_in = expires_in
        self._open = store._key("open", room, role)
        self._box = store._key("box", room, role)

    async def get(self) -> str:
        """The next message; a cancellation (the peer left) always ends the wait.

        redis-py sometimes swallows a cancellation that lands mid-command (the blocking pop
        then returns or fails as if nothing happened). Unchecked, the loop would poll forever,
        holding a pooled Redis connection, and the connection's cleanup, which awaits this
        task, would never finish: a client that connects and drops in a loop would leak both.
        """
        task = asyncio.current_task()
        try:
            while True:  # short blocking pops: a dead connection is noticed within seconds
                item = await self._store.redis.blpop([self._box], timeout=2)
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
                if item is not None:
                    return str(item[1])
        except RedisError as exc:
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from None
            raise _unavailable(exc) from None

    async def close(self) -> None:
        try:
            await self._store.redis.delete(self._open, self._box)
        except RedisError:
            pass  # the keys expire on their own


class RedisRoomStore:
    """Rooms and mailboxes in Redis, shared by every replica that points at the same URL."""

    kind = "redis"

    def __init__(self, url: str, max_rooms: int, tombstone_ttl: float) -> None:
        # Each waiting peer holds one connection in a blocking pop: size the pool for every
        # open room's two peers (Redis's own maxclients, 10,000 by default, bounds it too).
        self.redis: aioredis.Redis = aioredis.from_url(
            url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10,
            health_check_interval=10, max_connections=2 * max_rooms + 64)
        self._max_rooms = max_rooms
        self._max_tombstones = 10 * max_rooms  # as InMemoryRoomStore
        self._tombstone_ttl = tombstone_ttl
        self._create = self.redis.register_script(_CREATE)
        self._join = self.redis.register_script(_JOIN)
        self._delete = self.redis.register_script(_DELETE)
        self._publish = self.redis.register_script(_PUBLISH)

    @staticmethod
    def _key(kind: str, room: str, role: str | None = None) -> str:
        return f"{_PREFIX}{kind}:{room}" + (f":{role}" if role else "")

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def create(self, room: str, ttl: float) -> _RedisMailbox:
        answer = await self._run(self._create, [
            self._key("room", room), self._key("gone", room), f"{_PREFIX}rooms",
            self._key("open", room, "owner")],
            [time.time(), int(ttl * 1000), self._max_rooms, room, _GRACE_MS])
        if answer == "room_exists":
            raise RoomError("room_exists", "a room with this id already exists")
        if answer == "used_before":
            raise RoomError("room_exists", "this room id was used before; generate a new code")
        if answer == "limit":
            raise RoomError("limit", f"the server holds its maximum of {self._max_rooms} rooms")
        return _RedisMailbox(self, room, "owner", ttl)

    async def join(self, room: str) -> _RedisMailbox:
        now = time.time()
        answer = str(await self._run(self._join, [
            self._key("room", room), self._key("gone", room), f"{_PREFIX}rooms",
            self._key("open", room, "researcher")], [now, room]))
        if answer.startswith("gone:"):
            reason: GoneReason = answer[5:]  # type: ignore[assignment]
            code, message = _GONE_ANSWERS[reason]
            raise RoomError(code, message)
        if answer == "unknown_room":
            raise RoomError("unknown_room", "no room with this id")
        if answer == "room_full":
            raise RoomError("room_full", "a researcher already joined this room")
        return _RedisMailbox(self, room, "researcher", float(answer[3:]) - now)

    async def delete(self, room: str, reason: GoneReason) -> bool:
        deleted = await self._run(self._delete, [
            self._key("room", room), self._key("gone", room), f"{_PREFIX}rooms",
            f"{_PREFIX}graves"],
            [reason, int(self._tombstone_ttl), room, time.time(), self._max_tombstones, _PREFIX])
        return bool(deleted)

    async def room_count(self) -> int:
        try:
            await self.redis.zremrangebyscore(f"{_PREFIX}rooms", "-inf", time.time())
            return int(await self.redis.zcard(f"{_PREFIX}rooms"))
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def publish(self, room: str, to_role: Role, message: str) -> bool:
        published = await self._run(self._publish, [
            self._key("open", room, to_role), self._key("box", room, to_role)],
            [message, _MAILBOX_TTL_MS])
        return bool(published)

    async def healthy(self) -> bool:
        """Whether Redis answers a PING within a second."""
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), 1))
        except (RedisError, OSError, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        await self.redis.aclose()
