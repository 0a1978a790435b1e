"""duet.ipc: frames between the owner's kernel and its worker."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import psutil

from duet import ipc


def test_a_frame_the_socket_cannot_take_at_once_is_finished_in_order_by_a_blocking_writer() -> None:
    """``send_without_waiting`` never blocks: it writes what fits and returns the rest; the
    rest, written later, completes the very same frame, and the next frame follows it."""
    kernel, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    big = np.arange(2_000_000, dtype=np.float64)  # 16 MB: far beyond the socket's buffer
    small = ipc.frame_parts(b"second", [b"x"])
    rest = ipc.send_without_waiting(kernel, ipc.frame_parts(b"first", [big, b"tail"]))
    assert rest and sum(part.nbytes for part in rest) < big.nbytes + 100
    received: list[tuple[bytes, list[memoryview]] | None] = []
    first_read = threading.Event()

    def read_two() -> None:
        received.append(ipc.recv_frame(worker, 1 << 30))
        first_read.set()
        received.append(ipc.recv_frame(worker, 1 << 30))

    reader = threading.Thread(target=read_two)
    reader.start()
    ipc.send_parts(kernel, rest)
    assert first_read.wait(30)
    assert ipc.send_without_waiting(kernel, small) == []  # an empty socket takes it whole
    reader.join(30)
    (header, buffers), second = received
    assert header == b"first" and bytes(buffers[1]) == b"tail"
    assert np.array_equal(np.frombuffer(buffers[0], dtype=np.float64), big)
    assert second is not None and second[0] == b"second" and bytes(second[1][0]) == b"x"
    kernel.close()
    worker.close()


def test_a_broken_socket_leaves_the_frame_to_the_writer_that_reports_it() -> None:
    kernel, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker.close()
    parts = ipc.frame_parts(b"lost", [b"1234"])
    assert ipc.send_without_waiting(kernel, parts) == parts
    kernel.close()


def test_a_frame_reader_takes_frames_that_arrive_together_or_byte_by_byte() -> None:
    """One read can bring several frames, or a piece of one: each comes out whole, in order,
    and what was read ahead is reported as pending."""
    kernel, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    big = np.arange(100_000, dtype=np.float64)  # larger than a read: read straight into place
    frames = [(b"first", [b"ab", b""]), (b"", []), (b"third", [big])]
    wire = b"".join(bytes(part) for header, buffers in frames
                    for part in ipc.frame_parts(header, buffers))
    reader = ipc.FrameReader(worker, 1 << 30, chunk=4096)
    kernel.sendall(wire[:40])  # all of the first frame and the start of the second
    header, buffers = reader.read() or (b"", [])
    assert header == b"first" and [bytes(b) for b in buffers] == [b"ab", b""]
    assert reader.pending

    def trickle() -> None:
        for i in range(40, 200):
            kernel.sendall(wire[i:i + 1])
        kernel.sendall(wire[200:])

    writer = threading.Thread(target=trickle)
    writer.start()
    assert reader.read() == (b"", [])
    header, buffers = reader.read() or (b"", [])
    writer.join(30)
    assert header == b"third" and np.array_equal(np.frombuffer(buffers[0]), big)
    assert not reader.pending
    kernel.close()
    assert reader.read() is None  # the end of the stream


def test_frame_buffers_are_writable_copies_of_their_own() -> None:
    """Arrays the worker builds over received buffers must not share memory with each other
    or with the next frame (one read brought them all)."""
    kernel, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for header in (b"one", b"two"):
        ipc.send_frame(kernel, header, [b"\x00" * 8, b"\x01" * 8])
    reader = ipc.FrameReader(worker, 1 << 20)
    _, first = reader.read() or (b"", [])
    first[0][:] = b"\xff" * 8
    _, second = reader.read() or (b"", [])
    assert bytes(first[1]) == b"\x01" * 8
    assert [bytes(b) for b in second] == [b"\x00" * 8, b"\x01" * 8]
    assert not first[0].readonly
    kernel.close()
    worker.close()


def test_a_frame_cut_short_by_the_end_of_the_stream_is_no_frame() -> None:
    kernel, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    wire = b"".join(bytes(part) for part in ipc.frame_parts(b"header", [b"12345678"]))
    kernel.sendall(wire[:-3])
    kernel.close()
    assert ipc.FrameReader(worker, 1 << 20).read() is None
    worker.close()


def test_a_header_claiming_a_huge_buffer_costs_only_what_arrives() -> None:
    """The worker is untrusted: a frame announcing 60 GiB and sending ten bytes must not make
    the kernel's reader allocate 60 GiB (it zero-filled the whole claim up front)."""
    kernel, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    claim = 60 << 30
    worker.sendall(struct.pack("<IQQ", 1, 2, claim) + b"{}" + b"0123456789")
    worker.close()
    before = psutil.Process().memory_info().rss
    assert ipc.FrameReader(kernel, 1 << 40).read() is None
    assert psutil.Process().memory_info().rss - before < 200 << 20
    kernel.close()


def test_a_buffer_larger_than_one_step_of_growth_arrives_whole() -> None:
    kernel, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    big = np.random.default_rng(0).integers(0, 255, (70 << 20), dtype=np.uint8)
    writer = threading.Thread(target=ipc.send_frame, args=(worker, b"big", [big, b"tail"]))
    writer.start()
    header, buffers = ipc.FrameReader(kernel, 1 << 40).read() or (b"", [])
    writer.join(30)
    assert header == b"big" and bytes(buffers[1]) == b"tail"
    assert np.array_equal(np.frombuffer(buffers[0], dtype=np.uint8), big)
    kernel.close()
    worker.close()
