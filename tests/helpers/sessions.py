"""An owner and a researcher session connected in memory: fast tests of the layers above."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from duet.config import SessionConfig
from duet.owner import OwnerSession
from duet.researcher import ResearcherSession
from duet.transport import InMemoryTransport

Pair = tuple[OwnerSession, ResearcherSession]


@contextlib.contextmanager
def session_pair(audit_path: Path, *, frame_size: int = 64 * 1024,
                 researcher_config: SessionConfig | None = None,
                 **owner_kwargs: Any) -> Iterator[tuple[OwnerSession, ResearcherSession]]:
    """Both sessions run their real loop threads, worker process and protocol, wired the way
    ``launch``/``join`` wire them (``Session.start`` with a transport); only the wire is fake."""
    owner_end, researcher_end = InMemoryTransport.pair(frame_size=frame_size)
    config = owner_kwargs.pop("config", SessionConfig(progress=False))
    owner = OwnerSession(config, audit_path=audit_path, **owner_kwargs)
    researcher = ResearcherSession(researcher_config or SessionConfig(progress=False))
    owner.start(owner_end.start)
    researcher.start(researcher_end.start)
    try:
        assert researcher._wait_ready(10), "in-memory pair did not connect"
        assert owner._wait_ready(10)
        # The worker is a fresh interpreter importing numpy and torch: seconds on a busy
        # machine. Tests wait for it here, so their own waits measure operations, not startup.
        owner.worker_usage(120)
        yield owner, researcher
    finally:
        researcher.close()
        owner.close()


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``check()`` is true; fail the test if it never becomes true."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)
