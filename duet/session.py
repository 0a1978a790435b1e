"""What both ends of a duet share: loop thread, sending, hello, heartbeat, lifecycle.

Each session owns a private event loop thread (``LoopThread``) on which the transport and
the protocol run; public methods are synchronous and hand work to it, so this works the same
in a script, IPython and ipykernel. The roles live in ``owner.py`` and ``researcher.py``.

Sending has one path, ``_send``: callable from any thread, it puts the message on one of two
ordered lanes, each drained by its own task. The *main* lane carries everything in the order
it was sent; the *urgent* lane carries pings, pongs, error notices and bye, so liveness is
never stuck behind a 256 MiB transfer (the transport interleaves the two lanes' streams).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel

from . import protocol as p
from .config import SessionConfig
from .errors import ConnectionLost, DuetError, PairingError, ProtocolError
from .loop import LoopThread
from .transport import Progress, Transport

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Encoded", "Liveness", "Session"]

log = logging.getLogger(__name__)
SOFTWARE = "duet 0.1"
Encoded = tuple[bytes, list[memoryview]]  # a message after protocol.encode
_Outgoing = tuple[Encoded, "asyncio.Future[None] | None"]


class Liveness:
    """Whether the peer has been silent for too long, judged at each beat of this loop.

    A beat that comes much later than due means this loop itself was held up (decoding a
    flood of 60,000-op batches on a busy machine, say): the peer's frames are still waiting,
    unread, behind it, so its silence proves nothing, and it gets the whole timeout again."""

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        self.interval, self.timeout = interval, timeout
        self._beat = self._excused = now

    def silence(self, now: float, last_heard: float) -> float | None:
        """Seconds the peer has been silent, when more than the timeout; else None."""
        if now - self._beat > 2 * self.interval + 1.0:
            self._excused = now
        self._beat = now
        idle = now - max(last_heard, self._excused)
        return idle if idle > self.timeout else None


class Session:
    """The loop thread, the transport, the hello handshake, heartbeat and lifecycle."""

    role: ClassVar[Literal["owner", "researcher"]]
    peer_role: ClassVar[Literal["owner", "researcher"]]
    _ready_on_hello: ClassVar[bool] = True
    # The most values a message from the peer may hold (``protocol.MAX_VALUES``); None: any.
    _max_values: ClassVar[int | None] = None

    def __init__(self, config: SessionConfig | None = None) -> None:
        self.config = config or SessionConfig()
        self.session_id = secrets.token_hex(8)
        self._loop = LoopThread(name=f"duet-{self.role}-{self.session_id[:6]}",
                                switch_interval=self.config.switch_interval)
        self._transport: Transport | None = None
        self._ready = threading.Event()  # hello exchanged
        self._lost = threading.Event()  # transport gone (or never came)
        self._failure: BaseException | None = None  # why pairing or the connection ended
        self._closed = False
        self._peer_hello: p.Hello | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lanes: dict[bool, asyncio.Queue[_Outgoing]] = {}
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._nonces = itertools.count(1)

    # -- public -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    @property
    def connected(self) -> bool:
        """True while the peer is there; turns False promptly when it leaves or the channel dies."""
        return self._ready.is_set() and not self._lost.is_set() and not self._closed

    def close(self) -> None:
        """Leave the duet and release everything; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._before_close()
        if self._loop.running:
            try:
                self._loop.run(self._shutdown("the peer closed the session"), timeout=10)
            except (TimeoutError, RuntimeError, DuetError):
                log.debug("shutdown did not complete cleanly", exc_info=True)
            self._loop.stop()
        self._on_closed()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self._loop.stop(timeout=0)
            except Exception:
                pass

    def ping(self, timeout: float = 10.0) -> float:
        """Round trip to the peer's loop in seconds (not through the owner's worker)."""
        self._require_connected()
        return self._loop.run(self._ping(), timeout=timeout)

    # -- wiring ---------------------------------------------------------------------------
    def start(self, connect: Callable[[], Awaitable[Transport]]) -> None:
        """Connect in the background: ``connect`` makes the transport (WebRTC pairing in
        ``launch``/``join``, an in-memory pair in tests); failures end up in ``_failure``."""

        async def run() -> None:
            try:
                transport = await connect()
                await self._attach(transport)
            except BaseException as exc:
                self._fail(exc if isinstance(exc, DuetError) else PairingError(
                    f"pairing failed: {type(exc).__name__}: {exc}"))
                raise

        self._loop.submit(run())

    async def _attach(self, transport: Transport) -> None:
        self._transport = transport
        self._lanes = {False: asyncio.Queue(), True: asyncio.Queue()}
        self._tasks = [asyncio.create_task(self._drain(urgent)) for urgent in (False, True)]
        # Our hello goes first on the main lane, before handlers deliver what came early
        # (the peer's hello, whose answer must follow ours).
        self._send(p.Hello(version=p.PROTOCOL_VERSION, role=self.role, software=SOFTWARE,
                           allowlist=self._hello_allowlist()))
        transport.set_handlers(self._on_frame_message, self._on_transport_closed,
                               on_error=self._protocol_error, progress=self._progress(),
                               progress_threshold=self.config.progress_threshold)
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))

    def _hello_allowlist(self) -> p.AllowlistSummary | None:
        return None

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._lost.set()
        self._ready.set()  # wake anyone waiting for the handshake

    async def _shutdown(self, reason: str) -> None:
        transport = self._transport
        if transport is not None and not transport.closed:
            try:
                await asyncio.wait_for(self._send_and_wait(p.Bye(reason=reason)), 2)
            except (DuetError, asyncio.TimeoutError) as exc:
                log.debug("%s: bye not sent: %r", self.role, exc)
            await transport.close()
        for task in self._tasks:
            task.cancel()
        await self._close_signaling()
        self._fail(ConnectionLost("the session was closed"))

    def _before_close(self) -> None:
        """Subclasses stop work that must end at once (the owner's worker)."""

    async def _close_signaling(self) -> None:
        """Subclasses release the signaling connection."""

    def _on_closed(self) -> None:
        """Subclasses release resources outside the loop (worker, files)."""

    def _on_transport_closed(self, reason: str) -> None:
        log.info("%s: connection ended: %s", self.role, reason)
        self._fail(ConnectionLost(
            "the session is closed" if self._closed
            else f"connection to the {self.peer_role} lost: {reason}"))
        for future in self._pings.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason))
        self._peer_gone(reason)

    def _peer_gone(self, reason: str) -> None:
        """Subclasses fail their pending calls with ``ConnectionLost``."""

    # -- sending: one path, two lanes ----------------------------------------------------
    def _send(self, message: BaseModel | Encoded, *, urgent: bool = False) -> None:
        """Queue a message (or one already encoded) from any thread; main-lane messages
        leave in the order they were queued. Raises if the connection is gone."""
        if not self._lanes or self._lost.is_set():
            raise self._connection_error()
        encoded = message if isinstance(message, tuple) else p.encode(message)
        if urgent and self._loop.in_loop_thread:
            # the loop's own pongs and pings: straight into their lane, no wake-up of the
            # loop through its self-pipe (urgent messages have no order against the main lane)
            self._lanes[True].put_nowait((encoded, None))
        else:
            self._loop.call_soon(self._lanes[urgent].put_nowait, (encoded, None))

    async def _send_and_wait(self, message: BaseModel) -> None:
        """Loop thread: send on the urgent lane and wait until the transport took it."""
        if not self._lanes:
            raise ConnectionLost("not connected")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lanes[True].put_nowait((p.encode(message), done))
        await done

    async def _drain(self, urgent: bool) -> None:
        lane = self._lanes[urgent]
        progress = None if urgent else self._progress()
        while True:
            (header, buffers), done = await lane.get()
            try:
                if self._transport is None:
                    raise ConnectionLost("not connected")
                await self._transport.send(header, buffers, progress, urgent=urgent)
            except Exception as exc:
                if done is not None and not done.done():
                    done.set_exception(exc)
                if isinstance(exc, ConnectionLost):
                    return
                log.exception("%s: could not send a message", self.role)
            else:
                if done is not None and not done.done():
                    done.set_result(None)

    def _progress(self) -> Progress | None:
        show = self.config.progress
        if show is None:
            show = self.role == "researcher"
        return _tqdm_progress if show else None

    # -- receiving (loop thread) ----------------------------------------------------------
    def _on_frame_message(self, header: bytes, buffers: list[memoryview]) -> None:
        try:
            message = p.decode(header, buffers, max_values=self._max_values)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if self._peer_hello is None and not isinstance(message, p.Hello):
            self._protocol_error(ProtocolError(f"{message.type!r} before hello"))
            return
        try:
            self._dispatch(message, (header, buffers))
        except ProtocolError as exc:
            self._protocol_error(exc)
        except Exception:
            log.exception("%s: failed to handle %s", self.role, message.type)

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("%s: rejected a message from the %s: %s", self.role, self.peer_role, exc)
        self._record_protocol_error(str(exc))
        if self._transport is not None and not self._transport.closed:
            self._send_quietly(p.ErrorNotice(code="protocol_error", message=str(exc)))

    def _send_quietly(self, message: BaseModel) -> None:
        """An urgent message that may find the connection gone."""
        try:
            self._send(message, urgent=True)
        except DuetError as exc:
            log.debug("%s: %s not sent: %s", self.role, type(message).__name__, exc)

    def _record_protocol_error(self, message: str) -> None:
        """The owner writes it to the audit log."""

    def _dispatch(self, message: p.Message, raw: Encoded) -> None:
        if isinstance(message, p.Hello):
            self._on_hello(message)
        elif isinstance(message, p.Ping):
            self._send_quietly(p.Pong(nonce=message.nonce))
        elif isinstance(message, p.Pong):
            future = self._pings.pop(message.nonce, None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter())
        elif isinstance(message, p.ErrorNotice):
            log.warning("%s: the %s rejected a message: %s", self.role, self.peer_role,
                        message.message)
        elif isinstance(message, p.Bye):
            if self._transport is not None:
                self._transport._closed(f"the {self.peer_role} left ({message.reason})")
                asyncio.ensure_future(self._transport.close())
        else:
            self._handle(message, raw)

    def _handle(self, message: p.Message, raw: Encoded) -> None:
        raise ProtocolError(f"unexpected {message.type!r} message for the {self.role}")

    def _on_hello(self, hello: p.Hello) -> None:
        if self._peer_hello is not None:
            raise ProtocolError("second hello")
        if hello.version != p.PROTOCOL_VERSION or hello.role != self.peer_role:
            if hello.version != p.PROTOCOL_VERSION:
                problem = (f"it speaks protocol version {hello.version}, ours is "
                           f"{p.PROTOCOL_VERSION}; both sides need the same duet version")
            else:
                problem = f"both peers are {hello.role}s: a duet pairs an owner with a researcher"
            error = PairingError(f"incompatible peer ({hello.software or 'unknown'}): {problem}")
            self._send_quietly(p.ErrorNotice(code="incompatible", message=str(error)))
            self._fail(error)
            if self._transport is not None:
                asyncio.ensure_future(self._transport.close())
            return
        self._peer_hello = hello
        self._on_peer_ready(hello)
        if self._ready_on_hello:
            self._ready.set()

    def _on_peer_ready(self, hello: p.Hello) -> None:
        """Subclasses react to a completed handshake."""

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        liveness = Liveness(interval, self.config.liveness_timeout, time.monotonic())
        while self._transport is not None and not self._transport.closed:
            await asyncio.sleep(interval)
            transport = self._transport
            idle = liveness.silence(time.monotonic(), transport.last_activity)
            if idle is not None:
                transport._closed(f"the {self.peer_role} stopped answering for {idle:.0f} s")
                await transport.close()
                return
            self._send_quietly(p.Ping(nonce=0))

    async def _ping(self) -> float:
        nonce = next(self._nonces)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = future
        start = time.perf_counter()
        self._send(p.Ping(nonce=nonce), urgent=True)
        return await future - start

    # -- helpers ----------------------------------------------------------------------------
    def _connection_error(self) -> DuetError:
        if isinstance(self._failure, DuetError):
            return self._failure
        if self._closed:
            return ConnectionLost("the session is closed")
        return ConnectionLost(f"not connected to the {self.peer_role}")

    def _require_connected(self) -> None:
        if not self.connected:
            raise self._connection_error()

    def _wait_ready(self, timeout: float | None) -> bool:
        if not self._ready.wait(timeout):
            return False
        if self._lost.is_set():
            raise self._connection_error()
        return True


def _tqdm_progress(total: int) -> Callable[[int], None]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="duet transfer",
               leave=False)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update
