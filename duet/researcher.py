"""The researcher's end: a store of pointers and remote namespaces; values only on approval.

Operations on pointers are queued in an outbox and flushed in batches on the session's loop
(``_flush``), so a loop of 10,000 ``x + 1`` costs no round trip per step. The owner answers
operations only when names alone refuse them (``OpFailed``); whether one failed otherwise is
data, and comes back only as the value of an approved request.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import secrets
import threading
from collections import deque
from typing import Any

from pydantic import BaseModel

from . import protocol as p
from .config import SessionConfig
from .errors import (
    ConnectionLost,
    DuetError,
    PrivacyBudgetExceeded,
    RemoteError,
    RequestDenied,
    RequestError,
    WorkerRestarted,
)
from .pointers import DPNamespace, RemoteNamespace, RequestHandle
from .session import Encoded, Session
from .store import Store

__all__ = ["ResearcherSession"]

log = logging.getLogger(__name__)


class ResearcherSession(Session):
    """The researcher's end: a store of pointers and remote namespaces; values only on approval."""

    role = "researcher"
    peer_role = "owner"
    _ready_on_hello = False  # ready once the first store listing arrived: r.store works at once

    def __init__(self, config: SessionConfig | None = None) -> None:
        super().__init__(config)
        self.allowlist = p.AllowlistSummary()
        self.store: Store = Store(self)
        self._ids = itertools.count(1)
        self._refused: dict[int, p.OpFailed] = {}
        # objects with smaller ids died with the owner's worker, and why
        self._restarted: tuple[int, str] = (0, "")
        self._requests: dict[str, concurrent.futures.Future[Any]] = {}
        self._targets: dict[str, p.PointerRef | p.StoreRef] = {}  # request id -> target
        # Appends and pops on a deque are atomic: Pointer.__del__ may enqueue a free from any
        # thread at any moment (garbage collection), even inside _flush, without a lock.
        self._outbox: deque[p.Op | BaseModel | int] = deque()
        self._flush_lock = threading.RLock()
        self._flush_scheduled = False
        self._signaling: Any = None

    # -- namespaces -----------------------------------------------------------------------
    @property
    def np(self) -> RemoteNamespace:
        return RemoteNamespace(self, "numpy")

    @property
    def torch(self) -> RemoteNamespace:
        return RemoteNamespace(self, "torch")

    @property
    def pd(self) -> RemoteNamespace:
        """pandas on the owner's side: ``r.pd.crosstab``, ``r.pd.merge``, ``r.pd.cut`` ..."""
        return RemoteNamespace(self, "pandas")

    @property
    def sklearn(self) -> RemoteNamespace:
        """scikit-learn on the owner's side, e.g. ``r.sklearn.linear_model.LogisticRegression``."""
        return RemoteNamespace(self, "sklearn")

    @property
    def dp(self) -> DPNamespace:
        """Differentially private statistics of data the owner shared with ``dp=``."""
        return DPNamespace(self)

    # -- PointerHost: what pointers ask of their session (any thread) ---------------------------
    def new_id(self) -> int:
        return next(self._ids)  # atomic: itertools.count is one C call under the GIL

    def submit_op(self, op: p.Op) -> None:
        self._enqueue(op)

    def free(self, pointer_id: int) -> None:
        """A Pointer was dropped; frees are batched like ops."""
        if self._closed or self._lost.is_set() or pointer_id < self._restarted[0]:
            return
        try:
            self._enqueue(pointer_id)  # a bare id in the outbox means: free it
        except DuetError as exc:  # the connection went meanwhile: the owner frees it all
            log.debug("free of #%d not sent: %s", pointer_id, exc)

    def check(self, pointer_id: int) -> None:
        """Raise what the owner told us about this object: a refusal, or a restart."""
        if pointer_id < self._restarted[0]:
            raise WorkerRestarted(f"this object is gone: {self._restarted[1]}. Objects made "
                                  "before the restart must be computed again")
        refused = self._refused.get(pointer_id)
        if refused is not None:
            raise p.failure_error(refused)

    def request(self, target: p.PointerRef | p.StoreRef, reason: str,
                lineage: str) -> RequestHandle:
        request_id = secrets.token_hex(8)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._requests[request_id] = future
        self._targets[request_id] = target
        self._enqueue(p.RequestValue(request_id=request_id, target=target, reason=reason))
        return RequestHandle(self, request_id, lineage, future)

    def withdraw(self, request_id: str) -> None:
        future = self._requests.pop(request_id, None)
        self._targets.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(RequestError(f"request {request_id} was withdrawn"))
        try:
            self._enqueue(p.Withdraw(request_id=request_id))
        except DuetError as exc:  # nothing to withdraw from: the owner's queue closed too
            log.debug("withdrawal of %s not sent: %s", request_id, exc)

    # -- the outbox -----------------------------------------------------------------------
    def _enqueue(self, item: p.Op | BaseModel | int) -> None:
        self._require_connected()
        self._outbox.append(item)
        if self._flush_scheduled:
            # Safe without the lock: _flush clears the flag before it takes the outbox, so
            # a flag still seen set means that flush has yet to take this item.
            return
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
        items: list[p.Op | BaseModel | int] = []
        while self._outbox:
            items.append(self._outbox.popleft())
        batch: list[p.Op] = []
        values = 2  # the message's map (type, ops); each op adds protocol.op_values
        freed: list[int] = []
        try:
            for item in items:
                if isinstance(item, p.Op):
                    added = p.op_values(item)
                    if batch and (len(batch) == p.MAX_OPS or values + added > p.MAX_VALUES):
                        self._send(p.Ops.model_construct(ops=batch))  # the owner takes no
                        batch, values = [], 2                         # more in one message
                    batch.append(item)
                    values += added
                elif isinstance(item, int):
                    freed.append(item)
                else:
                    if batch:
                        self._send(p.Ops.model_construct(ops=batch))
                        batch, values = [], 2
                    self._send(item)
            if batch:
                self._send(p.Ops.model_construct(ops=batch))
            for start in range(0, len(freed), p.MAX_OPS):
                self._send(p.Free(ids=freed[start:start + p.MAX_OPS]))
        except DuetError as exc:  # pending calls fail with ConnectionLost
            log.debug("flush stopped, the connection went away: %s", exc)

    # -- protocol (loop thread) -----------------------------------------------------------
    def _on_peer_ready(self, hello: p.Hello) -> None:
        self.allowlist = hello.allowlist or p.AllowlistSummary()

    def _handle(self, message: p.Message, raw: Encoded) -> None:
        if isinstance(message, p.StoreSnapshot):
            self.store._update(message.entries)
            self._ready.set()
        elif isinstance(message, p.OpFailed):
            self._refused[message.result] = message
        elif isinstance(message, p.AllowlistUpdate):
            self.allowlist = message.allowlist
        elif isinstance(message, p.Decision):
            self._on_decision(message)
        elif isinstance(message, p.WorkerRestarted):
            self._on_restart(message)
        else:
            super()._handle(message, raw)

    def _on_decision(self, decision: p.Decision) -> None:
        future = self._requests.pop(decision.request_id, None)
        target = self._targets.pop(decision.request_id, None)
        if future is None or future.done():
            return  # withdrawn, or a decision we never asked for
        refused = self._refused.get(target.id) if isinstance(target, p.PointerRef) else None
        if refused is not None:
            # the refusal came first on the same ordered channel: say what was refused
            future.set_exception(p.failure_error(refused))
        elif decision.status == "approved":
            future.set_result(decision.value)
        elif decision.status == "denied":
            future.set_exception(RequestDenied(decision.request_id, decision.reason))
        elif decision.status == "over_budget":
            future.set_exception(PrivacyBudgetExceeded(decision.budget or "?",
                                                       message=decision.reason))
        elif decision.status == "failed":
            future.set_exception(RemoteError(decision.operation or "an operation",
                                             decision.error_type or "an error", decision.reason))
        else:
            future.set_exception(RequestError(
                f"request {decision.request_id} could not be served: {decision.reason}"))

    def _on_restart(self, message: p.WorkerRestarted) -> None:
        """Everything made before now is gone; so are the answers to pending requests."""
        self._restarted = (next(self._ids), message.reason)
        self._refused.clear()
        error = WorkerRestarted(f"the owner's worker restarted: {message.reason}")
        for future in list(self._requests.values()):
            if not future.done():
                future.set_exception(error)
        self._requests.clear()
        self._targets.clear()

    def _peer_gone(self, reason: str) -> None:
        for future in list(self._requests.values()):
            if not future.done():
                future.set_exception(ConnectionLost(f"connection to the owner lost: {reason}"))
        self._requests.clear()
        self._targets.clear()

    async def _close_signaling(self) -> None:
        if self._signaling is not None:
            await self._signaling.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else ("closed" if self._closed else "connecting")
        return f"<ResearcherSession {state}, {len(self.store)} shared objects>"
