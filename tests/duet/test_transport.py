"""Framing, chunking, flow control and limits, over the in-memory transport pair."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from duet import ProtocolError
from duet.transport import BEGIN, CHUNK, WHOLE, Framer, InMemoryTransport, Reassembler


def frames_of(framer: Framer, header: bytes, buffers: list[memoryview]) -> list[bytes]:
    if framer.is_whole(header, buffers):
        return [framer.whole(header)]
    stream, begin = framer.begin(header, buffers)
    return [begin] + [frame for frame, _ in framer.chunks(stream, header, buffers)]


@pytest.mark.parametrize("sizes", [[], [0], [1], [5000], [4096, 1, 0, 9999], [3 * 4096 - 13]])
def test_chunking_reassembles_exactly(sizes: list[int]) -> None:
    rng = np.random.default_rng(1)
    buffers = [memoryview(rng.integers(0, 256, n, dtype=np.uint8)) for n in sizes]
    header = b"h" * 3000
    framer = Framer(frame_size=1024)
    frames = frames_of(framer, header, buffers)
    assert all(len(f) <= 1024 for f in frames)
    reassembler = Reassembler(max_message_bytes=10**6)
    results = [reassembler.feed(f) for f in frames]
    assert all(r is None for r in results[:-1])
    final = results[-1]
    assert final is not None
    out_header, out_buffers = final
    assert out_header == header
    assert [bytes(b) for b in out_buffers] == [bytes(b) for b in buffers]


def test_interleaved_streams() -> None:
    framer = Framer(frame_size=1024)
    a = frames_of(framer, b"A" * 5000, [])
    b = frames_of(framer, b"B" * 5000, [])
    reassembler = Reassembler(max_message_bytes=10**6)
    done = []
    for fa, fb in zip(a, b, strict=True):
        for frame in (fa, fb):
            result = reassembler.feed(frame)
            if result is not None:
                done.append(result[0])
    assert done == [b"A" * 5000, b"B" * 5000]


@pytest.mark.parametrize("frame, message", [
    (b"", "empty"),
    (b"\x09junk", "unknown frame kind"),
    (bytes([BEGIN]) + b"\x00", "truncated"),
    (bytes([CHUNK]) + b"\x00\x00\x00\x07data", "unknown stream"),
    (bytes([CHUNK]) + b"\x00\x00", "empty CHUNK"),
])
def test_bad_frames_raise_protocol_error(frame: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        Reassembler(10**6).feed(frame)


def test_oversized_message_is_refused_before_allocation() -> None:
    framer = Framer(frame_size=1024)
    _, begin = framer.begin(b"h", [memoryview(b"x" * 2000)])
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        Reassembler(max_message_bytes=1000).feed(begin)


def test_open_streams_together_are_bounded() -> None:
    """A hostile peer opens many streams, each just under the per-message limit: the total
    declared in flight is capped too, and finishing a stream frees its share."""
    framer = Framer(frame_size=1024)
    reassembler = Reassembler(max_message_bytes=1000)
    first, begin = framer.begin(b"h", [memoryview(b"x" * 599)])
    reassembler.feed(begin)
    _, second = framer.begin(b"h", [memoryview(b"x" * 599)])
    with pytest.raises(ProtocolError, match="in flight"):
        reassembler.feed(second)
    # the first stream is unharmed and completes; then there is room again
    done = reassembler.feed(bytes([CHUNK]) + first.to_bytes(4, "big") + b"h" + b"x" * 599)
    assert done is not None and bytes(done[1][0]) == b"x" * 599
    reassembler.feed(second)


def test_stream_overrun_is_refused_and_dropped() -> None:
    framer = Framer(frame_size=1024)
    stream, begin = framer.begin(b"hh", [memoryview(b"x" * 10)])
    reassembler = Reassembler(10**6)
    reassembler.feed(begin)
    with pytest.raises(ProtocolError, match="overran"):
        reassembler.feed(bytes([CHUNK]) + stream.to_bytes(4, "big") + b"y" * 50)
    # the stream is gone: the session can carry on with new messages
    assert reassembler.feed(bytes([WHOLE]) + b"ok") == (b"ok", [])


async def test_in_memory_pair_delivers_in_order_with_flow_control() -> None:
    a, b = InMemoryTransport.pair(frame_size=1024, max_queued_frames=4)
    await a.start()
    await b.start()
    got: list[tuple[bytes, str]] = []
    done = asyncio.Event()

    def on_message(header: bytes, buffers: list[memoryview]) -> None:
        got.append((header, hashlib.sha256(b"".join(bytes(x) for x in buffers)).hexdigest()))
        if len(got) == 3:
            done.set()

    b.set_handlers(on_message, lambda reason: None)
    payload = np.arange(100_000, dtype=np.int64)
    await a.send(b"first")
    await a.send(b"big", [memoryview(payload)])
    await a.send(b"last")
    await asyncio.wait_for(done.wait(), 10)
    assert [h for h, _ in got] == [b"first", b"big", b"last"]
    assert got[1][1] == hashlib.sha256(payload.tobytes()).hexdigest()
    closed: list[str] = []
    a.set_handlers(lambda h, bufs: None, closed.append)
    await b.close()
    await asyncio.sleep(0.05)
    assert closed and a.closed


async def test_bad_frame_is_reported_and_the_channel_stays_up() -> None:
    a, b = InMemoryTransport.pair()
    await a.start()
    await b.start()
    errors: list[ProtocolError] = []
    got: list[bytes] = []
    b.on_error = errors.append
    b.set_handlers(lambda header, buffers: got.append(header), lambda reason: None)
    b.inject_frame(b"\x07garbage")
    await a.send(b"after")
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    assert len(errors) == 1 and "unknown frame kind" in str(errors[0])
    assert got == [b"after"]


async def test_a_frame_sent_while_the_endpoint_starts_is_delivered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer's thread can send at any moment of ``start()``. Here it sends the instant the
    inbox is being made: the old ``start`` had already published its loop, so the frame found
    a loop without an inbox and the sender died on an assertion (a CI run's pair never
    connected). The frame must wait in the backlog and arrive."""
    a, b = InMemoryTransport.pair()
    make_queue = asyncio.Queue

    def queue_while_the_peer_sends() -> asyncio.Queue[bytes | None]:
        monkeypatch.setattr(asyncio, "Queue", make_queue)
        a.inject_frame(bytes([WHOLE]) + b"early")
        return make_queue()

    got: list[bytes] = []
    a.set_handlers(lambda header, buffers: got.append(header), lambda reason: None)
    monkeypatch.setattr(asyncio, "Queue", queue_while_the_peer_sends)
    await a.start()
    await b.start()
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    assert got == [b"early"]
