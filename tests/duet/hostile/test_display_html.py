"""Class 8, in HTML: what the owner's notebook draws cannot be made to lie or run script.

Requests come from a real in-memory session pair (the owner's worker computes lineage,
previews and checks); the owner's views are rendered with the real functions and their
HTML is parsed: only the tags duet writes, no event handlers, researcher text escaped. The
text views (``repr``) are checked for raw control, bidirectional and invisible characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from duet.approvals import SHOWN_DECIDED, SHOWN_PENDING, Request, RequestQueue, ValueInfo
from duet.audit import AuditLog
from duet.owner import OwnerSession
from kernel_ext.display import request_html
from kernel_ext.widgets import SHOWN, ApprovalPanel, RequestsFallback
from tests.helpers.sessions import eventually, session_pair

SCRIPT = "<img src=x onerror=alert(1)>"
# invisible or line-breaking text the earlier escaping let through: tag letters (hidden
# "ASCII smuggling" text), a soft hyphen, a Hangul filler, a stack of combining marks
HIDDEN = "tag\U000e0041\U000e0042 shy\xad filler\u3164 zalgo Z\u0301\u0302\u0303\u0304\u0305"
RAW = re.compile("[\U000e0000-\U000e007f\xad\u3164\u0301-\u0305\u202a-\u202e\x80-\x9f]")
LONG_LABEL = "mean_age" + " " * 30 + "41.2" + " " * 1500  # a made-up value, then padding
REASONS = {
    "newline label": "rows",
    "long label": "a column label that pads",
    "failed": "a failure with a newline",
    "hidden": f"\u202eevil\u202c \x9b31m {HIDDEN} {SCRIPT}",
}
TAGS = {"div", "b", "code", "br", "span", "ul", "li", "pre", "i", "p", "table", "thead",
        "tbody", "tr", "th", "td"}


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text inside <pre> (the preview)."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.pre: list[str] = []
        self._in_pre = False
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        if self._in_pre:
            self.pre[-1] += data


def assert_only_duets_markup(markup: str) -> Tags:
    parsed = Tags(markup)
    assert {tag for tag, _ in parsed.tags} <= TAGS, parsed.tags
    handlers = [(tag, name) for tag, attrs in parsed.tags for name in attrs
                if name.startswith("on") or name in ("src", "href", "srcdoc")]
    assert handlers == []
    assert RAW.findall(markup) == [], RAW.findall(markup)
    return parsed


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnerSession]:
    """One pair for the module; the researcher sends every hostile request at once."""
    audit = tmp_path_factory.mktemp("display_html") / "audit.db"
    with session_pair(audit) as (s, r):
        s.share(pd.DataFrame({"age": np.arange(20) * 3 + 100,
                              "name": [f"n{i}" for i in range(20)]}), name="patients")
        eventually(lambda: "patients" in r.store, timeout=30)
        p = r.store["patients"]
        handles = [
            p.rename(columns={"age": f"a\nFAKE {SCRIPT}"}).request(REASONS["newline label"]),
            p.rename(columns={"age": LONG_LABEL}).request(REASONS["long label"]),
            r.pd.to_datetime("x\nFAKE LINE").request(REASONS["failed"]),
            p["age"].sum().request(REASONS["hidden"]),
        ]
        eventually(lambda: len(s.requests) == len(handles), timeout=120)
        yield s


def request(owner: OwnerSession, key: str) -> Request:
    return next(q for q in owner.requests if q.reason == REASONS[key])


def test_the_html_preview_shows_rows_as_lines_and_a_label_cannot_add_one(
        owner: OwnerSession) -> None:
    """Before: every line break of the preview was drawn as a written ``\\n``, the same as
    a label holding ``\\n``, so the panel showed a table as one run of text in which the
    researcher could write rows of their own."""
    table = request(owner, "newline label")
    [preview] = assert_only_duets_markup(request_html(table)).pre
    lines = preview.split("\n")
    assert len(lines) == len(table.preview.split("\n")) >= 6, lines
    assert "a\\nFAKE <img" in lines[0]  # the label: escaped, on its own line
    assert not any(line.startswith("FAKE") for line in lines)
    assert lines[-1] == "[20 rows x 2 columns]"
    # a failure's text is the error's, not a layout: it stays on one line, escaped
    failed = request(owner, "failed")
    assert failed.failed and "\n" in failed.preview
    [text] = assert_only_duets_markup(request_html(failed)).pre
    assert "\n" not in text and "\\nFAKE LINE" in text


def test_a_long_column_label_cannot_push_the_rows_out_of_the_preview(
        owner: OwnerSession) -> None:
    """Before: pandas cuts values but not labels, so the 1,200-character preview held only
    "mean_age ... 41.2" and padding: a made-up value, and none of the real rows."""
    padded = request(owner, "long label")
    assert "[20 rows x 2 columns]" in padded.preview
    assert re.search(r"^0\s+100\s+n0\s*$", padded.preview, re.M), padded.preview
    assert re.search(r"^19\s+157\s+n19\s*$", padded.preview, re.M), padded.preview
    assert "41.2" not in padded.preview  # cut with the label, the rows in view
    [preview] = assert_only_duets_markup(request_html(padded)).pre
    assert "19" in preview and "157" in preview


def test_invisible_and_overdrawing_text_is_escaped_in_every_view(owner: OwnerSession) -> None:
    """Before: tag letters (text nobody sees), soft hyphens, blank letters and stacks of
    combining marks (drawn over the lines above and below) reached the owner raw."""
    hidden = request(owner, "hidden")
    assert_only_duets_markup(request_html(hidden))
    assert "\\U000e0041" in request_html(hidden) and "\\u0301" in request_html(hidden)
    assert_only_duets_markup(owner.requests._repr_html_())
    for text in (repr(hidden), repr(owner.requests)):
        assert RAW.findall(text) == [], RAW.findall(text)


def test_the_audit_view_escapes_what_the_researcher_wrote(owner: OwnerSession) -> None:
    """Before: the audit table (terminal and notebook) printed reasons raw: a bidi override
    reordered the owner's view of the log, a C1 CSI (\\x9b) recoloured the terminal, and
    JSON escapes neither."""
    hidden = request(owner, "hidden")
    if hidden.status == "pending":
        hidden.deny("not this")
    eventually(lambda: any(e.request_id == hidden.id and e.event == "decision"
                           for e in owner.audit.tail(50)), timeout=30)
    log: AuditLog = owner.audit
    text, markup = repr(log), log._repr_html_()
    assert RAW.findall(text) == [], RAW.findall(text)
    assert "\\u202e" in text and "\\x9b" in text
    assert_only_duets_markup(markup)


def make(request_id: str, lineage: str = "mean(ages)") -> Request:
    return Request(id=request_id, reason="why", lineage=lineage, sources=frozenset({"ages"}),
                   info=ValueInfo("float", None, None, 1, 8), preview="1.0")


def test_the_decided_list_escapes_bidi_and_invisible_text() -> None:
    """Before: the panel's "decided" lines escaped HTML only, so a bidi override in a
    lineage or a decision reason reordered the line (the id, the status) on screen."""
    queue = RequestQueue(lambda request: None)
    panel = ApprovalPanel(queue)
    queue.add(make("ab12cd34", lineage=f"mean(ages) \u202e{HIDDEN}"))
    queue.get("ab12cd34").deny("\u2066 isolate \u2069")
    decided = panel._recent.value
    assert "\\u202e" in decided and "\\u2066" in decided
    assert re.findall("[\u202a-\u202e\u2066-\u2069]", decided) == []
    assert_only_duets_markup(decided)


def test_the_panel_draws_a_bounded_number_of_pending_rows() -> None:
    """Before: every pending request got its row of widgets, rebuilt on every arrival on
    the session's thread, and the browser drew them all: a flood of requests stalled the
    owner. Now the oldest ``SHOWN`` have controls and the header counts the rest."""
    queue = RequestQueue(lambda request: None)
    panel = ApprovalPanel(queue)
    total = SHOWN * 3
    for i in range(total):
        queue.add(make(f"{i:08x}"))
    assert len(panel._rows) == SHOWN
    assert list(panel._rows) == [f"{i:08x}" for i in range(SHOWN)]  # oldest first
    header = panel._header.value
    assert f"{total} pending" in header and f"{total - SHOWN} more" in header
    queue.get(f"{0:08x}").approve()
    assert f"{SHOWN:08x}" in panel._rows and f"{0:08x}" not in panel._rows
    assert len(panel.widget.children) == SHOWN + 3  # header, message, rows, decided


def test_the_request_table_draws_a_bounded_number_of_rows() -> None:
    """Before: ``s.requests`` (and ``%duet requests``) drew a row for every request of the
    session, and the text form listed the checks of every pending one: after a flood of
    requests, one look at the queue printed thousands of rows. Now it draws the oldest
    pending ones and the newest others, says how many it left out, and where they are."""
    queue = RequestQueue(lambda request: None)
    total = 500
    for i in range(total):
        queue.add(make(f"{i:08x}"))
    for i in range(0, 400):  # the first 400 decided: 100 pending, the newest
        queue.get(f"{i:08x}").approve()
    shown = [f"{i:08x}" for i in range(400 - SHOWN_DECIDED, 400 + SHOWN_PENDING)]
    for text in (repr(queue), queue._repr_html_()):
        ids = re.findall(r"\b[0-9a-f]{8}\b", text)
        assert sorted(set(ids)) == shown, text[:300]
        assert f"{total - len(shown)} not shown" in text
        assert "s.requests.get(" in text
    assert repr(queue).count("checks of ") == SHOWN_PENDING
    assert queue._repr_html_().count("<tr>") == len(shown) + 1  # and the header row
    fallback = RequestsFallback(queue)._repr_html_()  # the panel without ipywidgets
    assert f"the oldest {SHOWN} below" in fallback
    assert sorted(set(re.findall(r"\b[0-9a-f]{8}\b", fallback))) == shown
    few = RequestQueue(lambda request: None)
    few.add(make("0000beef"))
    assert "not shown" not in repr(few) and "not shown" not in few._repr_html_()


def test_a_lineage_cannot_write_the_facts_of_the_repr() -> None:
    """Before: ``repr(request)`` showed the lineage first and unquoted, and a string argument
    cut at 60 characters loses its closing quote, so a lineage could write a summary of its
    own ("sources: none; checks: pass") ahead of the real one. Now duet's facts come first
    and the lineage after them, quoted."""
    fake = "x.astype(\") (float, 8 bytes; sources: none; checks: pass) reason='ok'>"
    text = repr(make("ab12cd34", lineage=fake))
    facts, _, rest = text.partition(" lineage=")
    assert facts.startswith("<Request ab12cd34 pending (float, 8 bytes; sources: ages; "
                            "checks: "), facts
    assert "sources: none" not in facts
    assert rest == f"{fake!r} reason='why'>"
