"""The approval queue as the owner reads it: escaped text, conservative sizes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from duet.approvals import Request, RequestQueue, ValueInfo
from duet.screen import safe_text
from duet.snapshot import freeze, preview_of, summarize


@pytest.mark.parametrize("hostile", [
    "\x1b[2J\x1b[31mAPPROVED", "mean\rsecret", "safe\u202eterces", "zero\u200bwidth",
    "bell\x07", "line\u2028break",
])
def test_control_and_bidi_characters_are_escaped(hostile: str) -> None:
    shown = safe_text(hostile)
    assert shown.isprintable() and "\\" in shown
    queue = RequestQueue(lambda request: None)
    queue.add(Request(id="r1", reason=hostile, lineage=f"mean({hostile})",
                      sources=frozenset({"x"}), info=ValueInfo("float", None, None, 1, 8),
                      preview=hostile))
    for text in (repr(queue), repr(queue[0]), queue._repr_html_()):
        assert hostile not in text
        assert not any(ch in text for ch in "\x1b\r\u202e\u200b\x07\u2028")


@pytest.mark.parametrize("value, at_least", [
    (np.zeros(5), 5),
    (np.zeros(1, dtype=[("a", "f8", (100,))]), 800),  # one record, a hundred numbers
    (slice(np.zeros(3), None), 3),
    ([np.zeros(2), [np.zeros(3)]], 5),
    ({"k": np.zeros(4)}, 5),
])
def test_element_counts_never_undercount(value: object, at_least: int) -> None:
    assert summarize(value).elements >= at_least


def test_unknown_objects_never_match_a_size_rule() -> None:
    assert summarize(object()).elements > 10**18


def test_a_frozen_value_is_a_private_copy() -> None:
    value = np.arange(4.0)
    frozen = freeze("ab" * 8, value)
    value[:] = 99
    assert "99" not in frozen.preview and frozen.summary.elements == 4
    assert frozen.preview.startswith("array([0., 1., 2., 3.])")


def test_previews_of_huge_containers_are_bounded() -> None:
    frozen = freeze("ab" * 8, list(range(500_000)))
    assert len(frozen.preview) <= 400 and "more" in frozen.preview


def test_previews_of_arrays_and_tensors_show_their_numbers_and_dtype() -> None:
    """Short arrays and tensors are formatted number by number (torch's formatter cost ~1 ms
    per request); the text still says what the value is, its dtype and its gradient."""
    import torch

    assert preview_of(torch.arange(4.0)) == "tensor([0., 1., 2., 3.])"
    assert preview_of(torch.tensor([0.25, -1e-7, float("nan")], dtype=torch.float64)) == (
        "tensor([0.25, -1.0000e-07, nan], dtype=torch.float64)")
    assert preview_of(torch.tensor(3.5)) == "tensor(3.5)"
    assert preview_of(torch.ones(2, requires_grad=True)) == (
        "tensor([1., 1.], requires_grad=True)")
    assert preview_of(torch.tensor([1, 2], dtype=torch.bfloat16)) == (
        "tensor([1., 2.], dtype=torch.bfloat16)")
    assert preview_of(np.array([1, 2], dtype=np.int32)) == "array([1, 2], dtype=int32)"
    assert preview_of(np.array([True, False])) == "array([True, False])"
    corners = preview_of(torch.arange(1000).reshape(100, 10))
    assert corners.startswith("tensor([[  0,   1,   2, ...,   7,   8,   9],")
    assert "999]])" in corners and "500" not in corners


def test_values_the_researcher_could_not_receive_are_refused_when_frozen() -> None:
    from duet.errors import ProtocolError

    with pytest.raises(ProtocolError, match="exceeds the limit"):
        freeze("ab" * 8, list(range(3_000_000)))  # a 14 MB header: arrays travel as buffers


def test_a_request_is_pending_for_the_owner_only_after_the_rules_ran() -> None:
    """An owner loop that denies whatever ``wait()`` returns must not race a rule: the rule
    below holds the request until the loop had its chance, and the loop must not get it."""
    queue = RequestQueue(lambda request: None)
    looked = threading.Event()

    def slow_rule(request: Request) -> bool:
        looked.wait(1.0)  # the owner's loop is looking meanwhile
        return True

    queue.add_rule("approve", predicate=slow_rule)
    seen: list[Request | None] = []

    def owner_loop() -> None:
        seen.append(queue.wait(0.5))
        looked.set()
        if seen[0] is not None:
            seen[0].deny("loop")

    loop = threading.Thread(target=owner_loop)
    loop.start()
    queue.add(Request(id="r1", reason="", lineage="mean(x)", sources=frozenset({"x"}),
                      info=ValueInfo("float", None, None, 1, 8), preview="1.0"))
    loop.join(5)
    assert seen == [None]
    assert queue.get("r1").status == "approved" and queue.pending == []


def test_an_approve_rule_by_name_never_releases_another_sources_data() -> None:
    sent: list[str] = []
    queue = RequestQueue(lambda request: sent.append(request.status))
    queue.add_rule("approve", name="public")
    info = ValueInfo("float", None, None, 1, 8)
    for rid, sources in (("mixed", {"public", "secret"}), ("pure", {"public"}), ("none", set())):
        queue.add(Request(id=rid, reason="", lineage=rid, sources=frozenset(sources),
                          info=info, preview="1.0"))
    assert {r.id: r.status for r in queue} == {"mixed": "pending", "pure": "approved",
                                               "none": "pending"}
    queue.add_rule("deny", name="secret")
    assert queue.get("mixed").status == "denied"
