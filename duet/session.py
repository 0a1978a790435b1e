"""Sessions: the owner's and the researcher's end of a duet, tying the layers together.

Each session owns a private event loop thread (``LoopThread``) on which the transport and
the protocol run; the public methods are synchronous and hand work to it. The owner also
owns one worker thread that executes operations and prepares requests in arrival order, so
a long computation never stalls the transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel

from . import protocol as p
from .approvals import Request, RequestQueue, describe_value
from .audit import AuditLog, sha256_of
from .config import SessionConfig
from .errors import (
    ConnectionLost,
    DuetError,
    PairingError,
    ProtocolError,
    RequestDenied,
    RequestError,
    RequestTimeout,
)
from .executor import Executor
from .loop import LoopThread
from .policy import Allowlist
from .transport import Progress, Transport, run_soon

if TYPE_CHECKING:
    from typing_extensions import Self

    from .pointers import RemoteNamespace
    from .store import Store

__all__ = ["OwnerSession", "RequestHandle", "ResearcherSession", "Session"]

log = logging.getLogger(__name__)
SOFTWARE = "duet 0.1"
Encoded = tuple[bytes, list[memoryview]]  # a message after protocol.encode


class Session:
    """What both ends share: loop thread, transport, hello handshake, heartbeat, lifecycle."""

    role: ClassVar[Literal["owner", "researcher"]]
    peer_role: ClassVar[Literal["owner", "researcher"]]
    _ready_on_hello: ClassVar[bool] = True

    def __init__(self, config: SessionConfig | None = None) -> None:
        self.config = config or SessionConfig()
        self.session_id = secrets.token_hex(8)
        self._loop = LoopThread(name=f"duet-{self.role}-{self.session_id[:6]}")
        self._transport: Transport | None = None
        self._ready = threading.Event()  # hello exchanged
        self._lost = threading.Event()  # transport gone (or never came)
        self._failure: BaseException | None = None  # why pairing or the connection ended
        self._closed = False
        self._peer_hello: p.Hello | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._send_queue: asyncio.Queue[BaseModel | Encoded] | None = None
        self._sender: asyncio.Task[None] | None = None
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

    # -- lifecycle (loop thread) ----------------------------------------------------------
    def _start(self, connect: Callable[[], Any]) -> None:
        """Run the pairing coroutine on the loop; failures end up in ``_failure``."""

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
        self._send_queue = asyncio.Queue()
        self._sender = asyncio.create_task(self._send_loop())
        transport.set_handlers(self._on_frame_message, self._on_transport_closed)
        await self._send_now(p.Hello(version=p.PROTOCOL_VERSION, role=self.role,
                                     software=SOFTWARE, allowlist=self._hello_allowlist()))
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())

    def _hello_allowlist(self) -> dict[str, list[str]] | None:
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
                await asyncio.wait_for(self._send_now(p.Bye(reason=reason)), 2)
            except (DuetError, asyncio.TimeoutError):
                pass
            await transport.close()
        for task in (self._heartbeat, self._sender):
            if task is not None:
                task.cancel()
        await self._close_signaling()
        self._fail(ConnectionLost("the session was closed"))

    async def _close_signaling(self) -> None:
        """Subclasses release the signaling connection and anything else they hold."""

    def _on_closed(self) -> None:
        """Subclasses release resources outside the loop (worker threads, files)."""

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

    # -- sending ----------------------------------------------------------------------------
    async def _send_now(self, message: BaseModel | Encoded,
                        progress: Progress | None = None) -> None:
        if self._transport is None:
            raise ConnectionLost("not connected")
        header, buffers = message if isinstance(message, tuple) else p.encode(message)
        await self._transport.send(header, buffers, progress)

    def _send(self, message: BaseModel | Encoded) -> None:
        """Queue a message (or one already encoded), in order, from any thread."""
        if self._send_queue is None or self._lost.is_set():
            raise self._connection_error()
        queue = self._send_queue
        self._loop.call_soon(queue.put_nowait, message)

    async def _send_loop(self) -> None:
        assert self._send_queue is not None
        while True:
            message = await self._send_queue.get()
            try:
                await self._send_now(message, self._progress())
            except ConnectionLost:
                return
            except Exception:
                log.exception("could not send %r", message)

    def _progress(self) -> Progress | None:
        show = self.config.progress
        if show is None:
            show = self.role == "researcher"
        return _tqdm_progress if show else None

    # -- receiving (loop thread) ----------------------------------------------------------
    def _on_frame_message(self, header: bytes, buffers: list[memoryview]) -> None:
        try:
            message = p.decode(header, buffers)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if self._peer_hello is None and not isinstance(message, p.Hello):
            self._protocol_error(ProtocolError(f"{message.type!r} before hello"))
            return
        try:
            self._dispatch(message)
        except ProtocolError as exc:
            self._protocol_error(exc)
        except Exception:
            log.exception("%s: failed to handle %s", self.role, message.type)

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("%s: rejected a message from the %s: %s", self.role, self.peer_role, exc)
        self._record_protocol_error(str(exc))
        if self._transport is not None and not self._transport.closed:
            run_soon(self._send_quietly(p.ErrorNotice(code="protocol_error",
                                                                    message=str(exc))))

    async def _send_quietly(self, message: BaseModel) -> None:
        try:
            await self._send_now(message)
        except DuetError:
            pass

    def _record_protocol_error(self, message: str) -> None:
        """The owner writes it to the audit log."""

    def _dispatch(self, message: p.Message) -> None:
        if isinstance(message, p.Hello):
            self._on_hello(message)
        elif isinstance(message, p.Ping):
            run_soon(self._send_quietly(p.Pong(nonce=message.nonce)))
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
                run_soon(self._transport.close())
        else:
            self._handle(message)

    def _handle(self, message: p.Message) -> None:
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
            run_soon(self._send_quietly(p.ErrorNotice(code="incompatible",
                                                                    message=str(error))))
            self._fail(error)
            if self._transport is not None:
                run_soon(self._transport.close())
            return
        self._peer_hello = hello
        self._on_peer_ready(hello)
        if self._ready_on_hello:
            self._ready.set()

    def _on_peer_ready(self, hello: p.Hello) -> None:
        """Subclasses react to a completed handshake."""

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while self._transport is not None and not self._transport.closed:
            await asyncio.sleep(interval)
            transport = self._transport
            idle = time.monotonic() - transport.last_activity
            if idle > self.config.liveness_timeout:
                transport._closed(f"the {self.peer_role} stopped answering for {idle:.0f} s")
                await transport.close()
                return
            await self._send_quietly(p.Ping(nonce=0))

    async def _ping(self) -> float:
        nonce = next(self._nonces)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = future
        start = time.perf_counter()
        await self._send_now(p.Ping(nonce=nonce))
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


# =========================================================================================
class OwnerSession(Session):
    """The data owner's end: shares objects, runs allowlisted operations, decides requests."""

    role = "owner"
    peer_role = "researcher"

    def __init__(self, config: SessionConfig | None = None, *, allowlist: Allowlist | None = None,
                 audit_path: str | os.PathLike[str] | None = None,
                 memory_budget: int | None = 2 * 1024**3) -> None:
        super().__init__(config)
        self.code = ""
        self.server_url = ""
        self.allowlist = allowlist.copy() if allowlist is not None else Allowlist.default()
        self.audit = AuditLog(audit_path)
        self.requests = RequestQueue(self._send_decision)
        self._executor = Executor(self.allowlist, memory_budget=memory_budget,
                                  on_event=self._on_executor_event)
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="duet-owner-worker")
        self._shared: dict[str, p.StoreEntry] = {}
        self._signaling: Any = None
        self._event_buffer: list[tuple[str, dict[str, Any]]] | None = None
        self.audit.record("session_started", session=self.session_id)

    @property
    def join_line(self) -> str:
        """The exact line the researcher runs to join."""
        return f'duet.join("{self.code}", server="{self.server_url}")'

    def wait_for_peer(self, timeout: float | None = None) -> bool:
        """Block until a researcher is connected (True) or ``timeout`` passes (False)."""
        return self._wait_ready(timeout)

    # -- sharing --------------------------------------------------------------------------
    def share(self, obj: Any, name: str, description: str = "",
              tags: Iterable[str] = ()) -> None:
        """Make ``obj`` reachable by the researcher as ``store[name]`` (never its values)."""
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"share name {name!r} must be a Python identifier without a "
                             "leading underscore")
        entry = _declare(obj, name, description, tuple(tags))
        self._executor.share(name, obj)
        self._shared[name] = entry
        self.audit.record("share", session=self.session_id, name=name, type=entry.type,
                          shape=entry.shape, dtype=entry.dtype, description=description)
        self._publish_store()

    def unshare(self, name: str) -> None:
        if name not in self._shared:
            raise KeyError(f"nothing is shared under {name!r}")
        del self._shared[name]
        self._executor.unshare(name)
        self.audit.record("unshare", session=self.session_id, name=name)
        self._publish_store()

    def allow(self, *names: str, mutating: bool = False) -> None:
        """Allow more functions or methods for this session, e.g. ``s.allow("numpy.fft.fft")``.

        Names that can never be allowed (files, processes, private names ...) raise ValueError.
        """
        self.allowlist.allow(*names, mutating=mutating)
        self._publish_allowlist("allow", names)

    def deny(self, *names: str) -> None:
        """Take names off this session's allowlist; a namespace removes everything under it."""
        self.allowlist.deny(*names)
        self._publish_allowlist("deny", names)

    def _publish_allowlist(self, change: str, names: tuple[str, ...]) -> None:
        self.audit.record("allowlist_changed", session=self.session_id, change=change,
                          names=list(names))
        if self.connected:
            self._send(p.AllowlistUpdate(allowlist=self.allowlist.describe()))

    @property
    def shared(self) -> dict[str, p.StoreEntry]:
        return dict(self._shared)

    def _publish_store(self) -> None:
        if self.connected:
            self._send(p.StoreSnapshot(entries=list(self._shared.values())))

    # -- protocol -------------------------------------------------------------------------
    def _hello_allowlist(self) -> dict[str, list[str]] | None:
        return self.allowlist.describe()

    def _on_peer_ready(self, hello: p.Hello) -> None:
        self.audit.record("peer_authenticated", session=self.session_id, software=hello.software)
        run_soon(self._send_quietly(
            p.StoreSnapshot(entries=list(self._shared.values()))))

    def _handle(self, message: p.Message) -> None:
        if isinstance(message, p.Ops):
            self._worker.submit(self._run_ops, message.ops)
        elif isinstance(message, p.Free):
            self._worker.submit(self._executor.free, message.ids)
        elif isinstance(message, p.RequestValue):
            self._worker.submit(self._open_request, message)
        elif isinstance(message, p.Withdraw):
            self.requests.withdraw(message.request_id)
        else:
            super()._handle(message)

    def _run_ops(self, ops: list[p.Op]) -> None:
        """Worker thread: run a batch in order; its audit events go to disk in one transaction
        before any failure notice about the batch leaves."""
        self._event_buffer = []
        failures = []
        try:
            for op in ops:
                failure = self._executor.execute(op)
                if failure is not None:
                    failures.append(failure)
        finally:
            events, self._event_buffer = self._event_buffer, None
            # Nothing leaves for a successful batch: no need to wait for the disk.
            self.audit.record_many(events, sync=bool(failures))
        if not self._lost.is_set():
            for failure in failures:
                self._send(failure)

    def _on_executor_event(self, event: str, **fields: Any) -> None:
        fields["session"] = self.session_id
        if self._event_buffer is not None:
            self._event_buffer.append((event, fields))
        else:
            self.audit.record_many([(event, fields)])

    def _open_request(self, message: p.RequestValue) -> None:
        """Worker thread: after every earlier op ran, so the value is final."""
        pointer_id = message.target.id if isinstance(message.target, p.PointerRef) else None
        try:
            entry = self._executor.lookup(message.target)
        except DuetError as exc:
            self.audit.record("request", session=self.session_id, request_id=message.request_id,
                              pointer_id=pointer_id, reason=message.reason, refused=str(exc))
            self._send(p.Decision(request_id=message.request_id, status="error",
                                  reason=str(exc)))
            return
        # No message follows yet; the decision's synced write makes this durable first.
        self.audit.record_many([("request", {
            "session": self.session_id, "request_id": message.request_id,
            "pointer_id": pointer_id, "lineage": entry.lineage, "reason": message.reason})],
            sync=False)
        if entry.failure is not None:
            self._send(p.Decision(
                request_id=message.request_id, status="error",
                reason=f"{entry.failure.operation} failed with {entry.failure.error_type}"))
            return
        request = Request(id=message.request_id, reason=message.reason, lineage=entry.lineage,
                          sources=frozenset(getattr(entry, "sources", ())),
                          info=describe_value(entry.value), value=entry.value)
        try:
            self.requests.add(request)
        except RequestError as exc:
            self._send(p.Decision(request_id=message.request_id, status="error",
                                  reason=str(exc)))

    def _send_decision(self, request: Request) -> None:
        """Called by the queue with the decision made; audit first, then send."""
        if not self.connected:
            raise RequestError(f"the researcher has left; nothing was sent for {request.id}")
        decided = ("decision", {"session": self.session_id, "request_id": request.id,
                                "status": request.status, "by": request.decided_by,
                                "reason": request.decision_reason})
        if request.status != "approved":
            self.audit.record_many([decided])
            self._send(p.Decision(request_id=request.id, status="denied",
                                  reason=request.decision_reason))
            return
        try:
            header, buffers = p.encode(
                p.Decision(request_id=request.id, status="approved", value=request.value))
        except ProtocolError as exc:
            self.audit.record_many([decided])
            is_module = type(request.value).__module__.startswith("torch.nn")
            hint = "; a model's weights leave as model.state_dict()" if is_module else ""
            self._send(p.Decision(request_id=request.id, status="error",
                                  reason=f"{exc}{hint}"))
            return
        self.audit.record_many([decided, ("value_sent", {
            "session": self.session_id, "request_id": request.id,
            "nbytes": len(header) + sum(b.nbytes for b in buffers),
            "sha256": sha256_of([header, *buffers])})])
        self._send((header, buffers))

    def _record_protocol_error(self, message: str) -> None:
        self.audit.record("protocol_error", session=self.session_id, message=message)

    def _peer_gone(self, reason: str) -> None:
        self.requests.close("the researcher has left")
        self.audit.record("disconnect", session=self.session_id, reason=reason)

    async def _close_signaling(self) -> None:
        if self._signaling is not None:
            await self._signaling.close()

    def _on_closed(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.requests.close("the session is closed")
        self.audit.record("session_closed", session=self.session_id)
        self.audit.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else ("closed" if self._closed else "waiting")
        return (f"<OwnerSession {state}, {len(self._shared)} shared, "
                f"{len(self.requests.pending)} pending requests; join with: {self.join_line}>")

    def _repr_html_(self) -> str:
        import html

        state = "connected" if self.connected else (
            "closed" if self._closed else "waiting for the researcher")
        return (f"<p><b>duet owner session</b> ({state})</p><p>The researcher runs:</p>"
                f"<pre>{html.escape(self.join_line)}</pre>")


def _declare(obj: Any, name: str, description: str, tags: tuple[str, ...]) -> p.StoreEntry:
    """The metadata the owner chooses to declare: type, and shape/dtype for arrays."""
    shape = dtype = None
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        shape = [int(n) for n in obj.shape]
        dtype = str(obj.dtype).removeprefix("torch.")
    kind = type(obj)
    module = kind.__module__.split(".")[0]
    type_name = kind.__name__ if module == "builtins" else f"{module}.{kind.__name__}"
    return p.StoreEntry(name=name, type=type_name, shape=shape, dtype=dtype,
                        description=description, tags=list(tags))


# =========================================================================================
class RequestHandle:
    """A pending request for a value; ``result()`` waits for the owner's decision."""

    def __init__(self, session: ResearcherSession, request_id: str, lineage: str,
                 future: concurrent.futures.Future[Any]) -> None:
        self.id = request_id
        self.lineage = lineage
        self._session = session
        self._future = future

    @property
    def done(self) -> bool:
        return self._future.done()

    @property
    def status(self) -> str:
        if not self._future.done():
            return "pending"
        exc = self._future.exception()
        if exc is None:
            return "approved"
        return "denied" if isinstance(exc, RequestDenied) else "error"

    def result(self, timeout: float | None = None) -> Any:
        """The approved value; raises RequestDenied, RequestTimeout, ConnectionLost, RemoteError."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RequestTimeout(
                f"no decision on request {self.id} within {timeout} s; it stays pending "
                "(call .result() again, or .withdraw())") from None

    def withdraw(self) -> None:
        if not self._future.done():
            self._session._withdraw(self.id)

    def __repr__(self) -> str:
        return f"<RequestHandle {self.id} {self.status}: {self.lineage}>"


class ResearcherSession(Session):
    """The researcher's end: a store of pointers and remote namespaces; values only on approval."""

    role = "researcher"
    peer_role = "owner"
    _ready_on_hello = False  # ready once the first store listing arrived: r.store works at once

    def __init__(self, config: SessionConfig | None = None) -> None:
        super().__init__(config)
        from .store import Store

        self.store: Store = Store(self)
        self.allowlist: dict[str, list[str]] = {}
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()
        self._failures: dict[int, p.OpFailed] = {}
        self._requests: dict[str, concurrent.futures.Future[Any]] = {}
        self._request_targets: dict[str, p.PointerRef | p.StoreRef] = {}
        # Appends and pops on a deque are atomic: Pointer.__del__ may enqueue a free from any
        # thread at any moment (garbage collection), even inside _flush, without a lock.
        self._outbox: deque[p.Op | BaseModel] = deque()
        self._flush_lock = threading.RLock()
        self._flush_scheduled = False
        self._signaling: Any = None

    # -- namespaces -----------------------------------------------------------------------
    @property
    def np(self) -> RemoteNamespace:
        from .pointers import RemoteNamespace

        return RemoteNamespace(self, "numpy")

    @property
    def torch(self) -> RemoteNamespace:
        from .pointers import RemoteNamespace

        return RemoteNamespace(self, "torch")

    # -- operations (any thread) ----------------------------------------------------------
    def _new_id(self) -> int:
        with self._id_lock:
            return next(self._ids)

    def _submit_op(self, op: p.Op) -> None:
        self._enqueue(op)

    def _enqueue(self, item: p.Op | BaseModel) -> None:
        self._require_connected()
        self._outbox.append(item)
        with self._flush_lock:
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Loop thread: batch consecutive ops into one message, keep everything in order.

        Frees go last, in one message: freeing later is always safe (nothing queued after a
        free can name the freed object), and a free between ops would split their batch."""
        with self._flush_lock:
            self._flush_scheduled = False  # anything appended from now on schedules a flush
        items: list[p.Op | BaseModel] = []
        while self._outbox:
            items.append(self._outbox.popleft())
        batch: list[p.Op] = []
        freed: list[int] = []
        for item in items:
            if isinstance(item, p.Op):
                batch.append(item)
            elif isinstance(item, p.Free):
                freed.extend(item.ids)
            else:
                if batch:
                    self._send(p.Ops(ops=batch))
                    batch = []
                self._send(item)
        if batch:
            self._send(p.Ops(ops=batch))
        if freed:
            self._send(p.Free(ids=freed))

    def _free(self, pointer_id: int) -> None:
        """Called when a Pointer is garbage collected; batched like ops."""
        if self._closed or self._lost.is_set():
            return
        try:
            self._enqueue(p.Free(ids=[pointer_id]))
        except DuetError:
            pass

    def _failure_of(self, pointer_id: int) -> p.OpFailed | None:
        return self._failures.get(pointer_id)

    def _request(self, target: p.PointerRef | p.StoreRef, reason: str,
                 lineage: str) -> RequestHandle:
        request_id = secrets.token_hex(8)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._requests[request_id] = future
        self._request_targets[request_id] = target
        self._enqueue(p.RequestValue(request_id=request_id, target=target, reason=reason))
        return RequestHandle(self, request_id, lineage, future)

    def _withdraw(self, request_id: str) -> None:
        future = self._requests.pop(request_id, None)
        self._request_targets.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(RequestError(f"request {request_id} was withdrawn"))
        try:
            self._enqueue(p.Withdraw(request_id=request_id))
        except DuetError:
            pass

    # -- protocol (loop thread) -----------------------------------------------------------
    def _on_peer_ready(self, hello: p.Hello) -> None:
        self.allowlist = hello.allowlist or {}

    def _handle(self, message: p.Message) -> None:
        if isinstance(message, p.StoreSnapshot):
            self.store._update(message.entries)
            self._ready.set()
        elif isinstance(message, p.OpFailed):
            self._failures[message.result] = message
        elif isinstance(message, p.AllowlistUpdate):
            self.allowlist = message.allowlist
        elif isinstance(message, p.Decision):
            self._on_decision(message)
        else:
            super()._handle(message)

    def _on_decision(self, decision: p.Decision) -> None:
        future = self._requests.pop(decision.request_id, None)
        target = self._request_targets.pop(decision.request_id, None)
        if future is None or future.done():
            return  # withdrawn, or a decision we never asked for
        if decision.status == "approved":
            future.set_result(decision.value)
        elif decision.status == "denied":
            future.set_exception(RequestDenied(decision.request_id, decision.reason))
        elif isinstance(target, p.PointerRef) and target.id in self._failures:
            # The OpFailed came first (same ordered channel): raise what failed, as it failed.
            future.set_exception(p.failure_error(self._failures[target.id]))
        else:
            future.set_exception(RequestError(
                f"request {decision.request_id} could not be served: {decision.reason}"))

    def _peer_gone(self, reason: str) -> None:
        for future in list(self._requests.values()):
            if not future.done():
                future.set_exception(ConnectionLost(f"connection to the owner lost: {reason}"))
        self._requests.clear()
        self._request_targets.clear()

    async def _close_signaling(self) -> None:
        if self._signaling is not None:
            await self._signaling.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else ("closed" if self._closed else "connecting")
        return f"<ResearcherSession {state}, {len(self.store)} shared objects>"
