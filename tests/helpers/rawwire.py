"""Raw wire access for the hostile researcher: the ONE place tests touch session internals.

Everything a hostile peer does below the public API (enqueue a protocol message the public
API would never build, write raw frames, record every message the owner sends) goes through
these functions, so when the session's internals move only this module changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from duet import protocol as p

__all__ = [
    "IGNORED_TYPES",
    "normalized",
    "new_id",
    "op",
    "record_received",
    "send_frame",
    "send_header",
    "send_raw",
]

# Heartbeats come and go with time, not with what the researcher did.
IGNORED_TYPES = frozenset({"ping", "pong"})
# Fields that differ between two runs of the same attack for reasons unrelated to the data:
# fresh ids and nonces.
_VOLATILE_FIELDS = frozenset({"nonce", "request_id", "result", "ids", "id"})


def send_raw(researcher: Any, message: Any) -> None:
    """Queue ``message`` (any protocol model, e.g. ``p.Op`` or ``p.RequestValue``) exactly as
    the researcher's own operations are queued, in order with them."""
    researcher._enqueue(message)


def send_header(researcher: Any, header: bytes, buffers: Iterable[bytes] = ()) -> None:
    """Send an already-encoded message (msgpack ``header`` plus raw ``buffers``) through the
    transport's framing, bypassing the encoder: for headers the encoder would never write."""
    views = [memoryview(b) for b in buffers]
    transport = researcher._transport
    researcher._loop.run(transport.send(header, views), timeout=30)


def send_frame(researcher: Any, frame: bytes) -> None:
    """Write one raw frame on the data channel (no framing at all), from the loop thread."""
    transport = researcher._transport

    async def write() -> None:
        transport._send_frame(frame)

    researcher._loop.run(write(), timeout=30)


def record_received(researcher: Any) -> list[Any]:
    """Start recording every message the owner sends the researcher; returns the live list
    (the messages are still handled as usual)."""
    received: list[Any] = []
    original = researcher._dispatch

    def record(message: Any, raw: Any) -> None:
        received.append(message)
        original(message, raw)

    researcher._dispatch = record
    return received


def normalized(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Messages as comparable data: heartbeats dropped, ids and nonces removed."""
    out = []
    for message in messages:
        if message.type in IGNORED_TYPES:
            continue
        fields = {name: getattr(message, name) for name in type(message).model_fields}
        out.append({k: repr(v) for k, v in fields.items() if k not in _VOLATILE_FIELDS})
    return out


def op(result: int, name: str, *, kind: str = "function", target: Any = None,
       args: list[Any] | None = None, kwargs: dict[str, Any] | None = None) -> Any:
    """A protocol operation built by hand (names the public API would refuse to spell)."""
    return p.Op.model_validate({"result": result, "kind": kind, "name": name, "target": target,
                                "args": args or [], "kwargs": kwargs or {}})


def new_id(researcher: Any) -> int:
    """A fresh object id, as the researcher's pointers get theirs."""
    return int(researcher.new_id())
