"""Fixtures: the real server as a console-script subprocess, and in-process servers with small
limits for the tests that exercise those limits."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.helpers.signaling import start_signaling_server

Connect = Callable[..., Awaitable[aiohttp.ClientWebSocketResponse]]


@pytest.fixture(scope="session")
def subprocess_server() -> Iterator[str]:
    """``duet-signaling`` started through its console script with default limits."""
    with start_signaling_server() as url:
        yield url


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open raw protocol WebSockets to ``<url>/ws``; all are closed after the test (no limit
    on how many are open at once: aiohttp's default pool stops at 100)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def open_ws(url: str, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
            return await session.ws_connect(f"{url}/ws", **kwargs)

        yield open_ws
