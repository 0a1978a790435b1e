"""Framing, chunking, flow control and limits, over the in-memory transport pair."""

from __future__ import annotations

import asyncio
import hashlib
import struct

import numpy as np
import pytest

from duet import ProtocolError
from duet.transport import (
    BEGIN,
    CHUNK,
    MAX_BUFFERS,
    PACKED,
    WHOLE,
    Framer,
    InMemoryTransport,
    Reassembler,
)


def frames_of(framer: Framer, header: bytes, buffers: list[memoryview]) -> list[bytes]:
    single = framer.single(header, buffers)
    if single is not None:
        return [single]
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


@pytest.mark.parametrize("sizes", [[0], [8], [8, 0, 100], [1024 - 7 - 8 - 5]])
def test_a_message_that_fits_travels_in_one_packed_frame(sizes: list[int]) -> None:
    """A small array (the usual answer to a request) is one frame, not a BEGIN and a CHUNK:
    one data-channel message and one acknowledgement each way instead of two."""
    rng = np.random.default_rng(2)
    buffers = [memoryview(rng.integers(0, 256, n, dtype=np.uint8)) for n in sizes]
    frames = frames_of(Framer(frame_size=1024), b"hello", buffers)
    assert len(frames) == 1 and frames[0][0] == PACKED and len(frames[0]) <= 1024
    done = Reassembler(max_message_bytes=10**6).feed(frames[0])
    assert done is not None
    header, out = done
    assert header == b"hello" and [bytes(b) for b in out] == [bytes(b) for b in buffers]
    for buffer in out:  # writable and its own, like a streamed message's buffers
        assert not buffer.readonly
    if out and len(out[0]):
        out[0][0] ^= 0xFF
        assert bytes(out[0]) != bytes(buffers[0]) and frames[0][-sum(sizes)] == buffers[0][0]


def test_a_message_one_byte_too_long_for_a_frame_is_streamed() -> None:
    framer = Framer(frame_size=1024)
    fits = [memoryview(b"x" * (1024 - 7 - 8 - 5))]
    assert len(frames_of(framer, b"hello", fits)) == 1
    frames = frames_of(framer, b"hello", [memoryview(b"x" * (1024 - 7 - 8 - 5 + 1))])
    assert [f[0] for f in frames] == [BEGIN, CHUNK]
    assert frames_of(framer, b"h" * 1023, []) == [bytes([WHOLE]) + b"h" * 1023]
    assert [f[0] for f in frames_of(framer, b"h" * 1024, [])] == [BEGIN, CHUNK, CHUNK]


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
    (bytes([PACKED]) + b"\x00\x00", "truncated PACKED"),
    (struct.pack("!BIH", PACKED, 0, 3) + b"\x00" * 16, "truncated PACKED"),
    (struct.pack("!BIH", PACKED, 0, MAX_BUFFERS + 1) + b"\x00" * 8 * (MAX_BUFFERS + 1),
     "at most 4096 buffers"),
    (struct.pack("!BIH", PACKED, 2**31, 0) + b"h", "header of 2147483648 bytes"),
    (struct.pack("!BIHQ", PACKED, 2, 1, 2**62) + b"hh" + b"x" * 8, "does not match its sizes"),
    (struct.pack("!BIHQ", PACKED, 2, 1, 4) + b"hh" + b"x" * 8, "does not match its sizes"),
    (struct.pack("!BIHQ", PACKED, 2, 1, 4) + b"hh", "does not match its sizes"),
])
def test_bad_frames_raise_protocol_error(frame: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        Reassembler(10**6).feed(frame)


def test_oversized_message_is_refused_before_allocation() -> None:
    framer = Framer(frame_size=1024)
    _, begin = framer.begin(b"h", [memoryview(b"x" * 2000)])
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        Reassembler(max_message_bytes=1000).feed(begin)
    packed = framer.single(b"h", [memoryview(b"x" * 200)])
    assert packed is not None
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        Reassembler(max_message_bytes=100).feed(packed)


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


async def test_small_messages_wait_for_room_too() -> None:
    """A burst of one-frame messages waits for the peer to read, as a streamed one does:
    otherwise 10,000 queued requests all sit in the channel's buffer, and a ping sent after
    them waits behind every one."""
    a, b = InMemoryTransport.pair(frame_size=1024, max_queued_frames=4)
    await a.start()
    await b.start()
    events: list[str] = []
    b.set_handlers(lambda header, buffers: events.append("read"), lambda reason: None)
    for i in range(12):
        await a.send(b"small %d" % i)
        events.append("sent")
    while events.count("read") < 12:
        await asyncio.sleep(0.01)
    fifth_sent = [i for i, event in enumerate(events) if event == "sent"][4]
    assert "read" in events[:fifth_sent], events  # four fill the peer: the fifth waited


async def test_an_urgent_message_does_not_wait_for_room() -> None:
    """Pings and pongs go at once: the main lane keeps the channel at its limit during a
    flood, and an urgent message waiting for room would wait out the whole flood."""
    a, b = InMemoryTransport.pair(frame_size=1024, max_queued_frames=4)
    await a.start()
    await b.start()
    events: list[str] = []
    b.set_handlers(lambda header, buffers: events.append(header.decode()), lambda r: None)
    for i in range(4):
        await a.send(b"main %d" % i)  # the peer is full now
    await a.send(b"ping", urgent=True)
    events.append("ping sent")
    await a.send(b"main 4")
    while len(events) < 7:
        await asyncio.sleep(0.01)
    assert events[0] == "ping sent", events  # nothing was read before it left
    assert events[1:] == ["main 0", "main 1", "main 2", "main 3", "ping", "main 4"]


@pytest.mark.parametrize("frame, message", [
    (b"\x07garbage", "unknown frame kind"),
    (struct.pack("!BIHQ", PACKED, 2, 1, 2**62) + b"hh", "does not match its sizes"),
])
async def test_bad_frame_is_reported_and_the_channel_stays_up(frame: bytes,
                                                              message: str) -> None:
    a, b = InMemoryTransport.pair()
    await a.start()
    await b.start()
    errors: list[ProtocolError] = []
    got: list[tuple[bytes, list[bytes]]] = []
    b.on_error = errors.append
    b.set_handlers(lambda header, buffers: got.append((header, [bytes(x) for x in buffers])),
                   lambda reason: None)
    b.inject_frame(frame)
    await a.send(b"after", [memoryview(b"small")])
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    assert len(errors) == 1 and message in str(errors[0])
    assert got == [(b"after", [b"small"])]


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
