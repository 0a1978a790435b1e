"""Class 9: the owner's kernel and its worker read the same message.

The kernel validates each message from the researcher, then forwards its bytes to the worker,
which rebuilds it without validating again. A lax validation that coerces (``"5"`` to the
object id 5, a map ``{"name": "x"}`` to the shared object ``x``, bytes to text) would let
the kernel check one message while the worker runs another: the kernel's bookkeeping of
objects, requests and privacy derivations would no longer describe what the worker holds.
Whatever validation would have to change is refused instead, like a withdrawal's id too
long for the worker's control socket."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from duet import ProtocolError
from duet import protocol as p
from tests.helpers import rawwire
from tests.helpers.sessions import Pair, eventually

_OP = {"result": 5, "kind": "function", "name": "numpy.mean"}

COERCIBLE: dict[str, dict[str, Any]] = {
    "object id as text": {"type": "ops", "ops": [{**_OP, "result": "5"}]},
    "object id as float": {"type": "ops", "ops": [{**_OP, "result": 5.0}]},
    "object id as bool": {"type": "ops", "ops": [{**_OP, "result": True}]},
    "name as bytes": {"type": "ops", "ops": [{**_OP, "name": b"numpy.mean"}]},
    "target as a map of an id": {"type": "ops", "ops": [
        {**_OP, "kind": "method", "name": "sum", "target": {"id": 3}}]},
    "target as a map of a name": {"type": "ops", "ops": [
        {**_OP, "kind": "method", "name": "sum", "target": {"name": "x"}}]},
    "free of ids as text": {"type": "free", "ids": ["5"]},
    "free of ids as bools": {"type": "free", "ids": [True]},
    "request of a map": {"type": "request", "request_id": "abcdef12", "target": {"id": 3}},
    "request reason as bytes": {"type": "request", "request_id": "abcdef12",
                                "target": {"name": "x"}, "reason": b"why"},
    "withdraw id as bytes": {"type": "withdraw", "request_id": b"abcdef12"},
    # not a coercion, but as fatal: the kernel passes a withdrawal's id to the worker's
    # control socket, whose frames are at most 64 KiB (this one ended the worker)
    "withdraw id too long": {"type": "withdraw", "request_id": "a" * 70_000},
}


@pytest.mark.parametrize("raw", COERCIBLE.values(), ids=COERCIBLE.keys())
def test_a_field_not_exactly_as_defined_is_refused(raw: dict[str, Any]) -> None:
    header = msgpack.packb(raw, use_bin_type=True)
    with pytest.raises(ProtocolError, match="invalid"):
        p.decode(header)


def test_a_pointer_reference_to_true_is_refused() -> None:
    """``True`` is an ``int`` to Python and equals 1: no id for the kernel and the worker to
    disagree about."""
    ref = msgpack.ExtType(1, msgpack.packb(True))
    header = msgpack.packb({"type": "request", "request_id": "abcdef12", "target": ref})
    with pytest.raises(ProtocolError, match="malformed pointer reference"):
        p.decode(header)


def test_coerced_messages_on_the_wire_are_refused_and_the_worker_runs_on(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(4.0), name="x")
    owner.requests.add_rule("approve")
    x = researcher.store.wait_for("x", 5)
    worker = owner.worker_pid
    errors_before = len(owner.audit.events(event="protocol_error"))
    received = rawwire.record_received(researcher)
    for raw in COERCIBLE.values():
        rawwire.send_header(researcher, msgpack.packb(raw, use_bin_type=True))
    eventually(lambda: len(owner.audit.events(event="protocol_error"))
               == errors_before + len(COERCIBLE), timeout=20)
    assert (x + 1).get("after", timeout=30).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert owner.worker_pid == worker  # nothing reached the worker to crash it
    assert not owner.audit.events(event="op_refused")  # refused as messages, not run
    notices = [m for m in received if m.type == "error"]
    assert len(notices) == len(COERCIBLE)
    assert all("invalid" in notice.message for notice in notices)
