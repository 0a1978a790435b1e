"""The signaling protocol against a real server: pairing, refusals, bad input, limits, shutdown."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
import struct
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from signaling_server import ServerConfig, start_server
from signaling_server.messages import MAX_PAYLOAD_CHARS, PROTOCOL_VERSION
from signaling_server.store import GoneReason, InMemoryRoomStore, RoomError
from tests.helpers.signaling import MakeServer, get_health, receive_json, send_json

from .conftest import Connect

Ws = aiohttp.ClientWebSocketResponse


def new_room() -> str:
    return secrets.token_hex(16)


def create(room: str) -> dict[str, Any]:
    return {"type": "create", "version": PROTOCOL_VERSION, "room": room}


def join(room: str) -> dict[str, Any]:
    return {"type": "join", "version": PROTOCOL_VERSION, "room": room}


def signal(kind: str, payload: str) -> dict[str, Any]:
    return {"type": "signal", "kind": kind, "payload": payload}


async def expect_error(ws: Ws, code: str) -> dict[str, Any]:
    reply = await receive_json(ws)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["message"]
    return reply


async def expect_close(ws: Ws, code: int) -> None:
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE, msg
    assert msg.data == code


async def expect_alive(ws: Ws) -> None:
    await send_json(ws, {"type": "ping"})
    assert await receive_json(ws) == {"type": "pong"}


async def pair(connect: Connect, url: str, room: str | None = None) -> tuple[Ws, Ws, str]:
    """An owner and a researcher in one room, the owner told that the peer joined."""
    room = room or new_room()
    owner = await connect(url)
    await send_json(owner, create(room))
    created = await receive_json(owner)
    assert created["type"] == "created" and created["room"] == room
    researcher = await connect(url)
    await send_json(researcher, join(room))
    joined = await receive_json(researcher)
    assert joined["type"] == "joined" and joined["room"] == room
    assert await receive_json(owner) == {"type": "peer_joined"}
    return owner, researcher, room


async def wait_for_health(url: str, **expected: int) -> dict[str, Any]:
    """Poll /healthz until the counts match: the server updates them as sockets wind down."""
    for _ in range(200):
        health = await asyncio.to_thread(get_health, url)
        if all(health[key] == value for key, value in expected.items()):
            return health
        await asyncio.sleep(0.02)
    raise AssertionError(f"health never reached {expected}: {health}")


# -- pairing -------------------------------------------------------------------------------
async def test_pairing_relays_offer_and_answer_then_closes_both(
    subprocess_server: str, connect: Connect
) -> None:
    owner, researcher, room = await pair(connect, subprocess_server)
    await send_json(owner, signal("offer", "v=0 offer-sdp"))
    assert await receive_json(researcher) == signal("offer", "v=0 offer-sdp")
    await send_json(researcher, signal("answer", "v=0 answer-sdp"))
    assert await receive_json(owner) == signal("answer", "v=0 answer-sdp")
    await expect_close(owner, aiohttp.WSCloseCode.OK)
    await expect_close(researcher, aiohttp.WSCloseCode.OK)

    late = await connect(subprocess_server)
    await send_json(late, join(room))
    await expect_error(late, "room_full")


async def test_created_reports_ttl_and_idle_timeout(
    make_server: MakeServer, connect: Connect
) -> None:
    url = await make_server(room_ttl=42, idle_timeout=7)
    owner = await connect(url)
    room = new_room()
    await send_json(owner, create(room))
    assert await receive_json(owner) == {
        "type": "created",
        "room": room,
        "ttl": 42.0,
        "idle_timeout": 7.0,
    }


async def test_full_size_signal_fits_the_default_limit(
    subprocess_server: str, connect: Connect
) -> None:
    line = 'a=candidate:1 1 udp 2122260223 192.168.1.2 54321 typ host "x"\r\n'
    payload = (line * (MAX_PAYLOAD_CHARS // len(line) + 1))[:MAX_PAYLOAD_CHARS]
    owner, researcher, _ = await pair(connect, subprocess_server)
    await send_json(owner, signal("offer", payload))
    assert (await receive_json(researcher))["payload"] == payload


async def test_healthz_counts_rooms_and_connections(
    make_server: MakeServer, connect: Connect
) -> None:
    url = await make_server(max_rooms=5)
    health = await asyncio.to_thread(get_health, url)
    assert health["status"] == "ok"
    assert health["protocol"] == PROTOCOL_VERSION
    assert health["version"]
    assert health["limits"]["max_rooms"] == 5
    assert (health["rooms"], health["connections"]) == (0, 0)

    owner, researcher, _ = await pair(connect, url)
    await wait_for_health(url, rooms=1, connections=2)
    await send_json(owner, signal("offer", "o"))
    await receive_json(researcher)
    await send_json(researcher, signal("answer", "a"))
    await receive_json(owner)
    await expect_close(owner, aiohttp.WSCloseCode.OK)
    await expect_close(researcher, aiohttp.WSCloseCode.OK)
    await wait_for_health(url, rooms=0, connections=0)


async def test_get_ws_without_upgrade_is_a_400(subprocess_server: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{subprocess_server}/ws") as resp:
        assert resp.status == 400


# -- refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("room", ["XYZ", "0" * 31, "A" * 32, "g" * 32, ""])
async def test_malformed_room_id_is_refused(
    subprocess_server: str, connect: Connect, room: str
) -> None:
    ws = await connect(subprocess_server)
    await send_json(ws, join(room))
    reply = await expect_error(ws, "malformed")
    assert "room" in reply["message"]
    await expect_alive(ws)


async def test_join_unknown_room(subprocess_server: str, connect: Connect) -> None:
    ws = await connect(subprocess_server)
    await send_json(ws, join(new_room()))
    await expect_error(ws, "unknown_room")
    await expect_alive(ws)


async def test_second_join_is_refused_and_first_researcher_keeps_the_room(
    subprocess_server: str, connect: Connect
) -> None:
    owner, researcher, room = await pair(connect, subprocess_server)
    intruder = await connect(subprocess_server)
    await send_json(intruder, join(room))
    await expect_error(intruder, "room_full")
    await send_json(owner, signal("offer", "only for the first"))
    assert (await receive_json(researcher))["payload"] == "only for the first"


async def test_create_existing_room(subprocess_server: str, connect: Connect) -> None:
    _, _, room = await pair(connect, subprocess_server)
    other = await connect(subprocess_server)
    await send_json(other, create(room))
    await expect_error(other, "room_exists")


async def test_wrong_version_is_unsupported(subprocess_server: str, connect: Connect) -> None:
    ws = await connect(subprocess_server)
    for message in (create(new_room()), join(new_room())):
        await send_json(ws, {**message, "version": PROTOCOL_VERSION + 1})
        reply = await expect_error(ws, "unsupported_version")
        assert str(PROTOCOL_VERSION) in reply["message"]


async def test_room_expires_for_owner_and_later_join(
    make_server: MakeServer, connect: Connect
) -> None:
    url = await make_server(room_ttl=0.3)
    owner = await connect(url)
    room = new_room()
    await send_json(owner, create(room))
    assert (await receive_json(owner))["type"] == "created"
    await expect_error(owner, "expired")
    await expect_close(owner, aiohttp.WSCloseCode.OK)

    late = await connect(url)
    await send_json(late, join(room))
    await expect_error(late, "expired")
    await wait_for_health(url, rooms=0)


async def test_room_expiry_reaches_a_joined_researcher(
    make_server: MakeServer, connect: Connect
) -> None:
    url = await make_server(room_ttl=0.5)
    owner, researcher, _ = await pair(connect, url)
    # each peer's connection has a timer (the researcher's may be on another replica): the one
    # that deletes the room tells both, the other finds it gone and says nothing more
    await expect_error(owner, "expired")
    await expect_error(researcher, "expired")
    await expect_close(owner, aiohttp.WSCloseCode.OK)
    await expect_close(researcher, aiohttp.WSCloseCode.OK)
    await wait_for_health(url, rooms=0)


async def test_leave_tells_the_peer_and_deletes_the_room(
    subprocess_server: str, connect: Connect
) -> None:
    owner, researcher, room = await pair(connect, subprocess_server)
    await send_json(owner, {"type": "leave", "reason": "changed my mind"})
    assert await receive_json(researcher) == {"type": "peer_left", "reason": "changed my mind"}
    await expect_close(researcher, aiohttp.WSCloseCode.OK)
    await expect_close(owner, aiohttp.WSCloseCode.OK)
    again = await connect(subprocess_server)
    await send_json(again, join(room))
    await expect_error(again, "unknown_room")


async def test_bad_state_messages_are_refused(subprocess_server: str, connect: Connect) -> None:
    lone = await connect(subprocess_server)
    await send_json(lone, signal("offer", "too early"))
    await expect_error(lone, "bad_state")

    room = new_room()
    owner = await connect(subprocess_server)
    await send_json(owner, create(room))
    await receive_json(owner)
    await send_json(owner, signal("offer", "nobody joined"))
    await expect_error(owner, "bad_state")
    await send_json(owner, create(new_room()))
    await expect_error(owner, "bad_state")

    researcher = await connect(subprocess_server)
    await send_json(researcher, join(room))
    await receive_json(researcher)
    await receive_json(owner)  # peer_joined
    await send_json(researcher, signal("answer", "before any offer"))
    await expect_error(researcher, "bad_state")
    await send_json(researcher, signal("offer", "researchers do not offer"))
    await expect_error(researcher, "bad_state")
    await send_json(owner, signal("answer", "owners do not answer"))
    await expect_error(owner, "bad_state")
    await send_json(owner, signal("offer", "the offer"))
    await send_json(owner, signal("offer", "a second offer"))
    await expect_error(owner, "bad_state")
    assert (await receive_json(researcher))["payload"] == "the offer"


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "{",
        "[1, 2]",
        '"a string"',
        "null",
        '{"no": "type"}',
        '{"type": "nope"}',
        '{"type": "create", "version": 1}',
        '{"type": "ping", "extra": 1}',
        '{"type": "signal", "kind": "renegotiate", "payload": ""}',
        "\x00\xff garbage",
    ],
)
async def test_garbage_text_is_malformed_and_connection_survives(
    subprocess_server: str, connect: Connect, frame: str
) -> None:
    ws = await connect(subprocess_server)
    await ws.send_str(frame)
    await expect_error(ws, "malformed")
    await expect_alive(ws)


async def test_binary_frame_is_malformed(subprocess_server: str, connect: Connect) -> None:
    ws = await connect(subprocess_server)
    await ws.send_bytes(json.dumps({"type": "ping"}).encode())
    await expect_error(ws, "malformed")
    await expect_alive(ws)


async def test_oversized_frames_are_refused_and_server_stays_up(
    make_server: MakeServer, connect: Connect
) -> None:
    url = await make_server(max_message_bytes=2048)
    owner, researcher, _ = await pair(connect, url)

    ws = await connect(url)
    await ws.send_str(json.dumps(signal("offer", "x" * 3000)))
    reply = await expect_error(ws, "too_large")
    assert "2048" in reply["message"]
    await expect_alive(ws)

    # Far beyond the limit aiohttp stops reading: the socket closes with 1009, nothing else.
    await ws.send_str("y" * 100_000)
    await expect_close(ws, aiohttp.WSCloseCode.MESSAGE_TOO_BIG)

    await send_json(owner, signal("offer", "unaffected"))
    assert (await receive_json(researcher))["payload"] == "unaffected"
    assert (await asyncio.to_thread(get_health, url))["status"] == "ok"


# -- abrupt disconnects (raw sockets, no close frame) -------------------------------------
class RawWebSocket:
    """A hand-rolled client, so a test can vanish mid-frame the way a crashed process does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str) -> RawWebSocket:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    @staticmethod
    def frame_header(length: int) -> bytes:
        assert length < 65536
        if length < 126:
            return bytes([0x81, 0x80 | length])
        return bytes([0x81, 0x80 | 126]) + struct.pack("!H", length)

    async def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.writer.write(self.frame_header(len(data)) + mask + masked)
        await self.writer.drain()

    async def receive(self) -> dict[str, Any]:
        first, second = await self.reader.readexactly(2)
        assert first == 0x81, first
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        body: dict[str, Any] = json.loads(await self.reader.readexactly(length))
        return body

    def abort(self, partial_frame: bool = False) -> None:
        """Drop the TCP connection with a reset, optionally in the middle of a frame."""
        if partial_frame:
            self.writer.write(self.frame_header(1000) + os.urandom(4) + b"half")
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


@pytest.mark.parametrize("partial_frame", [False, True])
async def test_owner_vanishing_mid_pairing_frees_the_room_and_tells_the_researcher(
    make_server: MakeServer, connect: Connect, partial_frame: bool
) -> None:
    url = await make_server()
    bystander_owner, bystander_researcher, _ = await pair(connect, url)

    room = new_room()
    raw_owner = await RawWebSocket.connect(url)
    await raw_owner.send(create(room))
    assert (await raw_owner.receive())["type"] == "created"
    researcher = await connect(url)
    await send_json(researcher, join(room))
    assert (await receive_json(researcher))["type"] == "joined"
    assert await raw_owner.receive() == {"type": "peer_joined"}

    raw_owner.abort(partial_frame)
    assert await receive_json(researcher) == {"type": "peer_left", "reason": "disconnected"}
    await expect_close(researcher, aiohttp.WSCloseCode.OK)

    await wait_for_health(url, rooms=1, connections=2)  # only the bystanders remain
    await send_json(bystander_owner, signal("offer", "still here"))
    assert (await receive_json(bystander_researcher))["payload"] == "still here"
    await send_json(bystander_researcher, signal("answer", "fine"))
    assert (await receive_json(bystander_owner))["payload"] == "fine"


async def test_researcher_vanishing_after_the_offer_tells_the_owner(
    make_server: MakeServer, connect: Connect
) -> None:
    url = await make_server()
    room = new_room()
    owner = await connect(url)
    await send_json(owner, create(room))
    await receive_json(owner)
    raw_researcher = await RawWebSocket.connect(url)
    await raw_researcher.send(join(room))
    assert (await raw_researcher.receive())["type"] == "joined"
    await receive_json(owner)  # peer_joined
    await send_json(owner, signal("offer", "sdp"))
    assert (await raw_researcher.receive())["payload"] == "sdp"

    raw_researcher.abort()
    assert await receive_json(owner) == {"type": "peer_left", "reason": "disconnected"}
    await wait_for_health(url, rooms=0, connections=0)


# -- limits --------------------------------------------------------------------------------
async def test_max_rooms(make_server: MakeServer, connect: Connect) -> None:
    url = await make_server(max_rooms=2)
    owners = []
    for _ in range(2):
        ws = await connect(url)
        await send_json(ws, create(new_room()))
        assert (await receive_json(ws))["type"] == "created"
        owners.append(ws)
    third = await connect(url)
    await send_json(third, create(new_room()))
    reply = await expect_error(third, "limit")
    assert "2" in reply["message"]

    await send_json(owners[0], {"type": "leave"})
    await expect_close(owners[0], aiohttp.WSCloseCode.OK)
    await send_json(third, create(new_room()))
    assert (await receive_json(third))["type"] == "created"


async def test_connections_per_address(make_server: MakeServer, connect: Connect) -> None:
    url = await make_server(max_connections_per_ip=2)
    first, second = await connect(url), await connect(url)
    refused = await connect(url)
    await expect_error(refused, "limit")
    await expect_close(refused, aiohttp.WSCloseCode.TRY_AGAIN_LATER)

    await first.close()
    await wait_for_health(url, connections=1)
    admitted = await connect(url)
    await expect_alive(admitted)
    await expect_alive(second)


async def test_idle_connection_is_closed_but_pinging_one_is_not(
    make_server: MakeServer, connect: Connect
) -> None:
    url = await make_server(idle_timeout=0.3)
    idle = await connect(url)
    busy = await connect(url)
    for _ in range(8):  # 0.8 s of pings every 0.1 s: well past the idle timeout
        await expect_alive(busy)
        await asyncio.sleep(0.1)
    await expect_error(idle, "idle_timeout")
    await expect_close(idle, aiohttp.WSCloseCode.POLICY_VIOLATION)
    await expect_alive(busy)


async def test_shutdown_tells_clients_going_away(connect: Connect) -> None:
    handle = await start_server(ServerConfig(host="127.0.0.1", port=0, shutdown_grace=5))
    owner = await connect(handle.url)
    await send_json(owner, create(new_room()))
    await receive_json(owner)
    stopping = asyncio.create_task(handle.stop())
    await expect_error(owner, "shutting_down")
    await expect_close(owner, aiohttp.WSCloseCode.GOING_AWAY)
    await stopping
    with pytest.raises(aiohttp.ClientConnectorError):
        await connect(handle.url)


# -- the store's tombstones ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("reason", "code"),
    [("used", "room_full"), ("closed", "unknown_room"), ("expired", "expired")],
)
async def test_store_answers_why_a_room_is_gone(reason: GoneReason, code: str) -> None:
    store = InMemoryRoomStore(max_rooms=10, tombstone_ttl=60)
    room = new_room()
    await store.create(room, ttl=60)
    assert await store.delete(room, reason)
    assert not await store.delete(room, "closed")  # the first reason sticks
    with pytest.raises(RoomError) as refused:
        await store.join(room)
    assert refused.value.code == code
    with pytest.raises(RoomError) as recreated:
        await store.create(room, ttl=60)
    assert recreated.value.code == "room_exists"
    assert await store.room_count() == 0


async def test_store_expires_rooms_on_access() -> None:
    store = InMemoryRoomStore(max_rooms=10, tombstone_ttl=60)
    room = new_room()
    await store.create(room, ttl=0.01)
    await asyncio.sleep(0.05)
    with pytest.raises(RoomError) as refused:
        await store.join(room)
    assert refused.value.code == "expired"
    assert await store.room_count() == 0


async def test_store_forgets_tombstones_after_their_ttl() -> None:
    store = InMemoryRoomStore(max_rooms=10, tombstone_ttl=0)
    room = new_room()
    await store.create(room, ttl=60)
    await store.delete(room, "used")
    with pytest.raises(RoomError) as refused:
        await store.join(room)
    assert refused.value.code == "unknown_room"


async def test_store_bounds_tombstones_by_count() -> None:
    store = InMemoryRoomStore(max_rooms=1, tombstone_ttl=3600)  # keeps at most 10 tombstones
    rooms = [new_room() for _ in range(11)]
    for room in rooms:
        await store.create(room, ttl=60)
        await store.delete(room, "used")
    codes = []
    for room in rooms[:2]:
        with pytest.raises(RoomError) as refused:
            await store.join(room)
        codes.append(refused.value.code)
    assert codes == ["unknown_room", "room_full"]
