"""duet.ipc: frames between the owner's kernel and its worker."""

from __future__ import annotations

import socket
import threading

import numpy as np

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
    reader = threading.Thread(target=lambda: received.extend(
        ipc.recv_frame(worker, 1 << 30) for _ in range(2)))
    reader.start()
    ipc.send_parts(kernel, rest)
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
