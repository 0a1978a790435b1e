"""The owner's approval panel: pending requests with Approve / Deny buttons, live.

The panel listens to ``RequestQueue.on_change``, which fires on the session's threads, so
rows appear while the kernel is idle (ipykernel sends widget updates from any thread).
Deciding goes through ``Request.approve()`` / ``.deny()``, exactly like code or the magics.
Where ipywidgets is not installed, ``approval_panel`` returns a static HTML view instead and
the owner decides with ``%duet approve ID`` / ``%duet deny ID REASON``.
"""

from __future__ import annotations

import html
import importlib.util
import threading
import weakref
from typing import Any

from duet.approvals import SHOWN_PENDING, Request, RequestQueue, check_badge
from duet.errors import DuetError

from .display import _STATUS_COLOURS, _text, request_html

__all__ = ["ApprovalPanel", "RequestsFallback", "approval_panel", "widgets_available"]

RECENT = 5  # decided requests kept in view, newest first
# Pending requests with controls in view, oldest first: as many as ``s.requests`` draws. A
# researcher can send thousands of requests: one row each made every refresh (which runs on
# the session's thread) cost more with every arrival, and the browser drew them all. The
# header counts the rest.
SHOWN = SHOWN_PENDING


def widgets_available() -> bool:
    try:
        return importlib.util.find_spec("ipywidgets") is not None
    except ValueError:  # sys.modules["ipywidgets"] is None: deliberately disabled
        return False


class RequestsFallback:
    """What the panel shows without ipywidgets: the queue as HTML, and how to decide."""

    def __init__(self, queue: RequestQueue) -> None:
        self.queue = queue

    def _repr_html_(self) -> str:
        pending = self.queue.pending
        more = f"; the oldest {SHOWN} below" if len(pending) > SHOWN else ""
        return (f"<p><b>duet approval queue</b>: {len(pending)} pending{more} "
                "(ipywidgets is not installed: decide with <code>%duet approve ID</code> or "
                "<code>%duet deny ID REASON</code>)</p>"
                + "".join(request_html(r) for r in pending[:SHOWN]) + self.queue._repr_html_())

    def __repr__(self) -> str:
        return repr(self.queue) + "\ndecide with: %duet approve ID  |  %duet deny ID REASON"


class _Row:
    """The widgets of one pending request."""

    def __init__(self, panel: ApprovalPanel, request: Request) -> None:
        import ipywidgets as w

        self.request = request
        self.approve = w.Button(description="Approve", button_style="success",
                                tooltip=f"send this value to the researcher ({request.id})")
        self.reason = w.Text(placeholder="reason for denying (the researcher sees it)",
                             layout=w.Layout(width="24em"))
        self.deny = w.Button(description="Deny", button_style="danger",
                             tooltip=f"refuse request {request.id}")
        self.approve.on_click(lambda _: panel._decide(self, approve=True))
        self.deny.on_click(lambda _: panel._decide(self, approve=False))
        for widget, name in ((self.approve, "approve"), (self.reason, "reason"),
                             (self.deny, "deny")):
            widget.add_class(f"duet-{name}")
        self.box = w.VBox([w.HTML(request_html(request)),
                           w.HBox([self.approve, self.reason, self.deny])])
        self.box.add_class("duet-row")

    def freeze(self) -> None:
        """Disable the controls at once: a second click must not decide twice."""
        for widget in (self.approve, self.reason, self.deny):
            widget.disabled = True

    def close(self) -> None:
        for widget in (self.approve, self.reason, self.deny, *self.box.children, self.box):
            widget.close()


def _decided_html(request: Request) -> str:
    """One line per decided request, below the pending ones; lineage wrapped, never cut.
    Researcher-written text is escaped like in ``request_html`` (HTML, and control, bidi
    or invisible characters)."""
    colour = _STATUS_COLOURS.get(request.status, "inherit")
    why = f": {request.decision_reason}" if request.decision_reason else ""
    return (f'<div class="duet-decided" data-request-id="{_text(request.id)}" '
            f'data-status="{_text(request.status)}" style="margin:2px 0">'
            f'<b style="color:{colour}">{_text(request.status)}</b> '
            f"<code>{_text(request.id)}</code> checks {check_badge(request.check_status)} "
            f'<code style="white-space:pre-wrap;overflow-wrap:anywhere">'
            f"{_text(request.lineage)}</code> "
            f"by {_text(request.decided_by)}{_text(why)}</div>")


class ApprovalPanel:
    """A live list of the pending requests of one queue; display it like any widget."""

    def __init__(self, queue: RequestQueue) -> None:
        import ipywidgets as w

        self.queue = queue
        self._lock = threading.RLock()
        self._rows: dict[str, _Row] = {}
        self._header = w.HTML()
        self._message = w.HTML()
        self._recent = w.HTML()
        self.widget = w.VBox([self._header, self._message, self._recent])
        self.widget.add_class("duet-panel")
        queue.on_change(self._on_change)
        self.refresh()

    def controls(self, request_id: str) -> tuple[Any, Any, Any]:
        """The (Approve button, reason text, Deny button) of a pending request."""
        with self._lock:
            row = self._rows[request_id]
            return row.approve, row.reason, row.deny

    def refresh(self) -> None:
        """Bring the rows in line with the queue (thread-safe; called on every change)."""
        with self._lock:
            pending = self.queue.pending
            shown = pending[:SHOWN]
            ids = {r.id for r in shown}
            for request_id in [i for i in self._rows if i not in ids]:
                self._rows.pop(request_id).close()
            for request in shown:
                if request.id not in self._rows:
                    self._rows[request.id] = _Row(self, request)
            closed = self.queue.closed_reason
            hidden = len(pending) - len(shown)
            self._header.value = (
                f"<b>duet approval panel</b>: {len(pending)} pending"
                + (f" (the oldest {len(shown)} below; {hidden} more wait behind them)"
                   if hidden else "")
                + (f", {len(self.queue) - len(pending)} decided" if len(self.queue) > len(pending)
                   else "")
                + (f" &mdash; <i>{html.escape(closed)}; nothing more can be sent</i>"
                   if closed else ""))
            decided = [r for r in self.queue if r.status != "pending"][-RECENT:][::-1]
            self._recent.value = (
                '<div style="margin-top:6px;opacity:0.8"><b>decided</b>, newest first</div>'
                + "".join(_decided_html(r) for r in decided)) if decided else ""
            self.widget.children = [self._header, self._message,
                                    *(row.box for row in self._rows.values()), self._recent]

    def _on_change(self, _request: Request) -> None:
        self.refresh()

    def _decide(self, row: _Row, *, approve: bool) -> None:
        """A click: decide, and say what happened (errors too: a click has no traceback)."""
        request = row.request
        row.freeze()
        try:
            if approve:
                request.approve()
            else:
                request.deny(row.reason.value)
        except DuetError as exc:
            self._message.value = (f'<span style="color:#c62828">request {html.escape(request.id)}'
                                   f": {html.escape(str(exc))}</span>")
        else:
            verb = "approved" if approve else "denied"
            self._message.value = f"last click: {verb} <code>{html.escape(request.id)}</code>"
        self.refresh()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


_panels: weakref.WeakKeyDictionary[RequestQueue, ApprovalPanel] = weakref.WeakKeyDictionary()
_panels_lock = threading.Lock()


def approval_panel(queue: RequestQueue) -> ApprovalPanel | RequestsFallback:
    """The queue's one live panel (displaying it twice shows two synced views), or HTML."""
    if not widgets_available():
        return RequestsFallback(queue)
    with _panels_lock:
        panel = _panels.get(queue)
        if panel is None:
            panel = _panels[queue] = ApprovalPanel(queue)
        return panel
