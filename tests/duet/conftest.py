"""Fixtures shared by the session-level tests of the duet package."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.sessions import Pair, session_pair


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """An owner and a researcher connected in memory, with nothing shared yet (test modules
    that need shared data define their own ``pair``)."""
    with session_pair(tmp_path / "audit.db") as sessions:
        yield sessions
