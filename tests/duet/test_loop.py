"""duet.loop: the session's loop thread."""

from __future__ import annotations

import threading

from duet.loop import LoopThread


def test_call_soon_from_the_loop_thread_runs_after_what_other_threads_scheduled() -> None:
    """From its own thread ``call_soon`` skips the self-pipe wake-up; the send path relies on
    it still running callbacks in the order they were scheduled, whatever the thread."""
    loop = LoopThread()
    ran: list[str] = []
    done = threading.Event()

    def on_loop() -> None:
        assert loop.in_loop_thread
        other = threading.Thread(target=loop.call_soon, args=(ran.append, "from another thread"))
        other.start()
        other.join(5)  # scheduled while this callback holds the loop
        loop.call_soon(ran.append, "from the loop thread")
        loop.call_soon(done.set)

    try:
        loop.call_soon(on_loop)
        assert done.wait(5)
        assert ran == ["from another thread", "from the loop thread"]
    finally:
        loop.stop()


def test_call_soon_after_stop_is_ignored() -> None:
    loop = LoopThread()
    loop.stop()
    loop.call_soon(print, "never")  # a late send from a closing session: no error
