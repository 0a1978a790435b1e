"""Fixtures shared by the end-to-end tests: a real signaling server subprocess."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from signaling_server import ServerConfig, ServerHandle, start_server
from tests.helpers.signaling import MakeServer, start_signaling_server


@pytest.fixture(scope="session")
def signaling_url() -> Iterator[str]:
    """One real ``duet-signaling`` process for the whole run (rooms are independent)."""
    with start_signaling_server(max_connections_per_ip=1000) as url:
        yield url


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    """Start in-process servers on free ports, e.g. ``await make_server(max_rooms=2)``."""
    handles: list[ServerHandle] = []

    async def make(**settings: Any) -> str:
        handle = await start_server(ServerConfig(host="127.0.0.1", port=0, **settings))
        handles.append(handle)
        return handle.url

    yield make
    for handle in handles:
        await handle.stop()
