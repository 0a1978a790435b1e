"""Fixtures shared by the end-to-end tests: a real signaling server subprocess."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.signaling import start_signaling_server


@pytest.fixture(scope="session")
def signaling_url() -> Iterator[str]:
    """One real ``duet-signaling`` process for the whole run (rooms are independent)."""
    with start_signaling_server(max_connections_per_ip=1000) as url:
        yield url
