"""Client of the duet signaling server: create or join a room and exchange one offer/answer.

The owner creates the room named by its join code's room id and waits for the researcher; the
researcher joins it; the owner sends the offer and receives the answer. The server relays and
never learns the secret (see :mod:`duet.codes`). Every failure, from a refused connection to the
peer leaving, surfaces as :class:`duet.errors.PairingError` whose message says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from pydantic import BaseModel, ValidationError

from signaling_server.config import DEFAULT_MAX_MESSAGE_BYTES
from signaling_server.messages import (
    MAX_REASON_CHARS,
    Create,
    Created,
    Error,
    Join,
    Joined,
    Leave,
    PeerJoined,
    PeerLeft,
    Ping,
    Pong,
    ServerMessage,
    Signal,
    server_message_adapter,
)

from .errors import PairingError

__all__ = ["DEFAULT_PORT", "SignalingClient", "normalize_server_url"]

DEFAULT_PORT = 8765
"""The port assumed for a bare ``host`` (the server's default port)."""

_SCHEMES = {"ws": "ws", "http": "ws", "wss": "wss", "https": "wss"}
_Role = Literal["owner", "researcher"]


def normalize_server_url(url: str) -> str:
    """The WebSocket URL (``ws(s)://host[:port]/.../ws``) for what a user typed as server."""
    if not isinstance(url, str) or not url.strip():
        raise PairingError("the signaling server URL is empty: pass e.g. server='host:8765'")
    text = url.strip()
    bare = "://" not in text
    parts = urlsplit(f"ws://{text}" if bare else text)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise PairingError(
            f"unsupported signaling server URL {url!r}: use http(s)://, ws(s):// or host:port"
        )
    try:
        port = parts.port
    except ValueError:
        raise PairingError(f"invalid port in signaling server URL {url!r}") from None
    host = parts.hostname
    if not host:
        raise PairingError(f"no host in signaling server URL {url!r}")
    if parts.username is not None or parts.fragment:
        raise PairingError(f"signaling server URL {url!r} must not carry credentials or #fragment")
    if bare and port is None:
        port = DEFAULT_PORT
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    path = parts.path.rstrip("/")
    if not path.endswith("/ws"):
        path = f"{path}/ws"
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def _server_refusal(url: str, error: Error) -> PairingError:
    advice = {
        "unknown_room": f"no room for this join code on {url}: check the code and that you use "
        "the same signaling server as the owner",
        "room_full": "this join code was already used: ask the owner for a new code",
        "expired": "the room expired: ask the owner for a new code",
        "room_exists": f"a room for this code already exists on {url}: generate a new code",
        "limit": f"the signaling server at {url} is at its limit: try again later",
        "idle_timeout": f"the signaling server at {url} closed the idle connection",
        "shutting_down": f"the signaling server at {url} is shutting down: retry once it is back",
        "unsupported_version": f"the signaling server at {url} speaks another protocol version: "
        "use matching versions of duet and duet-signaling",
    }.get(error.code, f"the signaling server at {url} refused a message ({error.code})")
    return PairingError(f"{advice} (server: {error.message})")


class SignalingClient:
    """One peer's connection to a room; build it with :meth:`create_room` or :meth:`join_room`."""

    def __init__(
        self,
        url: str,
        role: _Role,
        session: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
    ) -> None:
        self.url = url
        self.role: _Role = role
        self._session = session
        self._ws = ws
        self._inbox: asyncio.Queue[ServerMessage | PairingError] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self._pinger: asyncio.Task[None] | None = None
        self._failure: PairingError | None = None
        self._peer_joined = False
        self._in_room = False
        self._closed = False

    @classmethod
    async def create_room(cls, url: str, room_id: str, *, timeout: float = 10.0) -> SignalingClient:
        """Register ``room_id`` as its owner; returns once the server confirmed the room."""
        return await cls._open(url, "owner", room_id, timeout)

    @classmethod
    async def join_room(cls, url: str, room_id: str, *, timeout: float = 10.0) -> SignalingClient:
        """Take the researcher's seat in ``room_id``; the owner is told at once."""
        return await cls._open(url, "researcher", room_id, timeout)

    @classmethod
    async def _open(cls, url: str, role: _Role, room: str, timeout: float) -> SignalingClient:
        ws_url = normalize_server_url(url)
        try:
            request: Create | Join = Create(room=room) if role == "owner" else Join(room=room)
        except ValidationError:
            raise PairingError(f"malformed room id {room!r}: expected 32 hex digits") from None
        session = aiohttp.ClientSession()
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(ws_url, max_msg_size=2 * DEFAULT_MAX_MESSAGE_BYTES),
                timeout,
            )
        except (asyncio.TimeoutError, OSError, aiohttp.ClientError) as exc:
            await session.close()
            raise _connect_failure(ws_url, timeout, exc) from exc
        except BaseException:
            await session.close()
            raise
        client = cls(ws_url, role, session, ws)
        try:
            await client._send(request)
            reply = await client._next(timeout, "the room confirmation")
            if not isinstance(reply, (Created, Joined)):
                raise PairingError(
                    f"the signaling server at {ws_url} answered {reply.type!r} "
                    f"instead of confirming the room"
                )
        except BaseException:
            await client.close()
            raise
        client._in_room = True
        client._pinger = asyncio.create_task(client._ping_every(reply.idle_timeout / 3))
        return client

    async def wait_peer_joined(self, timeout: float | None = None) -> None:
        """Owner: return once the researcher has joined the room."""
        if self.role != "owner":
            raise PairingError("only the owner waits for a peer; the researcher joined already")
        while not self._peer_joined:
            message = await self._next(timeout, "the researcher to join")
            if not isinstance(message, PeerJoined):
                raise self._fail(self._unexpected(message, "peer_joined"))
            self._peer_joined = True

    async def send_signal(self, kind: Literal["offer", "answer"], payload: str) -> None:
        """Send the SDP envelope; the owner offers (once the researcher joined), the researcher
        answers."""
        expected = "offer" if self.role == "owner" else "answer"
        if kind != expected:
            raise PairingError(f"the {self.role} sends the {expected}, not the {kind}")
        try:
            signal = Signal(kind=kind, payload=payload)
        except ValidationError:
            raise PairingError(f"the {kind} is too large for the signaling server") from None
        if self.role == "owner":
            await self.wait_peer_joined()  # the server refuses an offer nobody can receive
        await self._send(signal)
        if kind == "answer":
            self._in_room = False  # the server deletes the room once it relayed the answer

    async def receive_signal(
        self, kind: Literal["offer", "answer"], timeout: float | None = None
    ) -> str:
        """Wait for the peer's SDP envelope: the researcher gets the offer, the owner the answer."""
        expected = "answer" if self.role == "owner" else "offer"
        if kind != expected:
            raise PairingError(f"the {self.role} receives the {expected}, not the {kind}")
        while True:
            message = await self._next(timeout, f"the {kind}")
            if isinstance(message, PeerJoined) and self.role == "owner":
                self._peer_joined = True
            elif isinstance(message, Signal) and message.kind == kind:
                if kind == "answer":
                    self._in_room = False
                return message.payload
            else:
                raise self._fail(self._unexpected(message, kind))

    async def close(self, reason: str = "") -> None:
        """Leave the room (telling the peer why) and close the connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pinger is not None:
            self._pinger.cancel()
        if self._in_room and not self._ws.closed:
            with contextlib.suppress(Exception):
                await self._ws.send_str(Leave(reason=reason[:MAX_REASON_CHARS]).model_dump_json())
        self._in_room = False
        with contextlib.suppress(Exception):
            await self._ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, *filter(None, [self._pinger]), return_exceptions=True)
        await self._session.close()

    # -- internals ------------------------------------------------------------------------
    async def _send(self, message: BaseModel) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise PairingError("this signaling connection is closed")
        try:
            await self._ws.send_str(message.model_dump_json())
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise self._fail(
                PairingError(f"lost the connection to the signaling server at {self.url}: {exc}")
            ) from exc

    async def _next(self, timeout: float | None, waiting_for: str) -> ServerMessage:
        """The next relayed message; a refusal, a departed peer or a lost socket raises."""
        if self._failure is not None:
            raise self._failure
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout)
        except asyncio.TimeoutError:
            raise PairingError(
                f"timed out after {timeout:g} s waiting for {waiting_for} (signaling server "
                f"{self.url})"
            ) from None
        if isinstance(item, PairingError):
            raise self._fail(item)
        if isinstance(item, Error):
            raise self._fail(_server_refusal(self.url, item))
        if isinstance(item, PeerLeft):
            peer = "researcher" if self.role == "owner" else "owner"
            why = f" ({item.reason})" if item.reason else ""
            advice = "start a new session" if self.role == "owner" else "ask for a new code"
            raise self._fail(
                PairingError(f"the {peer} left before pairing completed{why}: {advice}")
            )
        return item

    def _fail(self, error: PairingError) -> PairingError:
        """Remember the first terminal failure, so every later call reports the same cause."""
        self._in_room = False
        if self._failure is None:
            self._failure = error
        return self._failure

    def _unexpected(self, message: ServerMessage, wanted: str) -> PairingError:
        return PairingError(
            f"the signaling server at {self.url} sent {message.type!r} while {wanted!r} "
            "was expected: is it a compatible duet-signaling server?"
        )

    async def _read(self) -> None:
        """Move every server message into the inbox; end it with the reason the socket ended."""
        while True:
            msg = await self._ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    message = server_message_adapter.validate_json(msg.data)
                except ValidationError:
                    break
                if not isinstance(message, Pong):
                    self._inbox.put_nowait(message)
                continue
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            ):
                code = self._ws.close_code
                self._inbox.put_nowait(
                    PairingError(
                        f"the signaling server at {self.url} closed the connection (code {code})"
                    )
                )
                return
            if msg.type == aiohttp.WSMsgType.ERROR:
                self._inbox.put_nowait(
                    PairingError(
                        f"the connection to the signaling server at {self.url} failed: {msg.data}"
                    )
                )
                return
            break  # binary or anything else: not our protocol
        self._inbox.put_nowait(
            PairingError(
                f"the signaling server at {self.url} sent a malformed message: "
                "is it a duet-signaling server?"
            )
        )
        await self._ws.close()

    async def _ping_every(self, interval: float) -> None:
        """Keep a waiting connection inside the server's idle timeout."""
        while not self._ws.closed:
            await asyncio.sleep(interval)
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                await self._ws.send_str(Ping().model_dump_json())


def _connect_failure(url: str, timeout: float, exc: Exception) -> PairingError:
    """Turn a failed ``ws_connect`` into advice on what to check."""
    if isinstance(exc, asyncio.TimeoutError):
        return PairingError(f"no answer from the signaling server at {url} within {timeout:g} s")
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return PairingError(
            f"{url} is not a duet signaling server (HTTP {exc.status} instead of a WebSocket): "
            "check the URL"
        )
    return PairingError(
        f"cannot reach the signaling server at {url} ({exc}): is it running? "
        "Start one with `duet-signaling --host 0.0.0.0 --port 8765`, or check the URL"
    )
