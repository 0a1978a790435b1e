"""The data owner's end: shares objects, has them worked on in a worker, decides requests.

The owner's kernel never runs the researcher's operations. It keeps the session, the
approval queue, the audit log and the decisions; a worker process (``duet.worker``) runs the
operations and freezes requested values. The path of one ``get``:

1. ``Ops`` arrive: refusals that depend on names alone are answered at once
   (``Allowlist.precheck``); the message goes to the worker as it came.
2. ``RequestValue`` arrives: audited, then passed to the worker, after the ops before it.
3. The worker freezes the value and sends a ``Snapshot`` (summary, preview, sources, hash).
4. ``RequestQueue.add`` shows it to the owner and applies the rules.
5. Approved: the decision and the hash are audited (synced), the frozen bytes are sent, exactly
   as hashed. A failed value tells the researcher only which operation failed, and how.

Nothing about operations goes back to the researcher otherwise: whether one failed, and why,
depends on the data, so it is part of the value and needs a request.
"""

from __future__ import annotations

import html
import logging
import os
import secrets
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, NoReturn

import numpy as np

from . import protocol as p
from . import tables
from .approvals import DPInfo, Request, RequestQueue, Rule, ValueInfo, Withdrawn
from .audit import EVENTS, AuditLog, sha256_of
from .checks import Check, CheckSettings
from .config import SessionConfig
from .dp import DP, Derivations, QuerySpec, is_dp_op, parse_op
from .dp_train import TRAIN_OP, TrainJobs, TrainSpec, parse_train_op
from .errors import (
    DuetTimeout,
    PolicyViolation,
    PrivacyBudgetExceeded,
    ProtocolError,
    RequestError,
)
from .ipc import Done, RequestFailed, Snapshot, Usage
from .ledger import Budget, Ledger
from .policy import Allowlist
from .screen import safe_text
from .session import Encoded, Session
from .supervisor import (
    SealedArray,
    SealedColumns,
    WorkerProcess,
    WorkerSettings,
    prepare_share,
)

__all__ = ["OwnerSession"]

log = logging.getLogger(__name__)
_SCALARS = (bool, int, float, complex, str, bytes, type(None), np.generic)


class OwnerSession(Session):
    """The data owner's end: shares objects, runs allowlisted operations, decides requests."""

    role = "owner"
    peer_role = "researcher"
    _max_values = p.MAX_VALUES  # every value of a message is walked on this session's loop

    def __init__(self, config: SessionConfig | None = None, *, allowlist: Allowlist | None = None,
                 audit_path: str | os.PathLike[str] | None = None,
                 memory_budget: int | None = 2 * 1024**3) -> None:
        super().__init__(config)
        self.code = ""
        self.server_url = ""
        self.allowlist = allowlist.copy() if allowlist is not None else Allowlist.default()
        self._summary = self.allowlist.describe()  # what the researcher is told is allowed
        self.memory_budget = memory_budget
        self.audit = AuditLog(audit_path)
        self._audit = self.audit.bind(self.session_id)
        self.requests = RequestQueue(self._send_decision, self._rule_failed)
        self._shared: dict[str, p.StoreEntry] = {}
        # name -> (share message, buffers, sealed memory): sent again to a restarted worker
        self._share_messages: dict[str, tuple[dict[str, Any], list[bytes],
                                              SealedArray | SealedColumns | None]] = {}
        self._signaling: Any = None
        self._worker_lock = threading.RLock()
        self._crashes = 0
        self._stopping = False
        self._awaiting_release: dict[str, Request] = {}
        self._usage_waiters: list[threading.Event] = []
        self._last_usage: Usage | None = None
        self._reasons: dict[str, str] = {}  # request id -> reason, until its snapshot
        self._request_ids: set[str] = set()  # every request id the researcher used
        self._withdrawn: set[str] = set()  # withdrawn while their snapshots were on the way
        self._live_ids: set[int] = set()  # the researcher's live objects (a freed id may return)
        self._refused_ids: set[int] = set()  # of those, the ones refused here (see _on_ops)
        self._families: dict[str, str | None] = {}  # shared name -> its type family
        # request id -> its snapshot (and the frozen bytes when they came inline)
        self._snapshots: dict[str, tuple[Snapshot, Encoded | None]] = {}
        self._request_rows: dict[str, tuple[str, dict[str, Any]]] = {}  # audit rows to write
        self._held_rows: list[tuple[str, dict[str, Any]]] = []  # see worker_done
        self._rows_lock = threading.Lock()
        # Differential privacy (duet.dp): the owner's declarations per shared name, which
        # researcher objects derive from them, the DP queries by object id, and the ledger
        # reservations by request id (name, epsilon, delta) until each is decided.
        self._dp_specs: dict[str, dict[str, Any]] = {}
        self._dp_names: set[str] = set()  # DP-shared at any time in this session
        self._derivations = Derivations(self._dp_specs)
        self._dp_queries: dict[int, QuerySpec] = {}
        self._dp_refused: set[int] = set()  # dp.* ops refused at once: requests too
        self._train_jobs = TrainJobs()  # dp.train jobs: started, paid, run (duet.dp_train)
        self._dp_reserved: dict[str, tuple[str, float, float, str]] = {}  # + ledger charge id
        self._dp_lock = threading.Lock()
        self._ledger: Ledger | None = None
        self._audit.record("session_started")
        self._worker: WorkerProcess | None = self._start_worker()

    @property
    def join_line(self) -> str:
        """The exact line the researcher runs to join."""
        return f'duet.join("{self.code}", server="{self.server_url}")'

    def wait_for_peer(self, timeout: float | None = None) -> bool:
        """Block until a researcher is connected (True) or ``timeout`` passes (False)."""
        return self._wait_ready(timeout)

    # -- sharing --------------------------------------------------------------------------
    def share(self, obj: Any, name: str, description: str = "",
              tags: Iterable[str] = (), *, declare_rows: bool = True,
              min_count: int = 10, dp: DP | None = None) -> None:
        """Make ``obj`` reachable by the researcher as ``store[name]`` (never its values).

        Arrays and tensors are copied once into sealed memory the worker maps read-only;
        torch modules, scalars and plain lists, tuples and dicts of these are copied to it.
        A pandas DataFrame or Series is listed with its column names and dtypes and its row
        count (``declare_rows=False`` hides it); its index is data and is never listed.
        ``min_count``: the fewest records of ``obj`` any released number may come from
        (the disclosure checks, docs/disclosure.md).
        ``dp=duet.DP(epsilon=..., bounds=...)``: the researcher may ask for differentially
        private statistics (``r.dp.*``) charged to the privacy budget of ``name``, which
        persists across sessions (``budget(name)``); see docs/dp.md.
        """
        settings = CheckSettings(min_count=min_count)
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"share name {name!r} must be a Python identifier without a "
                             "leading underscore")
        if dp is not None and not isinstance(dp, DP):
            raise TypeError("dp= takes a duet.DP(epsilon=..., delta=..., bounds=...)")
        _check_shareable(obj, 0)
        dp_spec = dp.spec(name, obj) if dp is not None else None
        entry = (tables.declare(obj, name, description, tuple(tags), declare_rows)
                 if tables.is_table(obj) else _declare(obj, name, description, tuple(tags)))
        entry = entry.model_copy(update={"family": self.allowlist.family(obj)})
        prepared = prepare_share(obj)
        prepared = ({**prepared[0], "dp": dp_spec,
                     "checks": {"min_count": settings.min_count, "rows_declared": declare_rows}},
                    prepared[1], prepared[2])
        if dp is not None:
            budget = self.ledger.declare(name, dp.epsilon, dp.delta)
            self._audit.record("dp_budget", name=name, epsilon=dp.epsilon, delta=dp.delta,
                               epsilon_spent=budget.epsilon_spent,
                               unbounded=budget.unbounded, unit=dp_spec and dp_spec["unit"],
                               bounds=dp_spec and dp_spec["bounds"])
        with self._dp_lock:
            if dp_spec is not None:
                self._dp_specs[name] = dp_spec
                self._dp_names.add(name)
            else:
                self._dp_specs.pop(name, None)
        with self._worker_lock:
            old = self._share_messages.pop(name, None)
            self._share_messages[name] = prepared
            if self._worker is not None:
                self._worker.submit("share", prepared[1], name=name, **prepared[0])
        if old is not None and old[2] is not None:
            old[2].close()
        self._shared[name] = entry
        self._families[name] = self.allowlist.family(obj)
        self._audit.record("share", name=name, type=entry.type,
                          shape=entry.shape, dtype=entry.dtype, description=description,
                          min_count=settings.min_count)
        self._publish_store()

    def unshare(self, name: str) -> None:
        if name not in self._shared:
            raise KeyError(f"nothing is shared under {name!r}")
        del self._shared[name]
        del self._families[name]
        with self._dp_lock:
            self._dp_specs.pop(name, None)
        with self._worker_lock:
            _, _, sealed = self._share_messages.pop(name)
            if self._worker is not None:
                self._worker.submit("unshare", name=name)
        if sealed is not None:
            sealed.close()  # the worker keeps its mapping until it lets go of the object
        self._audit.record("unshare", name=name)
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
        self._audit.record("allowlist_changed", change=change,
                          names=list(names))
        self._summary = self.allowlist.describe()
        with self._worker_lock:
            if self._worker is not None:
                self._worker.submit("allowlist", spec=self.allowlist.spec())
        if self.connected:
            self._send(p.AllowlistUpdate(allowlist=self._summary))

    # -- differential privacy ---------------------------------------------------------------
    @property
    def ledger(self) -> Ledger:
        """The privacy budget ledger (``duet.ledger``), next to the audit log."""
        if self._ledger is None:
            self._ledger = Ledger.beside(self.audit.path)
        return self._ledger

    def budget(self, name: str) -> Budget:
        """What is spent and left of the privacy budget of shared ``name``
        (``.epsilon_spent``, ``.epsilon_left``, ``.delta_spent``, ``.delta_left``);
        reservations of undecided requests count as spent."""
        return self.ledger.budget(name)

    @property
    def budgets(self) -> dict[str, Budget]:
        """The privacy budget of every name shared with ``dp=`` in this session."""
        with self._dp_lock:
            names = sorted(self._dp_names)
        return {name: self.ledger.budget(name) for name in names}

    def _dp_reserve(self, request_id: str, name: str, epsilon: float, delta: float,
                    what: str) -> Budget:
        """Set a request's cost aside in the ledger before anything is computed (also for
        DP training); raises ``PrivacyBudgetExceeded``, audited either way."""
        try:
            # The ledger's charge ids are ours: a researcher may reuse a request id
            charge_id = f"{self.session_id}:{request_id}:{secrets.token_hex(8)}"
            budget = self.ledger.reserve(name, epsilon, delta, charge_id,
                                         f"{what} (request {request_id})")
        except PrivacyBudgetExceeded as exc:
            self._audit.record("dp_charge", request_id=request_id, name=name,
                               epsilon=epsilon, delta=delta, status="refused",
                               epsilon_left=exc.epsilon_left, lineage=what)
            raise
        with self._dp_lock:
            self._dp_reserved[request_id] = (name, epsilon, delta, charge_id)
        self._audit.record("dp_charge", request_id=request_id, name=name, epsilon=epsilon,
                           delta=delta, status="reserved", epsilon_left=budget.epsilon_left,
                           lineage=what)
        return budget

    def _dp_settle(self, request_id: str, spent: bool, *, epsilon: float | None = None,
                   delta: float | None = None) -> Budget | None:
        """The reservation of ``request_id`` becomes spent (the value left) or is given
        back (denied, withdrawn, failed); ``epsilon``/``delta`` may lower what is spent."""
        with self._dp_lock:
            reserved = self._dp_reserved.pop(request_id, None)
        if reserved is None:
            return None
        name = reserved[0]
        budget: Budget | None
        if spent:
            budget = self.ledger.commit(reserved[3], epsilon=epsilon, delta=delta)
        else:
            budget = self.ledger.release(reserved[3])
        self._audit.record("dp_charge", request_id=request_id, name=name,
                           epsilon=reserved[1] if epsilon is None else epsilon,
                           delta=reserved[2] if delta is None else delta,
                           status="spent" if spent else "released",
                           epsilon_left=None if budget is None else budget.epsilon_left)
        return budget

    def _dp_release_all(self) -> None:
        with self._dp_lock:
            pending = list(self._dp_reserved)
        for request_id in pending:
            self._dp_settle(request_id, False)

    @property
    def shared(self) -> dict[str, p.StoreEntry]:
        return dict(self._shared)

    def _publish_store(self) -> None:
        if self.connected:
            self._send(p.StoreSnapshot(entries=list(self._shared.values())))

    # -- the worker -----------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop whatever the researcher's operations are doing, now: the worker is killed and
        started again (also after the restart limit stopped it). The researcher's objects are
        gone; pending requests are withdrawn; the researcher is told."""
        with self._worker_lock:
            worker = self._worker
            if worker is None:
                self._restart("restarted by the owner", crashed=False)
                return
        worker.kill("cancelled by the owner", crashed=False)
        worker.wait_exited(10)

    def worker_usage(self, timeout: float = 30.0) -> Usage:
        """How many objects the researcher holds in the worker, and their bytes (counted
        against ``memory_budget``); waits behind the work already queued."""
        with self._worker_lock:
            worker = self._worker
            if worker is None:
                raise RequestError("the worker is stopped")
            ready = threading.Event()
            self._usage_waiters.append(ready)
            worker.submit("usage")
        if not ready.wait(timeout):
            raise DuetTimeout(f"the worker did not answer within {timeout} s")
        assert self._last_usage is not None
        return self._last_usage

    @property
    def worker_pid(self) -> int | None:
        """The worker process's id (None while stopped)."""
        with self._worker_lock:
            return self._worker.process.pid if self._worker is not None else None

    def _start_worker(self) -> WorkerProcess:
        settings = WorkerSettings(
            memory=self.config.worker_memory_limit(), op_timeout=self.config.op_timeout,
            memory_budget=self.memory_budget, allowlist=self.allowlist.spec(),
            torch="Tensor" in self.allowlist.families)
        worker = WorkerProcess(settings, self)
        for name, (message, buffers, _) in self._share_messages.items():
            worker.submit("share", buffers, name=name, **message)
        return worker

    def _restart(self, reason: str, *, crashed: bool) -> None:
        """Replace the worker (reader thread of the old one, or ``cancel``)."""
        with self._worker_lock:
            if self._stopping:
                return
            if crashed:
                self._crashes += 1
            stopped = crashed and self._crashes > self.config.max_worker_restarts
            self._worker = None if stopped else self._start_worker()
        self._audit.record("worker_restarted", reason=reason,
                          crashed=crashed, stopped=stopped, crashes=self._crashes)
        log.warning("duet: the worker %s: %s", "stopped" if stopped else "restarted", reason)
        for request in self.requests.pending:
            self.requests.withdraw(request.id, f"the worker restarted ({reason})")
        self._awaiting_release.clear()
        self._live_ids.clear()  # the researcher's objects died with the worker
        self._derivations.clear()
        self._dp_queries.clear()
        self._dp_refused.clear()
        self._train_jobs.clear()
        self._dp_release_all()  # nothing left the dead worker
        told = reason if not crashed else "the owner's worker stopped unexpectedly"
        if stopped:
            told += (f"; it stopped {self._crashes} times, the owner's limit: nothing runs "
                     "until the owner restarts it")
        if self.connected:
            self._send(p.WorkerRestarted(reason=told, stopped=stopped))

    # WorkerHooks: called on the worker's reader thread -------------------------------------
    def worker_done(self, done: Done) -> None:
        """Audit rows of finished work are held until the pipe goes quiet, or until a request
        or decision is written, whichever comes first: then all go in one transaction, in
        order (no message follows them, so they never wait for the disk)."""
        unknown = sorted({event for event, _ in done.events if event not in EVENTS})
        if unknown:
            self._worker_misbehaved(f"unknown audit events {unknown}")
        elif done.events:
            with self._rows_lock:
                self._held_rows.extend(done.events)
        if done.shared_modified:
            self._worker_misbehaved(f"shared object {done.shared_modified!r} changed inside "
                                    "the worker; it restarts from the owner's original")

    def worker_snapshot(self, snapshot: Snapshot, encoded: Encoded | None) -> None:
        if snapshot.request_id in self._withdrawn:
            self._discard_withdrawn(snapshot.request_id)
            return
        summary = snapshot.summary
        info = ValueInfo(summary.type, None if summary.shape is None else tuple(summary.shape),
                         summary.dtype, summary.elements, summary.nbytes)
        if snapshot.failed:  # no size rule releases a failure: the owner (or a rule that
            info = ValueInfo("failed", None, None, sys.maxsize, 0)  # names it) decides
        try:
            privacy = self._privacy_of(snapshot)
        except RequestError as exc:
            self._reasons.pop(snapshot.request_id, None)
            self._drop(snapshot.request_id)
            self._answer_error(snapshot.request_id, str(exc))
            return
        request = Request(id=snapshot.request_id, reason=self._reasons.pop(
            snapshot.request_id, ""), lineage=snapshot.lineage,
            sources=frozenset(snapshot.sources), info=info, preview=snapshot.preview,
            sha256=snapshot.sha256, failed=snapshot.failed, dp=privacy,
            checks=tuple(Check(c.name, c.status, c.reason, c.evidence)
                         for c in snapshot.checks))
        # Written with the decision when a rule decides at once (one transaction), else
        # right after: no message follows it, so it need not wait for the disk either way.
        self._request_rows[request.id] = ("request", {
            "request_id": request.id,
            "pointer_id": snapshot.pointer_id, "lineage": request.lineage,
            "reason": request.reason, "sources": sorted(request.sources),
            "sha256": request.sha256 or None, "nbytes": snapshot.nbytes or None,
            "failed": request.failed or None, "check_status": request.check_status,
            "checks": [c.to_dict() for c in request.checks]})
        self._snapshots[snapshot.request_id] = (snapshot, encoded)
        try:
            self.requests.add(request)
            if request.id in self._withdrawn:  # withdrawn while it was being added
                self._withdrawn.discard(request.id)
                self.requests.withdraw(request.id)
            if (request.status == "pending" and request.dp is not None
                    and request.dp.kind == "dp"
                    and self._train_jobs.start_of(request.id) is not None):
                self._release_trained(request)
        except RequestError as exc:
            self._snapshots.pop(snapshot.request_id, None)
            self._dp_settle(snapshot.request_id, False)
            self._answer_error(snapshot.request_id, str(exc))
        finally:
            with self._rows_lock:  # atomic with a decision taking the held rows
                row = self._request_rows.pop(request.id, None)
                if row is not None:  # not decided at once: held like finished work's rows
                    self._held_rows.append(row)

    def _privacy_of(self, snapshot: Snapshot) -> DPInfo | None:
        """What the request means for privacy budgets: a DP release whose cost the kernel
        reserved itself (the worker's quote may not claim more), or an exact value of
        DP-protected data (unbounded loss if approved)."""
        started = self._train_jobs.start_of(snapshot.request_id)
        if started is not None:
            return self._train_result_privacy(snapshot, started[0])
        quote = snapshot.dp
        with self._dp_lock:
            reserved = self._dp_reserved.get(snapshot.request_id)
        if quote is not None:
            if reserved is None:
                raise RequestError("the request was withdrawn; nothing was charged")
            name, epsilon, delta, _ = reserved
            if (quote.source != name or quote.epsilon > epsilon * (1 + 1e-9)
                    or quote.delta > delta * (1 + 1e-9)):
                self._dp_settle(snapshot.request_id, False)
                self._worker_misbehaved("a DP quote that does not match its reservation")
                raise RequestError("the DP release could not be made; nothing was charged")
            budget = self.ledger.budget(name)
            return DPInfo("dp", (name,), epsilon, delta, quote.mechanism, quote.scale,
                          quote.accuracy, budget.epsilon_left)
        if reserved is not None:  # computing the DP value failed: not a DP release
            self._dp_settle(snapshot.request_id, False)
        with self._dp_lock:
            # values made while a name was DP-shared stay protected after it is unshared
            protected = tuple(sorted(set(snapshot.sources) & self._dp_names))
        return DPInfo("exact", protected) if protected else None

    def _discard_withdrawn(self, request_id: str) -> None:
        """A request withdrawn before its snapshot came is never shown to the owner, and
        the value the worker froze for it is dropped."""
        self._withdrawn.discard(request_id)
        self._drop(request_id)
        self._dp_settle(request_id, False)
        self._audit.record("request", request_id=request_id,
                           reason=self._reasons.pop(request_id, ""),
                           refused="withdrawn by the researcher before its value was ready")

    def worker_request_failed(self, failed: RequestFailed) -> None:
        self._withdrawn.discard(failed.request_id)
        self._dp_settle(failed.request_id, False)
        reason = self._reasons.pop(failed.request_id, "")
        request = self._awaiting_release.pop(failed.request_id, None)
        if request is None:
            self._audit.record("request", request_id=failed.request_id, reason=reason,
                              refused=failed.reason)
        self._answer_error(failed.request_id, failed.reason)

    def worker_released(self, request_id: str, header: bytes, buffers: list[memoryview]) -> None:
        request = self._awaiting_release.pop(request_id, None)
        if request is None:
            return  # withdrawn meanwhile, or the session closed
        self._send_value(request, (header, buffers))

    def worker_quiet(self) -> None:
        # Taken and written under the lock: a decision taking the rows after us then writes
        # after us, so a request's row never lands behind its own decision.
        with self._rows_lock:
            rows, self._held_rows = self._held_rows, []
            if rows:
                self._audit.record_many(rows, sync=False)

    def worker_reported_usage(self, usage: Usage) -> None:
        self._last_usage = usage
        while self._usage_waiters:
            self._usage_waiters.pop(0).set()

    def worker_exited(self, reason: str, crashed: bool) -> None:
        self.worker_quiet()
        if not self._stopping:
            self._restart(reason, crashed=crashed)

    def _worker_misbehaved(self, why: str) -> None:
        with self._worker_lock:
            worker = self._worker
        if worker is not None:
            worker.kill(why, crashed=True)

    # -- protocol -------------------------------------------------------------------------
    def _hello_allowlist(self) -> p.AllowlistSummary | None:
        return self._summary

    def _on_peer_ready(self, hello: p.Hello) -> None:
        self._audit.record("peer_authenticated", software=hello.software)
        self._send(p.StoreSnapshot(entries=list(self._shared.values())))

    def _handle(self, message: p.Message, raw: Encoded) -> None:
        if isinstance(message, p.Ops):
            self._on_ops(message, raw)
        elif isinstance(message, p.Free):
            self._live_ids.difference_update(message.ids)
            self._refused_ids.difference_update(message.ids)
            self._derivations.forget(message.ids)
            for object_id in message.ids:
                self._dp_queries.pop(object_id, None)
                self._dp_refused.discard(object_id)
            self._train_jobs.forget(message.ids)
            self._forward(raw)
        elif isinstance(message, p.RequestValue):
            self._on_request(message, raw)
        elif isinstance(message, p.Withdraw):
            if message.request_id in self._reasons:  # its snapshot is on the way: it is
                self._withdrawn.add(message.request_id)  # dropped when it comes, not shown
            self.requests.withdraw(message.request_id)
            try:
                pending = self.requests.get(message.request_id).status == "withdrawn"
            except RequestError:
                pending = True  # its value has not arrived yet
            if pending:
                self._train_given_up(message.request_id)
                self._dp_settle(message.request_id, False)
            with self._worker_lock:
                if self._worker is not None:
                    self._worker.submit("drop", answered=False, request_id=message.request_id)
        else:
            super()._handle(message, raw)

    def _forward(self, raw: Encoded, refused: dict[int, p.OpFailed] | None = None) -> bool:
        """Pass a researcher's message to the worker as it arrived; False when stopped.

        ``refused``: the operations of an ``Ops`` message this kernel refused (and answered,
        and audited), by their place in it. The worker holds them as refused and never runs
        them, so it runs exactly what the kernel accepted."""
        header, buffers = raw
        fields: dict[str, Any] = {"refused": [
            [index, failed.detail] for index, failed in refused.items()]} if refused else {}
        with self._worker_lock:
            if self._worker is None:
                return False
            self._worker.submit("peer", [header, *buffers], **fields)
        return True

    def _on_ops(self, message: p.Ops, raw: Encoded) -> None:
        """Refuse at once what names alone refuse; everything else is the worker's."""
        refusals: dict[int, p.OpFailed] = {}  # by the op's place in the message
        for index, op in enumerate(message.ops):
            if op.result in self._live_ids:  # the id keeps its object
                refusals[index] = _refusal(op, f"object #{op.result} already exists; ids "
                                               "are not reused")
                continue
            self._live_ids.add(op.result)  # live whether the op runs or the worker holds
            try:  # its refusal
                if is_dp_op(op):  # not on the allowlist: duet's own DP statistics
                    self._check_references(op)
                    self._dp_refused.add(op.result)
                    if op.name == TRAIN_OP:  # DP-SGD (duet.dp_train)
                        self._train_jobs.add(op.result, parse_train_op(op, self._derivations))
                    else:
                        self._dp_queries[op.result] = parse_op(op, self._derivations)
                    self._dp_refused.discard(op.result)
                    continue
                self.allowlist.precheck(op)
                self._check_references(op)
                self._check_no_dp_input(op)
            except Exception as exc:  # noqa: BLE001 - any check that cannot judge refuses
                refusals[index] = _refusal(op, str(exc) if isinstance(exc, PolicyViolation)
                                           else "its arguments could not be checked "
                                                f"({type(exc).__name__})")
                self._refused_ids.add(op.result)
                continue
            self._derivations.observe(op)
        if not self._forward(raw, refusals):
            stopped = "the owner's worker is stopped; nothing runs until the owner restarts it"
            refusals = {index: p.OpFailed(result=op.result, operation=op.name,
                                          error_type="Stopped", policy=True, detail=stopped)
                        for index, op in enumerate(message.ops)}
        if refusals:
            self._audit.record_many([("op_refused", {
                "operation": f.operation, "pointer_id": f.result,
                "policy": f.detail}) for f in refusals.values()])
            for refusal in refusals.values():
                self._send(refusal)

    def _check_references(self, op: p.Op) -> None:
        """What the kernel knows without data: which ids the researcher created (and freed),
        what is shared under which name, and the declared kind of a shared target."""
        for ref in _references((op.target, *op.args, *op.kwargs.values()), 0):
            if isinstance(ref, p.StoreRef) and ref.name not in self._families:
                raise PolicyViolation(f"nothing is shared under the name {ref.name!r}")
            if isinstance(ref, p.PointerRef) and ref.id not in self._live_ids:
                raise PolicyViolation(f"object #{ref.id} does not exist (never created, "
                                      "already freed, or from another session)")
            if isinstance(ref, p.PointerRef) and ref.id in self._refused_ids:
                raise PolicyViolation(f"object #{ref.id} does not exist (its operation was "
                                      "refused)")
        if isinstance(op.target, p.StoreRef):
            family = self._families[op.target.name]
            if op.kind == "call" and family != "Module":
                raise PolicyViolation("only torch.nn modules can be called")
            if op.kind in ("method", "getattr"):
                if op.name not in self._summary.members.get(family or "", []):
                    raise PolicyViolation(f"{family or 'this kind of object'}.{op.name} is "
                                          "not on the owner's allowlist")
                if f"{family}.{op.name}" in self._summary.mutating:
                    raise PolicyViolation(
                        f"{family}.{op.name} would modify shared object {op.target.name!r}; "
                        "the owner's data cannot change. Work on a copy")

    def _check_no_dp_input(self, op: p.Op) -> None:
        """A DP query is read only by a request (which charges it): never by an operation."""
        for ref in _references([op.target, *op.args, *op.kwargs.values()], 0):
            if isinstance(ref, p.PointerRef) and (ref.id in self._dp_queries
                                                  or ref.id in self._dp_refused):
                self._dp_refused.add(op.result)  # a request for it is answered at once
                raise PolicyViolation("a DP statistic is not an input to other operations: "
                                      "ask for its value with .get(reason)")

    def _on_request(self, message: p.RequestValue, raw: Encoded) -> None:
        if message.request_id in self._request_ids:  # ever: a decided one's too
            raise ProtocolError(f"request id {message.request_id!r} was already used")
        self._request_ids.add(message.request_id)
        target = message.target
        if isinstance(target, p.PointerRef) and target.id in self._dp_refused:
            self._audit.record("request", request_id=message.request_id, reason=message.reason,
                               refused="its DP statistic was refused")
            self._answer_error(message.request_id, "its DP statistic was refused")
            return
        query: QuerySpec | TrainSpec | None = (
            self._dp_queries.get(target.id) if isinstance(target, p.PointerRef) else None)
        if isinstance(target, p.PointerRef):
            try:  # a training job: its start pays (below), its result only once paid
                phase = self._train_jobs.request(target.id, message.request_id)
            except RequestError as exc:
                self._audit.record("request", request_id=message.request_id,
                                   reason=message.reason, refused=str(exc))
                self._answer_error(message.request_id, str(exc))
                return
            if phase == "start":
                query = self._train_jobs.spec(target.id)
        if query is not None:  # a DP statistic: its cost is reserved before it is computed
            epsilon, delta = query.cost
            try:
                self._dp_reserve(message.request_id, query.source, epsilon, delta,
                                 query.lineage)
            except PrivacyBudgetExceeded as exc:
                self._train_given_up(message.request_id)  # refused before anything ran
                self._audit.record("request", request_id=message.request_id,
                                   reason=message.reason, refused=str(exc),
                                   lineage=query.lineage, sources=[query.source])
                if self.connected:
                    self._send(p.Decision(request_id=message.request_id, status="over_budget",
                                          reason=str(exc), budget=query.source))
                return
            except (KeyError, ValueError) as exc:  # no budget under that name any more
                self._train_given_up(message.request_id)
                self._answer_error(message.request_id, f"no privacy budget: {exc}")
                return
        self._reasons[message.request_id] = message.reason
        if not self._forward(raw):
            self._train_given_up(message.request_id)
            self._dp_settle(message.request_id, False)
            self._reasons.pop(message.request_id, None)
            self._audit.record("request", request_id=message.request_id, reason=message.reason,
                              refused="the owner's worker is stopped")
            self._answer_error(message.request_id, "the owner's worker is stopped")

    def _answer_error(self, request_id: str, reason: str) -> None:
        if self.connected:
            self._send(p.Decision(request_id=request_id, status="error", reason=reason))

    # -- decisions ------------------------------------------------------------------------
    def _send_decision(self, request: Request) -> None:
        """Called by the queue with the decision made; audit first, then send."""
        if not self.connected:
            raise RequestError(f"the researcher has left; nothing was sent for {request.id}")
        self._settle_privacy(request, snapshot_failed=bool(request.failed))
        snapshot, encoded = self._snapshots.pop(request.id, (None, None))
        with self._rows_lock:  # the request's row, wherever it is now, goes before
            row = self._request_rows.pop(request.id, None)
            held, self._held_rows = self._held_rows, []
        decision: dict[str, Any] = {
            "request_id": request.id, "status": request.status, "by": request.decided_by,
            "reason": request.decision_reason, "check_status": request.check_status}
        if request.decided_by.startswith("rule:"):  # an automatic decision: on what grounds
            decision["checks"] = [c.to_dict() for c in request.checks]
        decided = [*held, *([row] if row is not None else []),
                   ("decision", decision)]
        if request.status != "approved" or snapshot is None:
            self._audit.record_many(decided)
            self._send(p.Decision(request_id=request.id, status="denied",
                                  reason=request.decision_reason))
            self._drop(request.id)
            return
        if snapshot.failed:
            self._audit.record_many(decided)
            self._send(p.Decision(request_id=request.id, status="failed",
                                  operation=snapshot.operation, error_type=snapshot.error_type,
                                  reason=snapshot.hint))
            return
        if encoded is not None:  # one synced transaction: the decision, then what is sent
            self._send_value(request, encoded, decided)
            return
        self._audit.record_many(decided, sync=False)
        with self._worker_lock:
            worker = self._worker
            if worker is not None:
                self._awaiting_release[request.id] = request
                worker.submit("release", answered=False, request_id=request.id)
        if worker is None:
            self._answer_error(request.id, "the owner's worker stopped; ask again")

    def _settle_privacy(self, request: Request, *, snapshot_failed: bool) -> None:
        """Before anything is sent: a DP release's reservation becomes spent (approved) or
        is given back; an approved exact value of DP data spends the whole budget."""
        if self._train_settled(request, snapshot_failed):
            return
        privacy = request.dp
        if privacy is None:
            return
        approved = request.status == "approved"
        if privacy.kind == "dp":
            spent = approved and not snapshot_failed
            if self._dp_settle(request.id, spent) is None and spent:
                self._withdrawn_meanwhile(request)
        elif approved:
            for name in privacy.sources:
                self.ledger.record_unbounded(
                    name, f"{self.session_id}:{request.id}:{secrets.token_hex(8)}",
                    f"{request.lineage} (request {request.id})")
                self._audit.record("dp_charge", request_id=request.id, name=name,
                                   status="unbounded", lineage=request.lineage)

    # -- DP-SGD (duet.dp_train): a start that pays, then the parameters ----------------------
    def _train_result_privacy(self, snapshot: Snapshot, start_id: str) -> DPInfo | None:
        """The parameters of a DP-SGD run whose start the owner approved: the reservation
        made for the start pays, and the accountant's epsilon may not claim more. A failed
        run is no DP release: its reservation goes back and the failure is the owner's."""
        with self._dp_lock:
            reserved = self._dp_reserved.get(start_id)
        if reserved is None:
            raise RequestError("the training's budget reservation is gone; nothing was sent")
        name, epsilon, delta, _ = reserved
        quote = snapshot.dp
        if snapshot.failed or quote is None:
            self._dp_settle(start_id, False)
            return DPInfo("exact", (name,))
        if (quote.statistic != "train" or quote.source != name
                or quote.epsilon > epsilon * (1 + 1e-9) or quote.delta > delta * (1 + 1e-9)):
            self._dp_settle(start_id, False)
            self._worker_misbehaved("a DP training quote that does not match its reservation")
            raise RequestError("the DP training could not be released; nothing was charged")
        left = self.ledger.budget(name).epsilon_left + (epsilon - quote.epsilon)
        return DPInfo("dp", (name,), quote.epsilon, quote.delta, quote.mechanism, quote.scale,
                      quote.accuracy, left)

    def _train_settled(self, request: Request, snapshot_failed: bool) -> bool:
        """Ledger and job state for a training request's decision; True when handled.

        An approved start keeps its reservation (counted as spent) until the parameters
        leave; then the accountant's epsilon is what is spent. Anything else gives it back."""
        dp_release = request.dp is not None and request.dp.kind == "dp" and not snapshot_failed
        approved = request.status == "approved"
        if self._train_jobs.is_start(request.id):
            self._train_jobs.decided(request.id, approved and dp_release)
            return approved and dp_release
        started = self._train_jobs.start_of(request.id)
        if started is None or not dp_release:
            return False
        self._train_jobs.decided(request.id, approved)
        assert request.dp is not None
        if self._dp_settle(started[0], approved, epsilon=request.dp.epsilon,
                           delta=request.dp.delta) is None and approved:
            self._withdrawn_meanwhile(request)
        return True

    def _withdrawn_meanwhile(self, request: Request) -> NoReturn:
        """A DP release approved without its reservation: the researcher withdrew it while
        its value was on the way (the reservation went back then). Nothing leaves uncharged.
        """
        self._snapshots.pop(request.id, None)
        self._drop(request.id)
        raise Withdrawn(f"request {request.id} was withdrawn by the researcher; nothing was "
                        "sent or charged")

    def _release_trained(self, request: Request) -> None:
        """DP-SGD parameters: the owner approved their cost with the start. (The owner, or a
        rule, may have decided them a moment earlier: then that decision stands.)"""
        try:
            self.requests.decide(request, "approved", by="dp.train start")
        except RequestError as exc:
            if request.status == "pending":  # not decided elsewhere: a real failure
                raise
            log.debug("parameters of %s were decided meanwhile: %s", request.id, exc)

    def _train_given_up(self, request_id: str) -> None:
        """A training request that was refused or withdrawn before its decision."""
        started = self._train_jobs.start_of(request_id)
        self._train_jobs.decided(request_id, False)
        if started is not None:
            self._dp_settle(started[0], False)

    def _send_value(self, request: Request, encoded: Encoded,
                    decided: list[tuple[str, dict[str, Any]]] | None = None) -> None:
        """Send the frozen bytes, only if they are exactly what the owner saw hashed."""
        header, buffers = encoded
        digest = sha256_of([header, *buffers])
        before = decided or []
        if digest != request.sha256:
            self._audit.record_many(before)
            self._audit.record("protocol_error", request_id=request.id,
                               message="released bytes do not match the snapshot's hash; "
                               "nothing was sent")
            self._answer_error(request.id, "the value could not be released")
            self._worker_misbehaved("released bytes that do not match their snapshot")
            return
        self._audit.record_many([*before, ("value_sent", {
            "request_id": request.id, "nbytes": len(header) + sum(b.nbytes for b in buffers),
            "sha256": digest})])
        self._send((header, buffers))

    def _drop(self, request_id: str) -> None:
        with self._worker_lock:
            if self._worker is not None:
                self._worker.submit("drop", answered=False, request_id=request_id)

    def _rule_failed(self, rule: Rule, request: Request, error: Exception) -> None:
        self._audit.record("rule_error", request_id=request.id,
                          rule=str(rule), error=repr(error))

    def _record_protocol_error(self, message: str) -> None:
        self._audit.record("protocol_error", message=message)

    def _peer_gone(self, reason: str) -> None:
        self.requests.close("the researcher has left")
        self._audit.record("disconnect", reason=reason)

    async def _close_signaling(self) -> None:
        if self._signaling is not None:
            await self._signaling.close()

    def _before_close(self) -> None:
        with self._worker_lock:
            self._stopping = True
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill("the session was closed", crashed=False)
            worker.wait_exited(10)  # its reader has written what it held

    def _on_closed(self) -> None:
        self.worker_quiet()
        self.requests.close("the session is closed")
        if self._ledger is not None:
            self._dp_release_all()  # undecided: nothing left
            self._ledger.close()
        for _, _, sealed in self._share_messages.values():
            if sealed is not None:
                sealed.close()
        self._audit.record("session_closed")
        self.audit.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else ("closed" if self._closed else "waiting")
        return (f"<OwnerSession {state}, {len(self._shared)} shared, "
                f"{len(self.requests.pending)} pending requests; join with: {self.join_line}>")

    def _repr_html_(self) -> str:
        state = "connected" if self.connected else (
            "closed" if self._closed else "waiting for the researcher")
        return (f"<p><b>duet owner session</b> ({state})</p><p>The researcher runs:</p>"
                f"<pre>{html.escape(safe_text(self.join_line))}</pre>")


_LEAVES = (int, float, str, bool, bytes, type(None), p.DTypeRef, p.ArrayRef)


def _references(values: Iterable[Any], depth: int) -> list[p.PointerRef | p.StoreRef]:
    """Every reference among an operation's arguments; arguments nested deeper than the
    executor follows are refused here, at once (the names alone decide it)."""
    found: list[p.PointerRef | p.StoreRef] = []
    for value in values:
        if isinstance(value, _LEAVES):
            continue
        if isinstance(value, (p.PointerRef, p.StoreRef)):
            found.append(value)
            continue
        if depth >= p.MAX_VALUE_DEPTH and (isinstance(value, slice) or (
                isinstance(value, (list, tuple, dict)) and value)):
            # the executor would refuse the items inside, whatever the data
            raise PolicyViolation("arguments are nested too deeply")
        if isinstance(value, (list, tuple)):
            found.extend(_references(value, depth + 1))
        elif isinstance(value, dict):
            found.extend(_references(value.values(), depth + 1))
        elif isinstance(value, slice):
            found.extend(_references((value.start, value.stop, value.step), depth + 1))
    return found


def _check_shareable(obj: Any, depth: int) -> None:
    """Refuse what could hand the worker writable memory or code: buffer-protocol objects,
    subclasses of containers, arbitrary classes. Arrays, tensors, torch modules, scalars,
    and plain lists, tuples and dicts of them are fine."""
    if depth > p.MAX_VALUE_DEPTH:
        raise ValueError("the shared object is nested too deeply")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("cannot share an array of Python objects")
        return
    if depth == 0 and tables.is_pandas_object(obj):
        tables.check(obj)  # a DataFrame or Series, not a subclass; refuses with the reason
        return
    if type(obj) in (list, tuple):
        for item in obj:
            _check_shareable(item, depth + 1)
        return
    if type(obj) in (dict, OrderedDict):
        for key, item in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError("shared dicts need str or int keys")
            _check_shareable(item, depth + 1)
        return
    if isinstance(obj, _SCALARS) and type(obj).__module__ in ("builtins", "numpy"):
        return
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return
    if torch is not None and isinstance(obj, torch.nn.Module):
        local = [type(m).__name__ for m in obj.modules() if type(m).__module__ == "__main__"]
        if local:
            raise TypeError(f"cannot share a model built from classes defined in the notebook "
                            f"({', '.join(local)}): the worker cannot import them. Define them "
                            "in a module file, or share the model's state_dict()")
        return
    raise TypeError(f"cannot share a {type(obj).__module__}.{type(obj).__name__}: share numpy "
                    "arrays, torch tensors or modules, pandas DataFrames or Series, numbers, "
                    "strings, or plain lists, tuples and dicts of these")


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


def _refusal(op: p.Op, detail: str) -> p.OpFailed:
    return p.OpFailed(result=op.result, operation=op.name, error_type="PolicyViolation",
                      policy=True, detail=detail)
