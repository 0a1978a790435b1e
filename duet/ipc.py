"""The pipe between the owner's kernel and its worker process: framing and message shapes.

The worker runs the researcher's operations, so the kernel treats everything the worker says
as untrusted input: each frame is bounded in size before anything is allocated, its header is
msgpack (never pickle) and is validated against the pydantic models below. The other way,
kernel to worker, is trusted (the worker is the kernel's own child): shared objects that
are not plain arrays travel there pickled, and the worker believes what the kernel says.

A frame on the socket is::

    <u32 number of buffers> <u64 header length> <u64 length of each buffer>...
    <header bytes> <buffer bytes>...

Buffers carry array bytes and already-encoded peer messages out of band, as in
``duet.protocol``.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from .errors import ProtocolError

__all__ = [
    "MAX_BUFFERS",
    "MAX_EVIDENCE_CHARS",
    "CheckResult",
    "DPQuote",
    "Done",
    "FrameReader",
    "Ready",
    "Released",
    "RequestFailed",
    "Snapshot",
    "Usage",
    "ValueSummary",
    "WorkerMessage",
    "parse_worker_message",
    "frame_parts",
    "recv_frame",
    "send_frame",
    "send_parts",
    "send_without_waiting",
]

MAX_BUFFERS = 4096
MAX_HEADER = 64 * 1024 * 1024
MAX_EVIDENCE_CHARS = 8_000  # per check, as JSON text
_COUNT = struct.Struct("<IQ")
_LENGTH = struct.Struct("<Q")

Buffer = bytes | bytearray | memoryview


def frame_parts(header: bytes, buffers: Sequence[Buffer] = ()) -> list[memoryview]:
    """One frame as the byte strings to write, in order."""
    views = [_bytes_view(b) for b in buffers]
    lengths = b"".join(_LENGTH.pack(view.nbytes) for view in views)
    return [memoryview(_COUNT.pack(len(views), len(header)) + lengths + header), *views]


def send_frame(sock: socket.socket, header: bytes, buffers: Sequence[Buffer] = ()) -> None:
    """Write one frame; blocks until the socket took all of it."""
    send_parts(sock, frame_parts(header, buffers))


def send_parts(sock: socket.socket, parts: Sequence[memoryview]) -> None:
    """Write the parts in order, blocking until the socket took all of them: gathered into
    as few system calls as the socket allows, so a small frame arrives in one piece and
    wakes its reader once (written part by part, it woke the reader for each part)."""
    rest = list(parts)
    while rest:
        batch, rest = rest[:_GATHER], rest[_GATHER:]
        rest = _unsent(batch, sock.sendmsg(batch)) + rest


def send_without_waiting(sock: socket.socket, parts: list[memoryview]) -> list[memoryview]:
    """Write what the socket takes at once, never blocking; returns the rest (empty when
    all of it went). A full socket or a broken one leaves everything to a blocking writer,
    which reports the error."""
    if len(parts) > _GATHER:
        return parts
    try:
        sent = sock.sendmsg(parts, [], socket.MSG_DONTWAIT)
    except OSError:
        return parts
    return _unsent(parts, sent)


def _unsent(parts: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``parts`` once their first ``sent`` bytes were written."""
    rest = []
    for part in parts:
        if sent >= part.nbytes:
            sent -= part.nbytes
            continue
        rest.append(part[sent:])
        sent = 0
    return rest


_GATHER = 64  # buffers written in one call at most (the system allows ~1,024)
_GROWTH = 1 << 26  # bytes a part being read may reserve beyond what has arrived
_ZEROS = memoryview(bytes(_GROWTH))  # untouched until read: the system's shared zero page


def _bytes_view(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class FrameReader:
    """Reads frames off one socket with as few system calls as their sizes allow: one
    ``recv`` usually brings a whole small frame (a request, a snapshot) and whatever follows
    it, where reading each part on its own took four or five. Large parts are read straight
    into their own memory. Every buffer returned is a fresh, writable copy, its own."""

    def __init__(self, sock: socket.socket, max_bytes: int, chunk: int = 1 << 16) -> None:
        """``chunk``: bytes asked of the socket at a time; 0 never reads past a frame."""
        self._sock = sock
        self._max_bytes = max_bytes
        self._chunk = chunk
        self._ahead = bytearray()  # bytes received and not yet taken

    @property
    def pending(self) -> bool:
        """Whether bytes of a next frame were already received (the socket may be empty)."""
        return bool(self._ahead)

    def read(self) -> tuple[bytes, list[memoryview]] | None:
        """The next frame, or None at end of stream; sizes are checked before allocating."""
        prefix = self._take(_COUNT.size)
        if prefix is None:
            return None
        count, header_length = _COUNT.unpack(prefix)
        if count > MAX_BUFFERS or header_length > MAX_HEADER:
            raise ProtocolError(f"frame with {count} buffers and a {header_length}-byte header")
        lengths_raw = self._take(_LENGTH.size * count) if count else bytearray()
        if lengths_raw is None:
            return None
        lengths = [_LENGTH.unpack_from(lengths_raw, i * _LENGTH.size)[0] for i in range(count)]
        if header_length + sum(lengths) > self._max_bytes:
            raise ProtocolError(
                f"frame of {header_length + sum(lengths)} bytes exceeds the limit")
        header = self._take(header_length)
        if header is None:
            return None
        buffers = []
        for length in lengths:
            data = self._take(length)
            if data is None:
                return None
            buffers.append(memoryview(data))
        return bytes(header), buffers

    def _take(self, size: int) -> bytearray | None:
        """Exactly ``size`` bytes, or None when the stream ends first.

        Memory follows what arrives, not what a header claims: a sender announcing a 60 GiB
        buffer and sending ten bytes costs ten bytes (and at most ``_GROWTH`` reserved)."""
        if len(self._ahead) >= size:
            taken = self._ahead[:size]
            del self._ahead[:size]
            return taken
        have = len(self._ahead)
        taken = bytearray(min(size, max(have, _GROWTH)))
        taken[:have] = self._ahead
        self._ahead.clear()
        while have < size:
            if have == len(taken):  # grown in place as the bytes come (no view is held)
                taken += _ZEROS[:min(size - have, _GROWTH)]
            missing = size - have
            with memoryview(taken) as view:
                if missing >= self._chunk:  # large: straight into place, no second copy
                    n = self._sock.recv_into(view[have:], len(taken) - have)
                    if n == 0:
                        return None
                    have += n
                    continue
                data = self._sock.recv(self._chunk)
                if not data:
                    return None
                used = min(missing, len(data))
                view[have:have + used] = data[:used]
            have += used
            self._ahead += data[used:]  # the start of the next frame, if any
        return taken


def recv_frame(sock: socket.socket, max_bytes: int) -> tuple[bytes, list[memoryview]] | None:
    """Read one frame and nothing past its end (for a socket whose next frames another
    reader takes); a reader of many frames keeps a ``FrameReader``."""
    return FrameReader(sock, max_bytes, chunk=0).read()


def pack(message_type: str, /, **fields: Any) -> bytes:
    """A header for a message to or from the worker."""
    return msgpack.packb({"type": message_type, **fields}, use_bin_type=True)


def unpack(header: bytes) -> dict[str, Any]:
    try:
        raw = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"malformed frame from the worker ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise ProtocolError("a worker message must be a map")
    return raw


# -- what the worker may say (validated in the kernel) --------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Text = Annotated[str, Field(max_length=20_000)]


class Ready(_Model):
    """The worker started and loaded what it needs."""

    type: Literal["ready"] = "ready"
    pid: int


class Done(_Model):
    """One unit of work finished: audit events to record; carries nothing for the researcher."""

    type: Literal["done"] = "done"
    events: list[tuple[str, dict[str, Any]]] = Field(default_factory=list, max_length=100_000)
    # shared data changed inside the worker: the kernel restarts it from the originals
    shared_modified: str = ""


class ValueSummary(_Model):
    """Size of a frozen value, for the owner and for rules; ``elements`` overcounts when
    unsure (structured records, unknown objects), never undercounts."""

    type: Text
    shape: list[int] | None = None
    dtype: str | None = None
    elements: int
    nbytes: int


class CheckResult(_Model):
    """One disclosure check computed in the worker (``duet.checks.Check``); the evidence is
    JSON the owner reads, bounded in size."""

    name: Annotated[str, Field(max_length=64)]
    status: Literal["pass", "fail", "review"]
    reason: Annotated[str, Field(max_length=400)]
    evidence: dict[str, Any] = Field(default_factory=dict)

    @field_validator("evidence")
    @classmethod
    def _bounded(cls, evidence: dict[str, Any]) -> dict[str, Any]:
        try:
            text = json.dumps(evidence, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError("check evidence must be plain JSON") from None
        if len(text) > MAX_EVIDENCE_CHARS:
            raise ValueError(f"check evidence longer than {MAX_EVIDENCE_CHARS} characters")
        return evidence
class DPQuote(_Model):
    """A DP release as the owner sees it (``duet.dp.Quote``); the kernel checks the cost
    against what it reserved itself."""

    statistic: Annotated[str, Field(max_length=40)]
    source: Annotated[str, Field(max_length=200)]
    epsilon: float
    delta: float
    mechanism: Annotated[str, Field(max_length=500)]
    scale: Annotated[str, Field(max_length=500)]
    accuracy: Annotated[str, Field(max_length=500)]


class Snapshot(_Model):
    """A request's value, frozen when the request was made; its bytes stay in the worker
    (or ride along as buffers when small) until the owner decides."""

    type: Literal["snapshot"] = "snapshot"
    request_id: Annotated[str, Field(max_length=64)]
    pointer_id: int | None = None
    lineage: Text
    sources: list[Annotated[str, Field(max_length=200)]] = Field(max_length=10_000)
    summary: ValueSummary
    preview: Text
    # the failure when computing the value failed: only the owner reads this text
    failed: Text = ""
    operation: Text = ""
    error_type: Annotated[str, Field(max_length=200)] = ""
    hint: Annotated[str, Field(max_length=200)] = ""  # advice that depends on the type alone
    sha256: Annotated[str, Field(max_length=64)] = ""
    nbytes: int = 0
    inline: bool = False  # the encoded decision travels with this message
    # disclosure checks on the frozen value (none: the kernel treats it as "review")
    checks: list[CheckResult] = Field(default_factory=list, max_length=32)
    dp: DPQuote | None = None  # the value is a DP release (its noise already drawn)


class RequestFailed(_Model):
    """The request names nothing the researcher can ask for (never created, freed)."""

    type: Literal["request_failed"] = "request_failed"
    request_id: Annotated[str, Field(max_length=64)]
    reason: Text


class Usage(_Model):
    """What the researcher's objects hold in the worker (the owner asked)."""

    type: Literal["usage"] = "usage"
    objects: int
    used_bytes: int
    frozen: int


class Released(_Model):
    """The frozen, encoded decision of an approved request (header and buffers follow)."""

    type: Literal["released"] = "released"
    request_id: Annotated[str, Field(max_length=64)]


WorkerMessage = Annotated[Ready | Done | Snapshot | RequestFailed | Released | Usage,
                          Field(discriminator="type")]
_adapter: TypeAdapter[WorkerMessage] = TypeAdapter(WorkerMessage)


def parse_worker_message(header: bytes) -> WorkerMessage:
    raw = unpack(header)
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        raise ProtocolError(f"invalid message from the worker: {exc.errors()[:2]}") from None
