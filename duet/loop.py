"""A private asyncio loop in a background thread: async written once, sync API derived from it.

Every session owns one. aiortc, signaling and the protocol run on it, so the transport keeps
answering ICE consent checks while the user's thread blocks in ``.get()`` or a notebook cell
runs for minutes, and it works the same in a script, IPython and ipykernel (whose own loop
we never touch).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import DuetTimeout

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "duet-loop", *, switch_interval: float | None = None) -> None:
        """``switch_interval``: lower the process's GIL switch interval to this many seconds
        (never raise it), so the loop is not kept waiting by another thread's slice."""
        if switch_interval is not None and sys.getswitchinterval() > switch_interval:
            sys.setswitchinterval(switch_interval)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Give tasks cancelled by stop() a chance to finish their cleanup.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result in the calling thread."""
        if self.in_loop_thread:
            coro.close()
            raise RuntimeError("LoopThread.run() called from its own loop: it would deadlock")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DuetTimeout(f"no result within {timeout} s") from None
        except KeyboardInterrupt:
            future.cancel()  # Ctrl-C / "interrupt kernel" stops the wait and the work
            raise

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback`` on the loop, after everything already scheduled, from any thread.
        From the loop's own thread the loop is awake: no write to its self-pipe (a system
        call, and a wake-up to read it back, per message sent)."""
        if self.loop.is_closed():
            return
        if self.in_loop_thread:
            self.loop.call_soon(callback, *args)
        else:
            self.loop.call_soon_threadsafe(callback, *args)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and join its thread; idempotent."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return  # closed meanwhile
        if not self.in_loop_thread:
            self._thread.join(timeout)
