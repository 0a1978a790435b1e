"""The aiohttp application: ``GET /healthz`` and the pairing WebSocket at ``GET /ws``.

Each WebSocket is served by one :class:`_Connection`: its reader loop validates what the
client sends and acts on it, and a forwarder task copies what the other peer published to the
room's mailbox (see :mod:`signaling_server.store`) onto the socket. Keeping the peers apart
behind the store is what lets a shared store serve several replicas later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import BaseModel, ValidationError

from .config import ServerConfig
from .messages import (
    PROTOCOL_VERSION,
    Create,
    Created,
    Error,
    ErrorCode,
    Join,
    Joined,
    Leave,
    PeerJoined,
    PeerLeft,
    Ping,
    Pong,
    Signal,
    client_message_adapter,
    server_message_adapter,
)
from .store import InMemoryRoomStore, Mailbox, Role, RoomError, RoomStore

__all__ = ["ServerHandle", "create_app", "log_event", "server_version", "start_server"]

logger = logging.getLogger("signaling_server")

# Frames up to this multiple of the limit are read and answered with error too_large; beyond
# it aiohttp drops the connection (close code 1009) without buffering the rest.
_OVERSIZE_READ_FACTOR = 2
_MAX_ERROR_DETAIL = 200
# TCP connections one address may hold, in multiples of max_connections_per_ip: the headroom
# lets a client over the WebSocket limit still hear why (error limit) and health checks in.
_TCP_PER_IP_FACTOR = 2


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event; the CLI's formatter renders ``fields`` as JSON keys."""
    logger.log(level, event, extra={"fields": fields})


def server_version() -> str:
    try:
        return metadata.version("duet-notebook")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "unknown"


def _short(room: str) -> str:
    """Enough of a room id to correlate log lines, not enough to target the room."""
    return room[:8]


@dataclass
class _ServerState:
    config: ServerConfig
    store: RoomStore
    started: float = field(default_factory=time.monotonic)
    connections: set[_Connection] = field(default_factory=set)
    per_ip: Counter[str] = field(default_factory=Counter)


_STATE = web.AppKey("duet_signaling_state", _ServerState)


class _Connection:
    """One client WebSocket and its place (role, room) in the pairing flow."""

    def __init__(
        self, state: _ServerState, ws: web.WebSocketResponse, transport: asyncio.Transport
    ) -> None:
        self.state = state
        self.ws = ws
        # Kept to abort a client that stops reading: closing politely would wait on it forever.
        self.transport = transport
        self.room: str | None = None
        self.role: Role | None = None
        self.peer_joined = False  # owner: the researcher is in the room
        self.offer_sent = False  # owner
        self.offer_received = False  # researcher
        self.mailbox: Mailbox | None = None
        self.forwarder: asyncio.Task[None] | None = None
        self.expiry: asyncio.Task[None] | None = None
        # The task that ended the room and is closing the socket: cleanup lets it finish the
        # close handshake instead of cancelling it half way.
        self.closer: asyncio.Task[Any] | None = None

    @property
    def other_role(self) -> Role:
        return "researcher" if self.role == "owner" else "owner"

    async def _write(self, write: Awaitable[Any]) -> None:
        """Run one write to the client, or drop the client if it does not read it in time.

        A client that sends but never reads fills the socket's buffers, and a write then waits
        for it forever: the reader loop (and with it the idle timeout) would hang behind it and
        the connection would outlive every limit. Such a client gets ``idle_timeout`` seconds,
        then its TCP connection is aborted; nothing further is written to it.
        """
        try:
            await asyncio.wait_for(write, self.state.config.idle_timeout)
        except asyncio.TimeoutError:
            log_event("write_timeout", logging.WARNING, role=self.role)
            self.transport.abort()
        except ConnectionResetError:
            pass  # a vanished client is noticed (and cleaned up) by the reader loop

    async def send(self, message: BaseModel) -> None:
        if not self.ws.closed and not self.transport.is_closing():
            await self._write(self.ws.send_str(message.model_dump_json()))

    async def close(self, code: int = WSCloseCode.OK, message: bytes = b"") -> None:
        """Start the close handshake; it too must not wait on a client that does not read."""
        if not self.transport.is_closing():
            await self._write(self.ws.close(code=code, message=message))

    async def fail(self, exc: RoomError) -> None:
        """The store failed under us: tell the client why, and end the connection."""
        log_event("store_error", logging.WARNING, code=exc.code, detail=exc.message)
        self.room = None  # nothing left to clean up in a store we cannot reach
        await self.error(exc.code, exc.message)
        await self.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"store unavailable")

    async def error(self, code: ErrorCode, message: str) -> None:
        log_event("client_error", logging.DEBUG, code=code, detail=message, role=self.role)
        await self.send(Error(code=code, message=message))

    async def run(self) -> None:
        config = self.state.config
        try:
            while not self.ws.closed and not self.transport.is_closing():
                try:
                    # The deadline covers all of receive(), not just the wait for a frame:
                    # aiohttp also writes inside it (the close reply to a client's close or to a
                    # protocol error), and a client that does not read would hold that forever.
                    msg = await asyncio.wait_for(self.ws.receive(), config.idle_timeout)
                except asyncio.TimeoutError:
                    if self.ws.closed:  # stuck writing the close reply: the client does not read
                        self.transport.abort()
                        break
                    await self.error(
                        "idle_timeout", f"no message for {config.idle_timeout:g} s; send ping"
                    )
                    await self.close(code=WSCloseCode.POLICY_VIOLATION, message=b"idle")
                    break
                if msg.type == WSMsgType.PING:
                    # Answered here rather than by aiohttp's autoping, so the pong is a write
                    # with a deadline like any other.
                    await self._write(self.ws.pong(msg.data))
                elif msg.type == WSMsgType.PONG:
                    pass
                elif msg.type == WSMsgType.TEXT:
                    try:
                        await self.handle_text(msg.data)
                    except RoomError as exc:  # the shared store is unreachable
                        await self.fail(exc)
                        break
                elif msg.type == WSMsgType.BINARY:
                    await self.error("malformed", "binary frames are not accepted; send JSON text")
                else:  # close, closing, closed or a protocol error aiohttp already answered
                    if msg.type == WSMsgType.ERROR:
                        log_event("ws_error", logging.WARNING, detail=str(msg.data)[:100])
                    break
        finally:
            await self.cleanup()

    async def handle_text(self, data: str) -> None:
        limit = self.state.config.max_message_bytes
        if len(data) > limit or len(data.encode()) > limit:
            await self.error("too_large", f"messages are limited to {limit} bytes")
            return
        try:
            raw = json.loads(data)
        except ValueError:
            await self.error("malformed", "not JSON")
            return
        if not isinstance(raw, dict):
            await self.error("malformed", "a message is a JSON object")
            return
        if raw.get("type") in ("create", "join") and raw.get("version") != PROTOCOL_VERSION:
            await self.error(
                "unsupported_version", f"this server speaks protocol version {PROTOCOL_VERSION}"
            )
            return
        try:
            message = client_message_adapter.validate_python(raw)
        except ValidationError as exc:
            first = exc.errors(include_input=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "message"
            await self.error("malformed", f"{where}: {first['msg']}"[:_MAX_ERROR_DETAIL])
            return
        if isinstance(message, Ping):
            await self.send(Pong())
        elif isinstance(message, Create):
            await self.create(message.room)
        elif isinstance(message, Join):
            await self.join(message.room)
        elif isinstance(message, Signal):
            await self.signal(message)
        elif isinstance(message, Leave):
            await self.leave(message.reason)

    async def _enter(self, room: str, role: Role) -> bool:
        if self.role is not None:
            # One room per connection, ever. Once a room ends (expired, left, paired) the socket
            # is closing, but messages the client queued are still read until the close starts;
            # a second room entered then would leave the first room's forwarder and expiry
            # running forever (with the Redis store, each holding a pooled Redis connection).
            await self.error("bad_state", "this connection was already used for a room; "
                             "open a new connection")
            return False
        store = self.state.store
        try:
            if role == "owner":
                mailbox = await store.create(room, self.state.config.room_ttl)
            else:
                mailbox = await store.join(room)
        except RoomError as exc:
            log_event(
                f"{'create' if role == 'owner' else 'join'}_refused",
                room=_short(room),
                code=exc.code,
            )
            await self.error(exc.code, exc.message)
            return False
        self.room, self.role, self.mailbox = room, role, mailbox
        return True

    async def create(self, room: str) -> None:
        if self.room is not None:
            await self.error("bad_state", "this connection is already in a room")
            return
        if not await self._enter(room, "owner"):
            return
        config = self.state.config
        await self.send(Created(room=room, ttl=config.room_ttl, idle_timeout=config.idle_timeout))
        self.forwarder = asyncio.create_task(self.forward())
        self.expiry = asyncio.create_task(self.expire_after(config.room_ttl))
        log_event("room_created", room=_short(room))

    async def join(self, room: str) -> None:
        if self.room is not None:
            await self.error("bad_state", "this connection is already in a room")
            return
        if not await self._enter(room, "researcher"):
            return
        await self.state.store.publish(room, "owner", PeerJoined().model_dump_json())
        await self.send(Joined(room=room, idle_timeout=self.state.config.idle_timeout))
        self.forwarder = asyncio.create_task(self.forward())
        assert self.mailbox is not None
        self.expiry = asyncio.create_task(self.expire_after(self.mailbox.expires_in))
        log_event("room_joined", room=_short(room))

    async def signal(self, message: Signal) -> None:
        room = self.room
        if room is None:
            await self.error("bad_state", "create or join a room before signaling")
        elif self.role == "owner":
            if message.kind != "offer":
                await self.error("bad_state", "the owner sends the offer; the researcher answers")
            elif not self.peer_joined:
                await self.error("bad_state", "no researcher has joined yet; wait for peer_joined")
            elif self.offer_sent:
                await self.error("bad_state", "the offer was already sent")
            else:
                self.offer_sent = True
                await self.state.store.publish(room, "researcher", message.model_dump_json())
        elif message.kind != "answer":
            await self.error("bad_state", "the researcher answers; the owner sends the offer")
        elif not self.offer_received:
            await self.error("bad_state", "no offer received yet")
        else:
            await self.state.store.publish(room, "owner", message.model_dump_json())
            self.room = None
            if await self.state.store.delete(room, "used"):
                log_event("room_paired", room=_short(room))
            await self.close(message=b"paired")

    async def leave(self, reason: str) -> None:
        await self.abandon_room(reason or "left", event="room_left")
        await self.close(message=b"left")

    async def abandon_room(self, reason: str, event: str) -> None:
        """Delete our room (if still open) and tell the other peer why."""
        room = self.room
        if room is None:
            return
        self.room = None
        if await self.state.store.delete(room, "closed"):
            await self.state.store.publish(
                room, self.other_role, PeerLeft(reason=reason).model_dump_json()
            )
            log_event(event, room=_short(room), role=self.role, reason=reason)

    async def forward(self) -> None:
        """Copy the other peer's messages to our socket; end after the room's last one."""
        assert self.mailbox is not None
        while True:
            try:
                text = await self.mailbox.get()
            except RoomError as exc:
                self.closer = asyncio.current_task()
                await self.fail(exc)
                return
            message = server_message_adapter.validate_json(text)
            final = isinstance(message, (PeerLeft, Error))
            if isinstance(message, PeerJoined):
                self.peer_joined = True
            elif isinstance(message, Signal):
                self.offer_received = self.offer_received or message.kind == "offer"
                final = message.kind == "answer"
            if final:
                self.room = None  # the sender already deleted it
                self.closer = asyncio.current_task()
            await self.send(message)
            if final:
                await self.close(message=b"done")
                return

    async def expire_after(self, delay: float) -> None:
        """At the room's deadline, delete it and tell both peers.

        Both peers' connections run this, perhaps on different replicas: the first to delete
        the room tells the other, which finds it gone and leaves the telling to its forwarder.
        """
        await asyncio.sleep(max(delay, 0.0))
        room = self.room
        if room is None or not await self.state.store.delete(room, "expired"):
            return
        self.room = None
        self.closer = asyncio.current_task()
        log_event("room_expired", room=_short(room), role=self.role)
        ttl = self.state.config.room_ttl
        expired = Error(code="expired", message=f"the room expired after {ttl:g} s")
        await self.state.store.publish(room, self.other_role, expired.model_dump_json())
        await self.send(expired)
        await self.close(message=b"expired")

    async def cleanup(self) -> None:
        for task in (self.expiry, self.forwarder):
            if task is not None:
                if task is not self.closer:
                    task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.abandon_room("disconnected", event="peer_disconnected")
        if self.mailbox is not None:
            await self.mailbox.close()
        if not self.ws.closed:
            await self.close()
        if self.transport.get_write_buffer_size():
            # The close handshake finished or gave up with data still unsent: the client stopped
            # reading, and a transport closed politely would wait for it forever.
            self.transport.abort()

    async def shut_down(self) -> None:
        await self.error("shutting_down", "the signaling server is shutting down")
        await self.close(code=WSCloseCode.GOING_AWAY, message=b"shutting down")


async def _healthz(request: web.Request) -> web.Response:
    """200 with the server's state; 503 while the room store does not answer."""
    state = request.app[_STATE]
    config = state.config
    healthy = await state.store.healthy()
    rooms: int | None = None
    if healthy:
        try:
            rooms = await state.store.room_count()
        except RoomError:
            healthy = False
    return web.json_response(
        {
            "status": "ok" if healthy else "unavailable",
            "version": server_version(),
            "protocol": PROTOCOL_VERSION,
            "store": {"kind": state.store.kind, "healthy": healthy},
            "rooms": rooms,
            "connections": len(state.connections),
            "uptime": round(time.monotonic() - state.started, 3),
            "limits": {
                "max_message_bytes": config.max_message_bytes,
                "room_ttl": config.room_ttl,
                "max_rooms": config.max_rooms,
                "max_connections_per_ip": config.max_connections_per_ip,
                "idle_timeout": config.idle_timeout,
            },
        },
        status=200 if healthy else 503,
    )


async def _websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    config = state.config
    ws = web.WebSocketResponse(
        max_msg_size=_OVERSIZE_READ_FACTOR * config.max_message_bytes,
        compress=False,
        autoping=False,  # _Connection.run answers pings itself, under its write deadline
    )
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(text="this endpoint speaks WebSocket only\n")
    ip = request.remote or "unknown"
    if state.per_ip[ip] >= config.max_connections_per_ip:
        await ws.prepare(request)
        log_event("connection_refused", logging.WARNING, ip=ip, reason="per-ip limit")
        await ws.send_str(
            Error(
                code="limit",
                message=f"at most {config.max_connections_per_ip} connections per address",
            ).model_dump_json()
        )
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"limit")
        return ws
    transport = request.transport
    if transport is None:  # the client is already gone
        return ws
    # Count the address before the handshake yields, so concurrent handshakes see it.
    state.per_ip[ip] += 1
    connection = _Connection(state, ws, transport)
    try:
        await ws.prepare(request)
        state.connections.add(connection)
        await connection.run()
    finally:
        state.connections.discard(connection)
        state.per_ip[ip] -= 1
        if not state.per_ip[ip]:
            del state.per_ip[ip]
    return ws


async def _close_connections(app: web.Application) -> None:
    """On shutdown, tell every client why its socket closes (going away, shutting_down)."""
    state = app[_STATE]
    log_event("shutting_down", connections=len(state.connections))
    closing = [asyncio.create_task(c.shut_down()) for c in list(state.connections)]
    if closing:
        _, late = await asyncio.wait(closing, timeout=state.config.shutdown_grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)


def create_app(
    config: ServerConfig | None = None, store: RoomStore | None = None
) -> web.Application:
    """Build the application; ``store`` defaults to an in-memory store sized by ``config``."""
    config = config or ServerConfig()
    if store is None:
        store = _store_for(config)
    app = web.Application()
    app[_STATE] = _ServerState(config=config, store=store)

    async def close_store(app: web.Application) -> None:
        await app[_STATE].store.close()

    app.on_cleanup.append(close_store)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/ws", _websocket)
    app.on_shutdown.append(_close_connections)
    return app


def _store_for(config: ServerConfig) -> RoomStore:
    if config.store == "memory":
        return InMemoryRoomStore(max_rooms=config.max_rooms, tombstone_ttl=config.tombstone_ttl)
    from .redis_store import RedisRoomStore  # redis-py only where a shared store is used

    return RedisRoomStore(config.store, max_rooms=config.max_rooms,
                          tombstone_ttl=config.tombstone_ttl)


class _CountedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one TCP connection, counted against its client address.

    The WebSocket handler's per-address limit only sees connections that finished an HTTP
    request; sockets that connect and send nothing (or half a request head, slowloris style)
    would otherwise be unlimited and pin a file descriptor each until the keep-alive timeout,
    so one address could exhaust the process's descriptors. Over the limit, the connection is
    dropped at accept.
    """

    def __init__(self, inner: asyncio.Protocol, counts: Counter[str], limit: int) -> None:
        self._inner = inner
        self._counts = counts
        self._limit = limit
        self._ip: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if self._counts[ip] >= self._limit:
            log_event("connection_refused", logging.WARNING, ip=ip, reason="per-ip tcp limit")
            assert isinstance(transport, asyncio.Transport)
            transport.abort()
            return
        self._ip = ip
        self._counts[ip] += 1
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ip is None:  # refused in connection_made: aiohttp never saw it
            return
        self._counts[self._ip] -= 1
        if not self._counts[self._ip]:
            del self._counts[self._ip]
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._ip is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._ip is not None else None

    def pause_writing(self) -> None:
        if self._ip is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._ip is not None:
            self._inner.resume_writing()


class ServerHandle:
    """A server running on the current event loop (embedded use, tests); ``stop()`` ends it."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        listener: asyncio.AbstractServer | None = None,
    ) -> None:
        self._runner = runner
        self._listener = listener
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # stop accepting; the runner then closes open connections
        await self._runner.cleanup()
        log_event("server_stopped")


async def start_server(config: ServerConfig | None = None) -> ServerHandle:
    """Listen on ``config.host``/``config.port`` (port 0: a free one) and return at once."""
    config = config or ServerConfig()
    runner = web.AppRunner(
        create_app(config),
        access_log=None,
        shutdown_timeout=config.shutdown_grace,
        # aiohttp keeps a connection that has not sent a whole request (or sits idle between
        # keep-alive requests) for an hour by default; give it no longer than an idle socket.
        keepalive_timeout=config.idle_timeout,
    )
    await runner.setup()
    http = runner.server
    assert http is not None
    counts: Counter[str] = Counter()
    limit = _TCP_PER_IP_FACTOR * config.max_connections_per_ip
    try:
        # Listening ourselves (rather than web.TCPSite) lets every accepted socket be counted.
        listener = await asyncio.get_running_loop().create_server(
            lambda: _CountedProtocol(http(), counts, limit), config.host, config.port,
            backlog=128,
        )
    except BaseException:
        await runner.cleanup()
        raise
    port = int(listener.sockets[0].getsockname()[1])
    log_event(
        "server_started",
        host=config.host,
        port=port,
        version=server_version(),
        protocol=PROTOCOL_VERSION,
    )
    return ServerHandle(runner, config.host, port, listener)
