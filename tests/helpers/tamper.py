"""A hostile signaling server: relays through the real one, rewriting every SDP it carries.

It plays the attack the join code's MAC defends against: a server that swaps the DTLS
fingerprint (or anything else) in the offer or answer to put itself in the middle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterator

import aiohttp
from aiohttp import web

from duet.loop import LoopThread

Rewrite = Callable[[str], str]


def swap_fingerprint(envelope: str) -> str:
    """Replace the DTLS fingerprint in a sealed SDP, keeping the (now invalid) MAC."""
    data = json.loads(envelope)
    data["sdp"] = re.sub(
        r"(a=fingerprint:sha-256 )[0-9A-F:]+", r"\g<1>" + ":".join(["AB"] * 32), data["sdp"]
    )
    return json.dumps(data)


def _app(upstream: str, rewrite: Rewrite, seen: list[str]) -> web.Application:
    async def relay(request: web.Request) -> web.WebSocketResponse:
        client = web.WebSocketResponse()
        await client.prepare(request)
        async with aiohttp.ClientSession() as http, http.ws_connect(upstream + "/ws") as server:

            async def down() -> None:
                async for msg in server:
                    text = msg.data
                    data = json.loads(text)
                    if data.get("type") == "signal":
                        seen.append(data["kind"])
                        data["payload"] = rewrite(data["payload"])
                        text = json.dumps(data)
                    await client.send_str(text)
                await client.close()

            task = asyncio.ensure_future(down())
            async for msg in client:
                await server.send_str(msg.data)
            task.cancel()
        return client

    app = web.Application()
    app.router.add_get("/ws", relay)
    return app


@contextlib.contextmanager
def tampering_relay(
    upstream: str, rewrite: Rewrite = swap_fingerprint
) -> Iterator[tuple[str, list[str]]]:
    """Yields (URL of the hostile relay, list of signal kinds it rewrote)."""
    loop = LoopThread(name="tampering-relay")
    seen: list[str] = []

    async def start() -> web.AppRunner:
        runner = web.AppRunner(_app(upstream, rewrite, seen))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner

    runner = loop.run(start(), timeout=10)
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        loop.run(runner.cleanup(), timeout=10)
        loop.stop()
