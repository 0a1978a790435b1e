"""The owner's approval queue: results leave only through a request the owner approved.

``RequestQueue`` holds every request of a session, pending and decided. The owner decides by
hand (``Request.approve()`` / ``.deny(reason)``, the widgets, the magics) or by rules
(``add_rule``) that decide automatically and are recorded like manual decisions. Deciding is
done here; sending the value, and writing the audit log before it leaves, is the session's.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, overload

from tabulate import tabulate

from .errors import RequestError

log = logging.getLogger(__name__)

__all__ = ["DPInfo", "Request", "RequestQueue", "Rule", "ValueInfo", "safe_text"]

Status = Literal["pending", "approved", "denied", "withdrawn"]
Action = Literal["approve", "deny"]


@dataclass(frozen=True)
class ValueInfo:
    """What the owner sees of a requested value's size before deciding (from the frozen
    copy; ``elements`` never undercounts)."""

    type: str
    shape: tuple[int, ...] | None
    dtype: str | None
    elements: int
    nbytes: int


@dataclass(frozen=True)
class DPInfo:
    """What a request means for privacy budgets, shown to the owner before deciding.

    ``kind`` "dp": a differentially private release, its cost already reserved in the ledger
    (``epsilon``/``delta``, charged to ``sources``), with the mechanism, noise scale and 95%
    accuracy, and ``epsilon_left`` once it is spent. ``kind`` "exact": the value derives
    from DP-protected data without a DP mechanism; approving it records *unbounded* privacy
    loss for ``sources``, and no rule ever approves it."""

    kind: Literal["dp", "exact"]
    sources: tuple[str, ...]
    epsilon: float = 0.0
    delta: float = 0.0
    mechanism: str = ""
    scale: str = ""
    accuracy: str = ""
    epsilon_left: float = 0.0

    def summary(self) -> str:
        """One line for tables and the panel (words, not colours)."""
        if self.kind == "exact":
            return (f"EXACT release of DP-protected {', '.join(self.sources)}: approving "
                    "spends the whole budget (unbounded loss)")
        delta = f", δ={self.delta:.3g}" if self.delta else ""
        return (f"DP ε={self.epsilon:.4g}{delta}, 95% accuracy {self.accuracy}; "
                f"budget left after: ε={self.epsilon_left:.4g}")


_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")


def safe_text(text: str) -> str:
    """``text`` with control, zero-width and bidirectional-override characters escaped, so
    what the researcher wrote cannot move the cursor, recolour or reorder the owner's screen."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


@dataclass
class Rule:
    """Decides requests automatically; every criterion given must match."""

    id: int
    action: Action
    name: str | None = None
    lineage: str | None = None
    max_elements: int | None = None
    predicate: Callable[[Request], bool] | None = None
    reason: str = ""
    dp_within_budget: bool | None = None

    def matches(self, request: Request) -> bool:
        dp = request.dp
        if self.action == "approve" and dp is not None and dp.kind == "exact":
            return False  # unbounded privacy loss: only the owner, by hand
        if self.dp_within_budget is not None:
            # a DP request reaches the queue only once its cost is reserved: within budget
            if self.dp_within_budget != (dp is not None and dp.kind == "dp"):
                return False
        if self.name is not None:
            # deny: anything derived from the name; approve: only what derives from the name
            # alone (a value mixing in another shared object is that object's data too)
            if self.action == "deny" and self.name not in request.sources:
                return False
            if self.action == "approve" and request.sources != frozenset({self.name}):
                return False
        if self.lineage is not None and not re.search(self.lineage, request.lineage):
            return False
        if self.max_elements is not None and request.info.elements > self.max_elements:
            return False
        return self.predicate is None or bool(self.predicate(request))

    def __str__(self) -> str:
        criteria = [
            f"{key}={value!r}"
            for key, value in (("name", self.name), ("lineage", self.lineage),
                               ("max_elements", self.max_elements),
                               ("dp_within_budget", self.dp_within_budget))
            if value is not None
        ]
        if self.predicate is not None:
            criteria.append(f"predicate={getattr(self.predicate, '__name__', 'callable')}")
        return f"rule {self.id}: {self.action} if {' and '.join(criteria) or 'always'}"


@dataclass(eq=False)
class Request:
    """One researcher request for one value, as the owner sees it.

    Everything here describes the value as it was frozen when the request arrived: that
    copy, and nothing else, is what approving sends. ``sources`` names every shared object
    the value derives from, always complete; ``failed`` holds the error when computing the
    value failed (then approving tells the researcher only the operation and error type)."""

    id: str
    reason: str
    lineage: str
    sources: frozenset[str]
    info: ValueInfo
    preview: str
    sha256: str = ""
    failed: str = ""
    created: float = field(default_factory=time.time)
    status: Status = "pending"
    decided_by: str = ""
    decision_reason: str = ""
    decided_at: float | None = None
    dp: DPInfo | None = None  # privacy budget: a DP release, or an exact one of DP data
    _queue: RequestQueue | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self.info.shape

    @property
    def type(self) -> str:
        return self.info.type

    def approve(self) -> None:
        """Send the value to the researcher."""
        self._require_queue().decide(self, "approved", by="owner")

    def deny(self, reason: str = "") -> None:
        """Refuse; the researcher's ``get`` raises ``RequestDenied`` with ``reason``."""
        self._require_queue().decide(self, "denied", by="owner", reason=reason)

    def _require_queue(self) -> RequestQueue:
        if self._queue is None:
            raise RequestError("this request does not belong to a session")
        return self._queue

    def __repr__(self) -> str:
        sources = ", ".join(sorted(self.sources)) or "none"
        privacy = f"; {self.dp.summary()}" if self.dp is not None else ""
        return safe_text(f"<Request {self.id} {self.status}: {self.lineage} ({self.info.type}, "
                         f"{self.info.nbytes} bytes; sources: {sources}{privacy}) "
                         f"reason={self.reason!r}>")


Decider = Callable[[Request], None]


class RequestQueue(Sequence[Request]):
    """Every request of a session in arrival order; thread-safe."""

    def __init__(self, on_decided: Decider,
                 on_rule_error: Callable[[Rule, Request, Exception], None] | None = None
                 ) -> None:
        self._requests: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self._rules: list[Rule] = []
        self._rule_ids = itertools.count(1)
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._on_decided = on_decided
        self._on_rule_error = on_rule_error
        self._listeners: list[Callable[[Request], None]] = []
        self.closed_reason = ""

    # -- sequence -------------------------------------------------------------------------
    @overload
    def __getitem__(self, index: int) -> Request: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Request]: ...
    def __getitem__(self, index: int | slice) -> Request | Sequence[Request]:
        with self._lock:
            return self._requests[index]

    def __len__(self) -> int:
        with self._lock:
            return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        with self._lock:
            return iter(list(self._requests))

    def get(self, request_id: str) -> Request:
        with self._lock:
            try:
                return self._by_id[request_id]
            except KeyError:
                raise RequestError(f"no request with id {request_id!r}") from None

    @property
    def pending(self) -> list[Request]:
        with self._lock:
            return [r for r in self._requests if r.status == "pending"]

    def wait(self, timeout: float | None = None) -> Request | None:
        """The oldest pending request, waiting up to ``timeout`` seconds for one to arrive."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._arrived:
            while True:
                pending = self.pending
                if pending:
                    return pending[0]
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._arrived.wait(remaining)

    # -- rules ----------------------------------------------------------------------------
    def add_rule(self, action: Action = "approve", name: str | None = None, *,
                 lineage: str | None = None, max_elements: int | None = None,
                 predicate: Callable[[Request], bool] | None = None, reason: str = "",
                 apply_to_pending: bool = True, dp_within_budget: bool | None = None) -> Rule:
        """Decide matching requests automatically, e.g. ``add_rule("approve", max_elements=1)``.

        ``name``: for "deny", the value derives from this shared object (among others); for
        "approve", from this shared object and no other; ``lineage``: a regular expression
        searched in the lineage; ``max_elements``: at most this many elements; ``predicate``:
        any test of the ``Request``; ``dp_within_budget=True``: differentially private
        requests whose cost fits the budget (it is reserved before they reach the queue; one
        that would not fit is refused before anything is computed). Approve rules never
        match an exact release of DP-protected data (unbounded privacy loss): only the owner
        approves those, by hand. Rules apply in the order added; the first match decides.
        """
        if action not in ("approve", "deny"):
            raise ValueError("action must be 'approve' or 'deny'")
        if lineage is not None:
            re.compile(lineage)
        rule = Rule(next(self._rule_ids), action, name, lineage, max_elements, predicate, reason,
                    dp_within_budget)
        with self._lock:
            self._rules.append(rule)
        if apply_to_pending:
            for request in self.pending:
                self._apply_rules(request)
        return rule

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def remove_rule(self, rule: Rule | int) -> None:
        rule_id = rule.id if isinstance(rule, Rule) else rule
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            if len(self._rules) == before:
                raise ValueError(f"no rule with id {rule_id}")

    # -- lifecycle (called by the session) ------------------------------------------------
    def on_change(self, listener: Callable[[Request], None]) -> None:
        """Call ``listener(request)`` whenever a request arrives or is decided (widgets)."""
        self._listeners.append(listener)

    def add(self, request: Request) -> None:
        request._queue = self
        with self._arrived:
            if request.id in self._by_id:
                raise RequestError(f"request id {request.id!r} was already used")
            self._requests.append(request)
            self._by_id[request.id] = request
            self._arrived.notify_all()
        self._notify(request)
        self._apply_rules(request)

    def _apply_rules(self, request: Request) -> None:
        for rule in self.rules:
            try:
                matched = rule.matches(request)
            except Exception as exc:  # a buggy predicate must not take the session down
                log.warning("%s raised on request %s: %r; it does not match", rule, request.id,
                            exc)
                if self._on_rule_error is not None:
                    self._on_rule_error(rule, request, exc)
                matched = False
            if matched:
                try:
                    self.decide(request, "approved" if rule.action == "approve" else "denied",
                                by=f"rule:{rule.id}", reason=rule.reason)
                except RequestError as exc:  # decided meanwhile by hand, or the researcher left
                    log.info("%s did not decide request %s: %s", rule, request.id, exc)
                return

    def decide(self, request: Request, status: Literal["approved", "denied"], *, by: str,
               reason: str = "") -> None:
        with self._lock:
            if self.closed_reason:
                raise RequestError(f"cannot decide request {request.id}: {self.closed_reason}; "
                                   "nothing was sent")
            if request.status != "pending":
                raise RequestError(f"request {request.id} is already {request.status}")
            request.status = status
            request.decided_by = by
            request.decision_reason = reason
            request.decided_at = time.time()
        try:
            self._on_decided(request)
        except BaseException:
            with self._lock:  # nothing left: the request is still open to decide
                request.status, request.decided_by, request.decided_at = "pending", "", None
            raise
        self._notify(request)

    def withdraw(self, request_id: str, reason: str = "withdrawn by the researcher") -> None:
        """The request can no longer be decided (the researcher withdrew it, or its frozen
        value is gone with a restarted worker)."""
        with self._lock:
            request = self._by_id.get(request_id)
            if request is None or request.status != "pending":
                return
            request.status = "withdrawn"
            request.decision_reason = reason
        self._notify(request)

    def close(self, reason: str) -> None:
        """Refuse every later decision, e.g. once the researcher left."""
        with self._arrived:
            self.closed_reason = reason
            self._arrived.notify_all()

    def _notify(self, request: Request) -> None:
        for listener in list(self._listeners):
            try:
                listener(request)
            except Exception:  # a broken display must not break deciding
                log.exception("request listener %r failed", listener)

    # -- display --------------------------------------------------------------------------
    def _rows(self) -> list[list[str]]:
        rows = []
        for r in self:
            rows.append([safe_text(cell) for cell in (
                r.id, time.strftime("%H:%M:%S", time.localtime(r.created)), r.status,
                r.lineage if len(r.lineage) < 60 else r.lineage[:59] + "…",
                ", ".join(sorted(r.sources)) or "-",
                r.info.type + ("" if r.info.shape is None else str(list(r.info.shape))),
                str(r.info.nbytes), r.reason[:80], r.preview.replace("\n", " ")[:40],
                "-" if r.dp is None else r.dp.summary(),
            )])
        return rows

    _HEADERS = ["id", "time", "status", "lineage", "sources", "type", "bytes", "reason",
                "preview", "privacy"]

    def __repr__(self) -> str:
        if not len(self):
            return "RequestQueue: no requests yet"
        pending = len(self.pending)
        table = tabulate(self._rows(), headers=self._HEADERS)
        return f"RequestQueue: {len(self)} requests, {pending} pending\n{table}"

    def _repr_html_(self) -> str:
        if not len(self):
            return "<p><b>duet requests</b>: none yet</p>"
        table = tabulate(self._rows(), self._HEADERS, tablefmt="html", disable_numparse=True)
        return f"<p><b>duet requests</b>: {len(self)}, {len(self.pending)} pending</p>{table}"


if TYPE_CHECKING:  # keep the Sequence protocol honest for mypy
    _: Sequence[Request] = RequestQueue(lambda r: None)
