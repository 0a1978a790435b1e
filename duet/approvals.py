"""The owner's approval queue: results leave only through a request the owner approved.

``RequestQueue`` holds every request of a session, pending and decided. The owner decides by
hand (``Request.approve()`` / ``.deny(reason)``, the widgets, the magics) or by rules
(``add_rule``) that decide automatically and are recorded like manual decisions. Deciding is
done here; sending the value, and writing the audit log before it leaves, is the session's.
"""

from __future__ import annotations

import html
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, overload

from tabulate import tabulate

from .checks import Check, worst
from .checks import Status as CheckStatus
from .errors import RequestError
from .screen import safe_text

log = logging.getLogger(__name__)

__all__ = ["CHECK_COLOURS", "DPInfo", "Request", "RequestQueue", "Rule", "ValueInfo", "Withdrawn",
           "check_badge", "checks_summary"]

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
    checks: CheckStatus | None = None
    dp_within_budget: bool | None = None

    def matches(self, request: Request) -> bool:
        if self.checks is not None and request.check_status != self.checks:
            return False
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
                               ("max_elements", self.max_elements), ("checks", self.checks),
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
    # disclosure checks computed where the data is, on the frozen value (duet.checks)
    checks: tuple[Check, ...] = ()
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
    def check_status(self) -> CheckStatus:
        """The worst of ``checks``: "pass" only when every check passed; "review" when
        there are none or one could not decide."""
        return worst(self.checks)

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
        # duet's facts first, then what the researcher wrote, quoted: a lineage cannot end
        # early and write fake facts of its own (a string argument cut short loses its quote)
        return safe_text(f"<Request {self.id} {self.status} ({self.info.type}, "
                         f"{self.info.nbytes} bytes; sources: {sources}{privacy}; checks: "
                         f"{self.check_status}) lineage={self.lineage!r} "
                         f"reason={self.reason!r}>")

    def checks_text(self) -> str:
        """One line per check, status in words, for a terminal."""
        if not self.checks:
            return "  REVIEW  checks: none were computed"
        return "\n".join(safe_text(f"  {c.status.upper():6}  {c.name}: {c.reason}")
                         for c in self.checks)


Decider = Callable[[Request], None]


class Withdrawn(RequestError):
    """Raised by the queue's decider when the request turns out to be withdrawn while it
    was being decided: it ends withdrawn, not open to decide again."""


class RequestQueue(Sequence[Request]):
    """Every request of a session in arrival order; thread-safe."""

    def __init__(self, on_decided: Decider,
                 on_rule_error: Callable[[Rule, Request, Exception], None] | None = None
                 ) -> None:
        self._requests: list[Request] = []
        self._by_id: dict[str, Request] = {}
        # ids of requests whose rules have not run yet: not pending for ``wait`` or the owner,
        # so a hand (or a loop over ``wait()``) never decides what a rule is about to decide
        self._arriving: set[str] = set()
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
            return [r for r in self._requests
                    if r.status == "pending" and r.id not in self._arriving]

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
                 apply_to_pending: bool = True, checks: CheckStatus | None = None,
                 dp_within_budget: bool | None = None) -> Rule:
        """Decide matching requests automatically, e.g. ``add_rule("approve", max_elements=1)``.

        ``name``: for "deny", the value derives from this shared object (among others); for
        "approve", from this shared object and no other; ``lineage``: a regular expression
        searched in the lineage; ``max_elements``: at most this many elements; ``checks``:
        the request's ``check_status`` is this ("pass" to approve what every disclosure check
        passed, "fail" or "review" to deny); ``predicate``: any test of the ``Request``;
        ``dp_within_budget=True``: differentially private requests whose cost fits the budget
        (it is reserved before they reach the queue; one that would not fit is refused before
        anything is computed). Approve rules never match an exact release of DP-protected
        data (unbounded privacy loss): only the owner approves those, by hand. Rules apply in
        the order added; the first match decides.
        """
        if action not in ("approve", "deny"):
            raise ValueError("action must be 'approve' or 'deny'")
        if checks not in (None, "pass", "fail", "review"):
            raise ValueError("checks must be 'pass', 'fail' or 'review'")
        if action == "approve" and checks not in (None, "pass"):
            raise ValueError(f"an approve rule with checks={checks!r} would release values "
                             "the disclosure checks did not clear; use checks='pass'")
        if lineage is not None:
            re.compile(lineage)
        if not reason and checks is not None and action == "deny":
            reason = ("the owner's disclosure checks did not clear this value"
                      if checks == "review" else "the value failed the owner's disclosure checks")
        rule = Rule(next(self._rule_ids), action, name, lineage, max_elements, predicate, reason,
                    checks, dp_within_budget)
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
            self._arriving.add(request.id)
        try:
            self._apply_rules(request)
        finally:
            with self._arrived:
                self._arriving.discard(request.id)
                self._arrived.notify_all()
        self._notify(request)

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
                reason = rule.reason
                if rule.checks is not None and rule.action == "deny":
                    # the names of the checks, never their evidence: counts are data
                    named = [c.name for c in request.checks if c.status == rule.checks]
                    reason = f"{reason} ({', '.join(named)})" if named else reason
                try:
                    self.decide(request, "approved" if rule.action == "approve" else "denied",
                                by=f"rule:{rule.id}", reason=reason)
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
        except Withdrawn as exc:
            with self._lock:
                request.status, request.decided_by, request.decided_at = "withdrawn", "", None
                request.decision_reason = str(exc)
            self._notify(request)
            raise
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
    def _shown(self) -> tuple[list[Request], str]:
        """What a display draws: the oldest ``SHOWN_PENDING`` pending requests (the ones to
        decide next) and the newest ``SHOWN_DECIDED`` others, in arrival order; and a line
        saying what it left out. A flood of requests must not become a flood of rows."""
        with self._lock:
            requests = list(self._requests)
            pending = self.pending
        waiting = {id(r) for r in pending}
        others = [r for r in requests if id(r) not in waiting]
        chosen = {id(r) for r in (*pending[:SHOWN_PENDING], *others[-SHOWN_DECIDED:])}
        shown = [r for r in requests if id(r) in chosen]
        left = len(requests) - len(shown)
        note = (f"{left} not shown (drawn: the oldest {SHOWN_PENDING} pending, the newest "
                f"{SHOWN_DECIDED} others); every one is in s.requests: s.requests.get(id), "
                "s.requests.pending, list(s.requests)") if left else ""
        return shown, note

    def _rows(self, requests: list[Request]) -> list[list[str]]:
        rows = []
        for r in requests:
            rows.append([safe_text(cell) for cell in (
                r.id, time.strftime("%H:%M:%S", time.localtime(r.created)), r.status,
                checks_summary(r),
                r.lineage if len(r.lineage) < 60 else r.lineage[:59] + "…",
                ", ".join(sorted(r.sources)) or "-",
                r.info.type + ("" if r.info.shape is None else str(list(r.info.shape))),
                str(r.info.nbytes), r.reason[:80], r.preview.replace("\n", " ")[:40],
                "-" if r.dp is None else r.dp.summary(),
            )])
        return rows

    _HEADERS = ["id", "time", "status", "checks", "lineage", "sources", "type", "bytes",
                "reason", "preview", "privacy"]

    def __repr__(self) -> str:
        if not len(self):
            return "RequestQueue: no requests yet"
        shown, note = self._shown()
        table = tabulate(self._rows(shown), headers=self._HEADERS)
        lines = [f"RequestQueue: {len(self)} requests, {len(self.pending)} pending", table]
        if note:
            lines.append(note)
        for r in shown:
            if r.status == "pending":
                lines.append(safe_text(f"checks of {r.id} ({r.check_status.upper()}):"))
                lines.append(r.checks_text())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        if not len(self):
            return "<p><b>duet requests</b>: none yet</p>"
        shown, note = self._shown()
        rows = [[html.escape(cell) for cell in row] for row in self._rows(shown)]
        column = self._HEADERS.index("checks")
        for row, request in zip(rows, shown, strict=True):
            row[column] = check_badge(request.check_status) + " " + row[column]
        table = tabulate(rows, self._HEADERS, tablefmt="unsafehtml", disable_numparse=True)
        left = f"<p>{html.escape(note)}</p>" if note else ""
        return (f"<p><b>duet requests</b>: {len(self)}, {len(self.pending)} pending</p>"
                f"{table}{left}")


# How many requests ``s.requests`` draws: the next to decide, and the latest decided.
SHOWN_PENDING = 20
SHOWN_DECIDED = 30

CHECK_COLOURS = {"pass": "#2e7d32", "review": "#b58900", "fail": "#c62828"}
CHECK_WORDS = {"pass": "PASS", "review": "REVIEW", "fail": "FAIL"}


def check_badge(status: str) -> str:
    """A check status as HTML: the word in capitals, coloured (never colour alone)."""
    colour = CHECK_COLOURS.get(status, "inherit")
    word = CHECK_WORDS.get(status, html.escape(status.upper()))
    return (f'<b class="duet-check duet-check-{html.escape(status)}" '
            f'style="color:{colour}">{word}</b>')


def checks_summary(request: Request) -> str:
    """The status in words, and the checks that did not pass, for one table cell."""
    status = request.check_status
    others = [c.name for c in request.checks if c.status != "pass"]
    if not request.checks:
        return "review: no checks"
    return status + (f": {', '.join(others)}" if others else "")


if TYPE_CHECKING:  # keep the Sequence protocol honest for mypy
    _: Sequence[Request] = RequestQueue(lambda r: None)
