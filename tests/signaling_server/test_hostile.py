"""A hostile client against real ``duet-signaling`` processes: each test is an attack that used
to cost the server (or everyone else on it) something, and the limit that now stops it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
import struct
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from signaling_server.messages import PROTOCOL_VERSION
from signaling_server.redis_store import RedisRoomStore
from tests.helpers.redis import RedisServer, redis_server
from tests.helpers.signaling import (
    get_health,
    receive_json,
    send_json,
    signaling_server_process,
)

from .conftest import Connect


def create(room: str) -> dict[str, Any]:
    return {"type": "create", "version": PROTOCOL_VERSION, "room": room}


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame (clients must mask); payloads here stay under 64 KiB."""
    mask = os.urandom(4)
    length = len(payload)
    head = bytes([0x80 | opcode])
    head += bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + struct.pack(
        "!H", length)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def upgraded_socket(port: int, receive_buffer: int | None = None) -> socket.socket:
    """A blocking socket that completed the WebSocket handshake at ``/ws``."""
    sock = socket.socket()
    if receive_buffer is not None:  # before connect, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def fill_until_blocked(sock: socket.socket, frame: bytes) -> int:
    """Send ``frame`` again and again without reading any reply, until the server's replies
    fill every buffer between us and the server stops reading from us."""
    sock.setblocking(False)
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            sent += sock.send(frame)
    assert sent > 0
    return sent


def closed_by_server(sock: socket.socket, timeout: float = 20.0) -> bool:
    """Whether the server ends the connection within ``timeout`` (EOF or reset); unread data
    from the server is skipped."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset: the server aborted
        pass
    return True


async def wait_for_connections(url: str, count: int) -> None:
    """Poll /healthz until it reports ``count`` open WebSockets (generous: a liveness check)."""
    for _ in range(400):
        if (await asyncio.to_thread(get_health, url))["connections"] == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server still holds {get_health(url)['connections']} sockets")


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def redis_command(redis: RedisServer, *args: str) -> bytes:
    request = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
        sock.sendall(request.encode())
        return sock.recv(65536)


# -- connections that never finish the handshake ------------------------------------------
async def test_half_open_tcp_connections_are_capped_per_address() -> None:
    """Sockets that send half a request head used to be unlimited (the per-address limit only
    counted finished WebSocket handshakes), so one address could exhaust the descriptors."""
    with signaling_server_process(max_connections_per_ip=2) as server:
        held = []
        for _ in range(4):  # twice the WebSocket limit: the headroom for refusals
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(sock)
        one_more = socket.create_connection(("127.0.0.1", server.port))
        one_more.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert closed_by_server(one_more)
        one_more.close()
        for sock in held:
            sock.close()
        # The count is released with the sockets: a real client gets in again.
        for _ in range(400):
            try:
                sock = upgraded_socket(server.port)
                break
            except (AssertionError, OSError):
                await asyncio.sleep(0.05)
        sock.sendall(masked_frame(b'{"type": "ping"}'))
        assert b"pong" in sock.recv(100)
        sock.close()
        assert any(e.get("reason") == "per-ip tcp limit" for e in server.log_events())


async def test_silent_and_slow_request_heads_are_dropped_after_the_idle_timeout() -> None:
    """aiohttp keeps a connection that has not sent a whole request for its keep-alive timeout,
    an hour by default, however slowly it trickles bytes (slowloris)."""
    with signaling_server_process(idle_timeout=0.5) as server:
        silent = socket.create_connection(("127.0.0.1", server.port))
        trickling = socket.create_connection(("127.0.0.1", server.port))
        trickling.sendall(b"GET /ws HTTP/1.1\r\n")
        keep_alive = socket.create_connection(("127.0.0.1", server.port))
        keep_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert keep_alive.recv(12) == b"HTTP/1.1 200"
        for sock in (silent, trickling, keep_alive):
            assert closed_by_server(sock)
            sock.close()


# -- clients that send but never read ------------------------------------------------------
@pytest.mark.parametrize(
    "frame",
    [
        masked_frame(b'{"type": "create", "version": 1, "room": "not-hex"}'),  # error replies
        masked_frame(b"p" * 125, opcode=0x9),  # WebSocket pings: aiohttp's autoping pongs
    ],
    ids=["requests", "ping-frames"],
)
async def test_a_client_that_never_reads_is_dropped(frame: bytes) -> None:
    """Replies to a client that does not read fill the socket; the server's write then waited
    forever, and with it the reader loop, so the connection outlived the idle timeout."""
    with signaling_server_process(idle_timeout=0.5) as server:
        sock = upgraded_socket(server.port, receive_buffer=4096)
        fill_until_blocked(sock, frame)
        await wait_for_connections(server.url, 0)
        assert closed_by_server(sock)
        sock.close()
        assert any(e["event"] == "write_timeout" for e in server.log_events())


# -- one connection, one room --------------------------------------------------------------
async def test_a_connection_cannot_open_a_second_room_while_its_first_ends(
    redis: RedisServer, connect: Connect
) -> None:
    """Creates queued behind a room's end used to open a second room on the same socket: the
    first room's forwarder was then never cancelled and polled Redis forever on a pooled
    connection. The flood makes the race likely; once fixed, no second room is ever opened."""
    with signaling_server_process(store=redis.url, room_ttl=0.5) as server:

        async def owner() -> None:
            ws = await connect(server.url)
            await send_json(ws, create(secrets.token_hex(16)))
            assert (await receive_json(ws))["type"] == "created"

            async def flood() -> None:
                while not ws.closed:
                    await send_json(ws, create(secrets.token_hex(16)))
                    await asyncio.sleep(0)

            flooding = asyncio.create_task(flood())
            while (await ws.receive(timeout=30)).type == aiohttp.WSMsgType.TEXT:
                pass
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await flooding

        await asyncio.gather(*(owner() for _ in range(10)))
        await wait_for_connections(server.url, 0)
        created = [e for e in server.log_events() if e["event"] == "room_created"]
        assert len(created) == 10


async def test_a_connection_used_for_a_room_refuses_another(
    redis: RedisServer, connect: Connect
) -> None:
    """The rule itself, deterministically: a refused create leaves the socket free to try a new
    code, but a socket that entered a room never enters a second one."""
    with signaling_server_process(store=redis.url) as server:
        taken = secrets.token_hex(16)
        first = await connect(server.url)
        await send_json(first, create(taken))
        assert (await receive_json(first))["type"] == "created"
        ws = await connect(server.url)
        await send_json(ws, create(taken))
        assert (await receive_json(ws))["code"] == "room_exists"
        await send_json(ws, create(secrets.token_hex(16)))
        assert (await receive_json(ws))["type"] == "created"
        await send_json(ws, create(secrets.token_hex(16)))
        reply = await receive_json(ws)
        assert reply["code"] == "bad_state"


# -- Redis: bounded tombstones, cancellable mailboxes --------------------------------------
async def test_tombstones_in_redis_are_bounded_like_in_memory(
    redis: RedisServer, connect: Connect
) -> None:
    """Each deleted room leaves a tombstone for tombstone_ttl (an hour): creating and leaving
    rooms in a loop grew Redis by a key per room without bound. Now at most 10 per max_rooms
    are kept, the newest."""
    redis_command(redis, "FLUSHALL")
    with signaling_server_process(store=redis.url, max_rooms=2) as server:
        rooms = [secrets.token_hex(16) for _ in range(60)]
        for room in rooms:
            ws = await connect(server.url)
            await send_json(ws, create(room))
            assert (await receive_json(ws))["type"] == "created"
            await send_json(ws, {"type": "leave"})
            assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
        await wait_for_connections(server.url, 0)
        tombstones = redis_command(redis, "KEYS", "duet:gone:*").count(b"duet:gone:")
        assert tombstones == 20
        # The newest are the ones kept: a late join to the last room still hears why.
        late = await connect(server.url)
        await send_json(late, {"type": "join", "version": PROTOCOL_VERSION, "room": rooms[-1]})
        reply = await receive_json(late)
        assert reply["code"] == "unknown_room" and "closed by its owner" in reply["message"]
        assert int(redis_command(redis, "DBSIZE")[1:-2]) <= 22  # tombstones, graves, rooms


async def test_a_cancelled_redis_mailbox_read_always_ends(redis: RedisServer) -> None:
    """redis-py can swallow a cancellation that lands while a blocking pop is connecting; the
    mailbox then polled forever, and a peer's cleanup (which cancels and awaits it) never
    finished. Cancel at every point of the first few loop turns: each read must end."""
    store = RedisRoomStore(redis.url, max_rooms=10, tombstone_ttl=10)
    try:
        mailbox = await store.create(secrets.token_hex(16), 60)
        for turns in range(25):
            reading = asyncio.create_task(mailbox.get())
            for _ in range(turns):
                await asyncio.sleep(0)
            reading.cancel()
            done, _ = await asyncio.wait([reading], timeout=10)
            assert done, f"a read cancelled after {turns} loop turns never ended"
            assert reading.cancelled(), reading
    finally:
        await store.close()


async def test_relayed_messages_are_unaffected(redis: RedisServer, connect: Connect) -> None:
    """The guards above leave a normal pairing alone, pings (JSON and WebSocket) included."""
    with signaling_server_process(store=redis.url) as server:
        room = secrets.token_hex(16)
        owner = await connect(server.url)
        await send_json(owner, create(room))
        assert (await receive_json(owner))["type"] == "created"
        await owner.ping(b"still here")
        researcher = await connect(server.url)
        await send_json(researcher, {"type": "join", "version": PROTOCOL_VERSION, "room": room})
        assert (await receive_json(researcher))["type"] == "joined"
        assert await receive_json(owner) == {"type": "peer_joined"}
        await send_json(owner, {"type": "signal", "kind": "offer", "payload": "o" * 60_000})
        assert (await receive_json(researcher))["payload"] == "o" * 60_000
        await send_json(researcher, {"type": "signal", "kind": "answer", "payload": "a"})
        assert json.loads((await owner.receive(timeout=10)).data)["payload"] == "a"
