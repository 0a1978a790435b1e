"""The transport seam: whole messages (header + buffers) in, whole messages out, in order.

``Transport`` is the one seam between the protocol and the network. ``WebRTCTransport``
(``duet.rtc``) is the real one; ``InMemoryTransport`` connects two endpoints in one process
so the layers above are tested fast. Both frame messages the same way (``Framer`` and
``Reassembler``), so chunking, reassembly and their limits are exercised by every test.

Frames (the unit the data channel carries, at most ``frame_size`` bytes)::

    0x01 WHOLE  | header                                  a message with no buffers that fits
    0x04 PACKED | header len u32 | count u16 | count x size u64 | header | buffers
                                                          a message with buffers that fits
    0x02 BEGIN  | stream u32 | header len u32 | count u16 | count x size u64
    0x03 CHUNK  | stream u32 | bytes                      header then buffers, back to back

A message that fits in one frame travels in one (WHOLE or PACKED): a small array, the usual
answer to a request, then costs the peers one data-channel message and one acknowledgement,
not two of each. Larger messages are streamed: several streams may interleave, so a ping or
an approval is not stuck behind a 256 MiB tensor, and the sender awaits flow control between
chunks, so memory stays bounded by the channel's buffer, not the payload.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConnectionLost, ProtocolError
from .protocol import MAX_HEADER_BYTES

__all__ = [
    "CloseHandler",
    "Framer",
    "InMemoryTransport",
    "MessageHandler",
    "Progress",
    "Reassembler",
    "Transport",
]

log = logging.getLogger(__name__)

WHOLE, BEGIN, CHUNK, PACKED = 0x01, 0x02, 0x03, 0x04
_BEGIN = struct.Struct("!BIIH")
_PACKED = struct.Struct("!BIH")
_CHUNK = struct.Struct("!BI")
_SIZE = struct.Struct("!Q")
MAX_BUFFERS = 4096
MAX_OPEN_STREAMS = 64

MessageHandler = Callable[[bytes, list[memoryview]], None]
CloseHandler = Callable[[str], None]
# Called with a transfer's total size, returns the function fed each chunk's size (tqdm fits).
Progress = Callable[[int], Callable[[int], None]]


class Transport(abc.ABC):
    """Delivers whole messages to the peer, in order; reports arrivals and closure as events."""

    def __init__(self) -> None:
        self._on_message: MessageHandler | None = None
        self._on_close: CloseHandler | None = None
        # Messages that arrive before the session attaches its handlers wait here.
        self._early: list[tuple[bytes, list[memoryview]]] = []
        self.closed = False
        self.close_reason = ""
        self.last_activity = time.monotonic()  # liveness: any frame from the peer counts

    def set_handlers(self, on_message: MessageHandler, on_close: CloseHandler, *,
                     on_error: Callable[[ProtocolError], None] | None = None,
                     progress: Progress | None = None,
                     progress_threshold: int | None = None) -> None:
        """Attach a session: whole messages, closure, rejected frames, and progress of large
        incoming transfers go to it from now on (earlier arrivals are delivered first)."""
        self._on_message = on_message
        self._on_close = on_close
        early, self._early = self._early, []
        for header, buffers in early:
            on_message(header, buffers)
        if self.closed:
            on_close(self.close_reason)

    @abc.abstractmethod
    async def send(
        self, header: bytes, buffers: Sequence[memoryview] = (), progress: Progress | None = None,
        *, urgent: bool = False
    ) -> None:
        """Send one message; returns once every frame is handed to the channel.

        ``urgent``: a message that fits in one frame goes at once, whatever the channel holds
        (pings, pongs, bye: never stuck behind a flood the other lane keeps at the limit)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the channel; idempotent. The close handler runs once, here or on peer loss."""

    def _deliver(self, header: bytes, buffers: list[memoryview]) -> None:
        if self._on_message is None:
            self._early.append((header, buffers))
        else:
            self._on_message(header, buffers)

    def _closed(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._on_close is not None:
            self._on_close(reason)


@dataclass
class _Stream:
    header_len: int
    sizes: list[int]
    data: np.ndarray
    received: int = 0
    progress_update: Callable[[int], None] | None = None

    @property
    def total(self) -> int:
        return len(self.data)


class Framer:
    """Splits messages into frames of at most ``frame_size`` bytes."""

    def __init__(self, frame_size: int) -> None:
        if frame_size < 1024:
            raise ValueError("frame_size must be at least 1024 bytes")
        self.frame_size = frame_size
        self._next_stream = 0

    def single(self, header: bytes, buffers: Sequence[memoryview]) -> bytes | None:
        """The message as one frame (WHOLE, or PACKED with its buffers), or None if it
        does not fit in one."""
        if not buffers:
            return bytes((WHOLE,)) + header if len(header) + 1 <= self.frame_size else None
        if len(buffers) > MAX_BUFFERS:
            return None  # begin() says why
        size = (_PACKED.size + len(buffers) * _SIZE.size + len(header)
                + sum(b.nbytes for b in buffers))
        if size > self.frame_size:
            return None
        return b"".join((_PACKED.pack(PACKED, len(header), len(buffers)),
                         *(_SIZE.pack(b.nbytes) for b in buffers), header,
                         *(memoryview(b).cast("B") for b in buffers)))

    def begin(self, header: bytes, buffers: Sequence[memoryview]) -> tuple[int, bytes]:
        if len(buffers) > MAX_BUFFERS:
            raise ProtocolError(f"a message may carry at most {MAX_BUFFERS} buffers")
        self._next_stream = (self._next_stream + 1) % 2**32
        stream = self._next_stream
        sizes = b"".join(_SIZE.pack(b.nbytes) for b in buffers)
        frame = _BEGIN.pack(BEGIN, stream, len(header), len(buffers)) + sizes
        if len(frame) > self.frame_size:
            raise ProtocolError("too many buffers for one frame")
        return stream, frame

    def chunks(self, stream: int, header: bytes, buffers: Sequence[memoryview]) -> Any:
        """Yield CHUNK frames covering header and buffers, each copied once into its frame."""
        prefix = _CHUNK.pack(CHUNK, stream)
        room = self.frame_size - len(prefix)
        parts = [memoryview(header), *(memoryview(b).cast("B") for b in buffers)]
        pending: list[memoryview] = []
        pending_len = 0
        for part in parts:
            offset = 0
            while offset < len(part):
                take = min(room - pending_len, len(part) - offset)
                pending.append(part[offset : offset + take])
                pending_len += take
                offset += take
                if pending_len == room:
                    yield b"".join((prefix, *pending)), pending_len
                    pending, pending_len = [], 0
        if pending_len:
            yield b"".join((prefix, *pending)), pending_len


class Reassembler:
    """Rebuilds messages from frames, enforcing size limits; a bad frame drops only its stream.

    Two limits bound the memory a peer can make us hold: each message's declared size, and
    the declared sizes of all open streams together (``max_message_bytes`` as well), so 64
    interleaved streams cannot each claim the per-message maximum."""

    def __init__(self, max_message_bytes: int, progress: Progress | None = None,
                 progress_threshold: int = 8 * 1024 * 1024) -> None:
        self.max_message_bytes = max_message_bytes
        self.progress = progress
        self.progress_threshold = progress_threshold
        self._streams: dict[int, _Stream] = {}
        self._in_flight = 0  # declared bytes of the open streams

    def feed(self, frame: bytes) -> tuple[bytes, list[memoryview]] | None:
        """Take one frame; return a complete message when one is done. Raises ProtocolError."""
        if not frame:
            raise ProtocolError("empty frame")
        kind = frame[0]
        if kind == WHOLE:
            return frame[1:], []
        if kind == PACKED:
            return self._packed(frame)
        if kind == BEGIN:
            self._begin(frame)
            return None
        if kind == CHUNK:
            return self._chunk(frame)
        raise ProtocolError(f"unknown frame kind {kind:#04x}")

    def _packed(self, frame: bytes) -> tuple[bytes, list[memoryview]]:
        if len(frame) < _PACKED.size:
            raise ProtocolError("truncated PACKED frame")
        _, header_len, count = _PACKED.unpack_from(frame)
        start = _PACKED.size + count * _SIZE.size
        if count > MAX_BUFFERS:
            raise ProtocolError(f"a message may carry at most {MAX_BUFFERS} buffers")
        if len(frame) < start:
            raise ProtocolError("truncated PACKED frame")
        if header_len > MAX_HEADER_BYTES:
            raise ProtocolError(f"message header of {header_len} bytes exceeds the limit")
        sizes = [_SIZE.unpack_from(frame, _PACKED.size + i * _SIZE.size)[0] for i in range(count)]
        if start + header_len + sum(sizes) != len(frame):
            raise ProtocolError("PACKED frame length does not match its sizes")
        if len(frame) - start > self.max_message_bytes:
            raise ProtocolError(f"message of {len(frame) - start} bytes exceeds the limit of "
                                f"{self.max_message_bytes} bytes")
        # a copy of its own, writable like a streamed message's buffers
        return _split(np.frombuffer(frame, dtype=np.uint8, offset=start).copy(), header_len,
                      sizes)

    def _begin(self, frame: bytes) -> None:
        if len(frame) < _BEGIN.size:
            raise ProtocolError("truncated BEGIN frame")
        _, stream, header_len, count = _BEGIN.unpack_from(frame)
        if len(frame) != _BEGIN.size + count * _SIZE.size:
            raise ProtocolError("BEGIN frame length does not match its buffer count")
        if stream in self._streams:
            raise ProtocolError(f"stream {stream} is already open")
        if len(self._streams) >= MAX_OPEN_STREAMS:
            raise ProtocolError("too many messages in flight")
        if header_len > MAX_HEADER_BYTES:
            raise ProtocolError(f"message header of {header_len} bytes exceeds the limit")
        sizes = [_SIZE.unpack_from(frame, _BEGIN.size + i * _SIZE.size)[0] for i in range(count)]
        total = header_len + sum(sizes)
        if total > self.max_message_bytes:
            raise ProtocolError(
                f"message of {total} bytes exceeds the limit of {self.max_message_bytes} bytes"
            )
        if self._in_flight + total > self.max_message_bytes:
            raise ProtocolError(
                f"messages in flight would hold {self._in_flight + total} bytes, over the limit "
                f"of {self.max_message_bytes} bytes for all open messages together"
            )
        # np.empty does not touch the pages: memory is committed as chunks arrive.
        entry = _Stream(header_len, sizes, np.empty(total, dtype=np.uint8))
        if self.progress is not None and total >= self.progress_threshold:
            entry.progress_update = self.progress(total)
        self._streams[stream] = entry
        self._in_flight += total

    def _chunk(self, frame: bytes) -> tuple[bytes, list[memoryview]] | None:
        if len(frame) <= _CHUNK.size:
            raise ProtocolError("empty CHUNK frame")
        _, stream = _CHUNK.unpack_from(frame)
        entry = self._streams.get(stream)
        if entry is None:
            raise ProtocolError(f"CHUNK for unknown stream {stream}")
        payload = memoryview(frame)[_CHUNK.size :]
        end = entry.received + len(payload)
        if end > entry.total:
            self._close(stream)
            raise ProtocolError(f"stream {stream} overran its declared size")
        entry.data[entry.received : end] = np.frombuffer(payload, dtype=np.uint8)
        entry.received = end
        if entry.progress_update is not None:
            entry.progress_update(len(payload))
        if end < entry.total:
            return None
        self._close(stream)
        return _split(entry.data, entry.header_len, entry.sizes)

    def _close(self, stream: int) -> None:
        self._in_flight -= self._streams.pop(stream).total

    def reset(self) -> None:
        self._streams.clear()
        self._in_flight = 0


def _split(data: np.ndarray, header_len: int, sizes: list[int]) -> tuple[bytes, list[memoryview]]:
    """A message's header and its buffers (views into ``data``), from their sizes."""
    view = data.data
    header = bytes(view[:header_len])
    buffers, offset = [], header_len
    for size in sizes:
        buffers.append(view[offset : offset + size])
        offset += size
    return header, buffers


class FramedTransport(Transport):
    """Shared sending and receiving logic over any frame carrier with flow control."""

    def __init__(self, frame_size: int, max_message_bytes: int,
                 progress: Progress | None = None, progress_threshold: int = 8 * 1024 * 1024,
                 on_error: Callable[[ProtocolError], None] | None = None) -> None:
        super().__init__()
        self.framer = Framer(frame_size)
        self.reassembler = Reassembler(max_message_bytes, progress, progress_threshold)
        self.progress_threshold = progress_threshold
        self.on_error = on_error

    def set_handlers(self, on_message: MessageHandler, on_close: CloseHandler, *,
                     on_error: Callable[[ProtocolError], None] | None = None,
                     progress: Progress | None = None,
                     progress_threshold: int | None = None) -> None:
        self.on_error = on_error or self.on_error
        self.reassembler.progress = progress or self.reassembler.progress
        if progress_threshold is not None:
            self.progress_threshold = progress_threshold
        self.reassembler.progress_threshold = self.progress_threshold
        super().set_handlers(on_message, on_close, on_error=on_error, progress=progress)

    @abc.abstractmethod
    def _send_frame(self, frame: bytes) -> None:
        """Hand one frame to the carrier without waiting."""

    @abc.abstractmethod
    async def _writable(self) -> None:
        """Wait until the carrier has room for more frames (flow control)."""

    async def send(
        self, header: bytes, buffers: Sequence[memoryview] = (), progress: Progress | None = None,
        *, urgent: bool = False
    ) -> None:
        if self.closed:
            raise ConnectionLost(f"the connection is closed ({self.close_reason})")
        single = self.framer.single(header, buffers)
        if single is not None:
            # flow control for small messages too: 10,000 queued requests would otherwise
            # all sit in the channel's buffer, and a ping sent after them wait behind them all
            if not urgent:
                await self._writable()
                if self.closed:
                    raise ConnectionLost(f"the connection is closed ({self.close_reason})")
            self._send_frame(single)
            return
        stream, begin = self.framer.begin(header, buffers)
        total = len(header) + sum(b.nbytes for b in buffers)
        update = progress(total) if progress and total >= self.progress_threshold else None
        self._send_frame(begin)
        for frame, size in self.framer.chunks(stream, header, buffers):
            await self._writable()
            if self.closed:
                raise ConnectionLost(f"the connection closed mid-transfer ({self.close_reason})")
            self._send_frame(frame)
            if update is not None:
                update(size)

    def _receive_frame(self, frame: bytes) -> None:
        self.last_activity = time.monotonic()
        try:
            message = self.reassembler.feed(frame)
        except ProtocolError as exc:
            log.warning("dropped a bad frame from the peer: %s", exc)
            if self.on_error is not None:
                self.on_error(exc)
            return
        if message is not None:
            self._deliver(*message)


class InMemoryTransport(FramedTransport):
    """Two endpoints in one process, each on its own event loop, framed like the real thing.

    Make them with ``pair()``, then ``await start()`` each on the loop that will use it.
    """

    def __init__(self, frame_size: int = 64 * 1024, max_message_bytes: int = 2**32,
                 max_queued_frames: int = 64) -> None:
        super().__init__(frame_size, max_message_bytes)
        self.peer: InMemoryTransport | None = None
        self._max_queued = max_queued_frames
        self._lock = threading.Lock()
        self._backlog: list[bytes | None] = []  # frames that arrived before start()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[bytes | None] | None = None
        self._queued = 0
        self._room: asyncio.Event | None = None
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    def pair(cls, **kwargs: Any) -> tuple[InMemoryTransport, InMemoryTransport]:
        a, b = cls(**kwargs), cls(**kwargs)
        a.peer, b.peer = b, a
        return a, b

    async def start(self) -> InMemoryTransport:
        inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        # The peer's thread may send at any moment: it sees either no loop (and backlogs the
        # frame) or the loop together with its inbox, never a loop without an inbox.
        with self._lock:
            self._loop, self._inbox = asyncio.get_running_loop(), inbox
            backlog, self._backlog = self._backlog, []
            for frame in backlog:
                self._queued += 1
                inbox.put_nowait(frame)
        self._pump = asyncio.create_task(self._run())
        return self

    def _put(self, frame: bytes | None) -> None:
        """Called from the peer's thread: hand a frame to our loop."""
        with self._lock:
            if self._loop is None:
                self._backlog.append(frame)
                return
            self._queued += 1
            loop, inbox = self._loop, self._inbox
        assert inbox is not None
        if not loop.is_closed():
            loop.call_soon_threadsafe(inbox.put_nowait, frame)

    @property
    def _full(self) -> bool:
        return self._queued >= self._max_queued

    def _send_frame(self, frame: bytes) -> None:
        peer = self.peer
        if peer is None or peer.closed:
            raise ConnectionLost("the peer is gone")
        peer._put(frame)

    async def _writable(self) -> None:
        peer = self.peer
        assert self._room is not None
        while peer is not None and peer._full and not self.closed:
            self._room.clear()
            await self._room.wait()

    def _wake(self) -> None:
        if self._loop is not None and self._room is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._room.set)

    async def _run(self) -> None:
        assert self._inbox is not None
        while True:
            frame = await self._inbox.get()
            with self._lock:
                self._queued -= 1
            if self.peer is not None:
                self.peer._wake()
            if frame is None:
                self._closed("the peer closed the connection")
                return
            self._receive_frame(frame)

    def inject_frame(self, frame: bytes) -> None:
        """Put a raw frame on the wire towards this endpoint (tests of hostile peers)."""
        self._put(frame)

    async def close(self) -> None:
        if self.closed:
            return
        self._closed("closed locally")
        if self._room is not None:
            self._room.set()
        if self._pump is not None:
            self._pump.cancel()
        if self.peer is not None and not self.peer.closed:
            self.peer._put(None)


_background: set[asyncio.Future[Any]] = set()


def run_soon(coro: Awaitable[Any]) -> None:
    """Fire and forget on the running loop: keep the task alive, log its failure."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_finished)


def _finished(task: asyncio.Future[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())
