"""duet's signaling client against real servers: pairing, and a PairingError for every failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from aiohttp import web

from duet.codes import JoinCode
from duet.errors import PairingError
from duet.signaling import SignalingClient, normalize_server_url
from signaling_server import ServerConfig, start_server
from signaling_server.messages import MAX_PAYLOAD_CHARS
from tests.helpers.signaling import MakeServer, free_port, start_signaling_server


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with start_signaling_server() as url:
        yield url


@pytest.fixture
async def serve_app() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Serve an arbitrary aiohttp app: a server that is not (or not quite) a signaling server."""
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield serve
    for runner in runners:
        await runner.cleanup()


def room() -> str:
    return JoinCode.generate().room_id


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("localhost:8765", "ws://localhost:8765/ws"),
        ("localhost", "ws://localhost:8765/ws"),
        ("  127.0.0.1:9000  ", "ws://127.0.0.1:9000/ws"),
        ("http://127.0.0.1:9000", "ws://127.0.0.1:9000/ws"),
        ("http://127.0.0.1:9000/", "ws://127.0.0.1:9000/ws"),
        ("https://signal.example.org", "wss://signal.example.org/ws"),
        ("HTTPS://Signal.Example.org:8443/duet/", "wss://signal.example.org:8443/duet/ws"),
        ("ws://h:1/ws", "ws://h:1/ws"),
        ("wss://h/ws?tenant=a", "wss://h/ws?tenant=a"),
        ("[::1]:8765", "ws://[::1]:8765/ws"),
    ],
)
def test_normalize_server_url(given: str, expected: str) -> None:
    assert normalize_server_url(given) == expected


@pytest.mark.parametrize(
    "bad", ["", "   ", "ftp://h:1", "http://h:99999", "http://h:port", "http://", "http://u:p@h:1"]
)
def test_normalize_server_url_rejects(bad: str) -> None:
    with pytest.raises(PairingError, match="signaling server URL"):
        normalize_server_url(bad)


async def test_pairing_exchanges_offer_and_answer(server_url: str) -> None:
    room_id = room()
    owner = await SignalingClient.create_room(server_url, room_id)
    researcher = await SignalingClient.join_room(server_url, room_id)
    await owner.wait_peer_joined(timeout=10)
    await owner.send_signal("offer", "OFFER")
    assert await researcher.receive_signal("offer", timeout=10) == "OFFER"
    await researcher.send_signal("answer", "ANSWER")
    assert await owner.receive_signal("answer", timeout=10) == "ANSWER"
    for client in (owner, researcher):
        await client.close()
        await client.close()  # idempotent


async def test_full_size_offer_is_relayed(server_url: str) -> None:
    room_id = room()
    payload = ("v=0\r\na=fingerprint:sha-256 AB:CD\r\n" * 3000)[:MAX_PAYLOAD_CHARS]
    owner = await SignalingClient.create_room(server_url, room_id)
    researcher = await SignalingClient.join_room(server_url, room_id)
    await owner.send_signal("offer", payload)  # waits for peer_joined by itself
    assert await researcher.receive_signal("offer", timeout=10) == payload
    await researcher.send_signal("answer", "a")
    assert await owner.receive_signal("answer", timeout=10) == "a"
    await owner.close()
    await researcher.close()


async def test_oversized_or_misdirected_signals_fail_clearly(server_url: str) -> None:
    owner = await SignalingClient.create_room(server_url, room())
    with pytest.raises(PairingError, match="too large"):
        await owner.send_signal("offer", "x" * (MAX_PAYLOAD_CHARS + 1))
    with pytest.raises(PairingError, match="owner sends the offer"):
        await owner.send_signal("answer", "a")
    with pytest.raises(PairingError, match="owner receives the answer"):
        await owner.receive_signal("offer")
    await owner.close()


async def test_join_unknown_room(server_url: str) -> None:
    with pytest.raises(PairingError, match="no room for this join code"):
        await SignalingClient.join_room(server_url, room())


async def test_malformed_room_id(server_url: str) -> None:
    with pytest.raises(PairingError, match="malformed room id"):
        await SignalingClient.join_room(server_url, "K7QF-2M9X")


async def test_code_used_twice(server_url: str) -> None:
    room_id = room()
    owner = await SignalingClient.create_room(server_url, room_id)
    researcher = await SignalingClient.join_room(server_url, room_id)
    with pytest.raises(PairingError, match="already used"):
        await SignalingClient.join_room(server_url, room_id)
    await owner.send_signal("offer", "o")
    await researcher.receive_signal("offer")
    await researcher.send_signal("answer", "a")
    await owner.receive_signal("answer")
    with pytest.raises(PairingError, match="already used"):
        await SignalingClient.join_room(server_url, room_id)
    with pytest.raises(PairingError, match="already exists"):
        await SignalingClient.create_room(server_url, room_id)
    await owner.close()
    await researcher.close()


async def test_expired_room(make_server: MakeServer) -> None:
    url = await make_server(room_ttl=0.3)
    room_id = room()
    owner = await SignalingClient.create_room(url, room_id)
    with pytest.raises(PairingError, match="room expired: ask the owner for a new code"):
        await owner.wait_peer_joined(timeout=10)
    with pytest.raises(PairingError, match="room expired"):  # the failure sticks
        await owner.send_signal("offer", "o")
    with pytest.raises(PairingError, match="room expired"):
        await SignalingClient.join_room(url, room_id)
    await owner.close()


async def test_pings_keep_a_waiting_owner_connected(make_server: MakeServer) -> None:
    url = await make_server(idle_timeout=0.3)
    room_id = room()
    owner = await SignalingClient.create_room(url, room_id)
    await asyncio.sleep(1.0)  # more than three idle timeouts without the owner doing anything
    researcher = await SignalingClient.join_room(url, room_id)
    await owner.wait_peer_joined(timeout=10)
    await owner.close()
    await researcher.close()


async def test_wait_timeout_is_not_fatal(server_url: str) -> None:
    room_id = room()
    owner = await SignalingClient.create_room(server_url, room_id)
    with pytest.raises(PairingError, match="timed out"):
        await owner.wait_peer_joined(timeout=0.2)
    researcher = await SignalingClient.join_room(server_url, room_id)
    await owner.wait_peer_joined(timeout=10)
    await owner.close()
    await researcher.close()


async def test_peer_leaving_fails_the_other_side(server_url: str) -> None:
    room_id = room()
    owner = await SignalingClient.create_room(server_url, room_id)
    researcher = await SignalingClient.join_room(server_url, room_id)
    await researcher.close("changed my mind")
    with pytest.raises(PairingError, match=r"researcher left .*changed my mind"):
        await owner.receive_signal("answer", timeout=10)
    await owner.close()

    room_id = room()
    owner = await SignalingClient.create_room(server_url, room_id)
    researcher = await SignalingClient.join_room(server_url, room_id)
    await owner.close()
    with pytest.raises(PairingError, match="owner left"):
        await researcher.receive_signal("offer", timeout=10)
    await researcher.close()


async def test_server_not_running() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PairingError, match="cannot reach the signaling server .* is it running"):
        await SignalingClient.create_room(url, room())


async def test_not_a_signaling_server(
    serve_app: Callable[[web.Application], Awaitable[str]],
) -> None:
    url = await serve_app(web.Application())
    with pytest.raises(PairingError, match=r"not a duet signaling server \(HTTP 404"):
        await SignalingClient.create_room(url, room())


async def test_malformed_server_reply(
    serve_app: Callable[[web.Application], Awaitable[str]],
) -> None:
    async def garbage(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await ws.send_str('{"type": "created", "room": "nope"}')
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/ws", garbage)
    url = await serve_app(app)
    with pytest.raises(PairingError, match="malformed message"):
        await SignalingClient.create_room(url, room())


async def test_unresponsive_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, never answer the handshake

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(PairingError, match="no answer from the signaling server"):
            await SignalingClient.create_room(f"127.0.0.1:{port}", room(), timeout=0.3)


async def test_server_shutdown_while_waiting() -> None:
    handle = await start_server(ServerConfig(host="127.0.0.1", port=0))
    owner = await SignalingClient.create_room(handle.url, room())
    stopping = asyncio.create_task(handle.stop())
    with pytest.raises(PairingError, match="shutting down"):
        await owner.wait_peer_joined(timeout=10)
    await owner.close()
    await stopping


async def test_connection_limit(make_server: MakeServer) -> None:
    url = await make_server(max_connections_per_ip=1)
    owner = await SignalingClient.create_room(url, room())
    with pytest.raises(PairingError, match="at its limit"):
        await SignalingClient.create_room(url, room())
    await owner.close()
