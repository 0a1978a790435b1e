"""Rich notebook displays for the duet objects that have none of their own.

The store, the request queue, pointers and the owner's session render themselves
(``_repr_html_`` in duet); a single ``Request`` and the researcher's session do not, so they
are registered here as IPython formatters, which keeps the library free of notebook code.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from duet import OwnerSession, ResearcherSession
from duet.approvals import Request, check_badge
from duet.screen import safe_text
from duet.session import Session

__all__ = ["checks_html", "preview_html", "register_formatters", "request_html",
           "researcher_html", "session_state"]

_STATUS_COLOURS = {"pending": "#b58900", "approved": "#2e7d32", "denied": "#c62828",
                   "withdrawn": "#757575"}


def session_state(session: Session) -> str:
    """A person's word for where the session stands, from public attributes only."""
    if session.connected:
        return "connected"
    if isinstance(session, OwnerSession):
        return session.requests.closed_reason or "waiting for the researcher"
    return "disconnected"


def request_html(request: Request) -> str:
    """One request as the owner needs it to decide: who asks why, for what, what it is, and
    every shared object it comes from. Researcher-written text is escaped twice over: HTML, and
    control or bidirectional characters (``safe_text``); long lineage wraps, never cut."""
    colour = _STATUS_COLOURS.get(request.status, "inherit")
    shape = "" if request.shape is None else f", shape {list(request.shape)}"
    decided = ""
    if request.status in ("approved", "denied", "withdrawn"):
        why = f": {request.decision_reason}" if request.decision_reason else ""
        decided = f" by {_text(request.decided_by)}{_text(why)}" if request.decided_by else (
            _text(why))
    created = time.strftime("%H:%M:%S", time.localtime(request.created))
    sources = ", ".join(sorted(request.sources)) or "none (no shared data)"
    value = ("<b style='color:#c62828'>computing it failed</b> (approving tells the "
             "researcher only which operation failed, and how)" if request.failed else
             f"{_text(request.type)}{_text(shape)}, {request.nbytes:,} bytes")
    return (
        f'<div class="duet-request" style="border-left:3px solid {colour};padding-left:8px;'
        f'margin:4px 0">'
        f"<b>request <code>{_text(request.id)}</code></b> at {created} "
        f'<span style="color:{colour}"><b>{_text(request.status)}</b></span>{decided}<br>'
        f"<b>reason:</b> {_text(request.reason) or '<i>none given</i>'}<br>"
        f"<b>sources:</b> {_text(sources)}<br>"
        f'<b>lineage:</b> <code style="white-space:pre-wrap;word-break:break-all">'
        f"{_text(request.lineage)}</code><br>"
        f"{_privacy_html(request)}"
        f"<b>value:</b> {value}<br>"
        f"{checks_html(request)}"
        f'<pre style="margin:2px 0;max-height:10em;overflow:auto;white-space:pre-wrap">'
        f"{preview_html(request)}</pre></div>"
    )


def preview_html(request: Request) -> str:
    """The preview as the lines it is made of: a table or an array reads as rows, not as
    one run of ``\\n``, which would look exactly like a label that holds a written ``\\n``
    and so let a label fake rows. Its line breaks are duet's and pandas' (``preview_of``
    writes researcher text escaped); the text of a failure is not, so it stays on one line.
    """
    if request.failed:
        return _text(request.preview)
    return "\n".join(_text(line) for line in request.preview.split("\n"))


def checks_html(request: Request) -> str:
    """The disclosure checks: the overall status, then one line per check with its reason;
    each status is a coloured word, so it reads without colour too. The evidence is in a
    tooltip (JSON) and in ``request.checks``."""
    lines = "".join(
        f'<li class="duet-check-line" data-check="{_text(c.name)}" '
        f'data-status="{_text(c.status)}" title="{_text(json.dumps(c.evidence)[:2000])}">'
        f"{check_badge(c.status)} <code>{_text(c.name)}</code>: {_text(c.reason)}</li>"
        for c in request.checks)
    if not lines:
        lines = f"<li>{check_badge('review')} no checks were computed</li>"
    return (f'<div class="duet-checks" data-check-status="{_text(request.check_status)}">'
            f"<b>disclosure checks:</b> {check_badge(request.check_status)}"
            f'<ul style="margin:2px 0 2px 1em;padding:0">{lines}</ul></div>')


def _privacy_html(request: Request) -> str:
    """The privacy budget line: a DP release's mechanism, epsilon, noise, accuracy and the
    budget left after it; or, in red and in words, that an exact value of DP data would
    spend the whole budget."""
    dp = request.dp
    if dp is None:
        return ""
    if dp.kind == "exact":
        return ('<b>privacy:</b> <b style="color:#c62828">EXACT release of DP-protected '
                f"{_text(', '.join(dp.sources))}</b>: approving records unbounded privacy loss "
                "(nothing is left of the budget afterwards)<br>")
    delta = f", δ={dp.delta:.3g}" if dp.delta else ""
    return (f'<b>privacy:</b> <b style="color:#2e7d32">differentially private</b> '
            f"ε={dp.epsilon:.4g}{delta} of {_text(', '.join(dp.sources))}; "
            f"{_text(dp.mechanism)}; noise scale {_text(dp.scale)}; "
            f"95% accuracy {_text(dp.accuracy)}; budget left after: ε={dp.epsilon_left:.4g}<br>")


def _text(text: str) -> str:
    """Researcher-written text, safe to put in HTML text or a quoted attribute."""
    return html.escape(safe_text(text))


def researcher_html(session: ResearcherSession) -> str:
    return (f"<p><b>duet researcher session</b> ({session_state(session)})</p>"
            + session.store._repr_html_())


def register_formatters(ip: Any) -> None:
    """Teach this IPython's HTML formatter about ``Request`` and ``ResearcherSession``."""
    formatter = ip.display_formatter.formatters["text/html"]
    formatter.for_type(Request, request_html)
    formatter.for_type(ResearcherSession, researcher_html)
