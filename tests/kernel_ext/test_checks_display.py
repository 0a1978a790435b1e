"""The approval panel shows each request's disclosure checks: status in words and colour,
one line per check with its reason, escaped."""

from __future__ import annotations

from duet.approvals import Request, RequestQueue, ValueInfo
from duet.checks import Check
from kernel_ext.widgets import ApprovalPanel

CHECKS = (Check("provenance", "pass", "every shared source's contributing records are known"),
          Check("min_count", "fail", "only 5 record(s) of 'ages' contributed; the minimum is 10",
                {"smallest": 5}),
          Check("summary_kind", "review", "max of 'ages' <b>is</b> one record's own value"))


def make(request_id: str, checks: tuple[Check, ...]) -> Request:
    return Request(id=request_id, reason="why", lineage="mean(ages)",
                   sources=frozenset({"ages"}), info=ValueInfo("float", None, None, 1, 8),
                   preview="1.0", checks=checks)


def test_the_panel_lists_every_check_with_its_status_in_words() -> None:
    queue = RequestQueue(lambda request: None)
    panel = ApprovalPanel(queue)
    queue.add(make("r1", CHECKS))
    queue.add(make("r2", ()))
    row = panel._rows["r1"].box.children[0].value
    assert row.count('class="duet-check-line"') == 3
    assert ">FAIL</b>" in row and ">REVIEW</b>" in row and ">PASS</b>" in row
    assert 'data-check-status="fail"' in row
    assert "&lt;b&gt;is&lt;/b&gt;" in row  # reasons are text, never markup
    assert 'title="{&quot;smallest&quot;: 5}"' in row  # the evidence, as a tooltip
    empty = panel._rows["r2"].box.children[0].value
    assert 'data-check-status="review"' in empty and "no checks were computed" in empty
    queue.get("r1").deny("no")
    assert "checks <b" in panel._recent.value and ">FAIL</b>" in panel._recent.value


def test_the_text_view_names_failing_checks() -> None:
    queue = RequestQueue(lambda request: None)
    queue.add(make("r1", CHECKS))
    text = repr(queue)
    assert "fail: min_count, summary_kind" in text
    assert "REVIEW  summary_kind: max of 'ages'" in text
    assert make("r3", (CHECKS[0],)).check_status == "pass"
    assert make("r4", ()).check_status == "review"
