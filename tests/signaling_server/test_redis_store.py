"""Several real ``duet-signaling`` replicas sharing rooms through a real ``redis-server``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest

import duet
from signaling_server.messages import PROTOCOL_VERSION
from tests.helpers.redis import RedisServer, redis_server
from tests.helpers.signaling import SignalingServerProcess, receive_json, send_json

from .conftest import Connect


@contextlib.contextmanager
def replicas(redis: RedisServer, count: int,
             **flags: Any) -> Iterator[list[SignalingServerProcess]]:
    """``count`` duet-signaling processes on one Redis."""
    with contextlib.ExitStack() as stack:
        servers = []
        for _ in range(count):
            log = stack.enter_context(tempfile.TemporaryFile())
            server = SignalingServerProcess(log, store=redis.url, max_connections_per_ip=1000,
                                            **flags)
            stack.callback(server.stop)
            servers.append(server)
        for server in servers:
            server.wait_healthy()
        yield servers


def health(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def create(room: str) -> dict[str, Any]:
    return {"type": "create", "version": PROTOCOL_VERSION, "room": room}


def join(room: str) -> dict[str, Any]:
    return {"type": "join", "version": PROTOCOL_VERSION, "room": room}


async def created(connect: Connect, url: str, room: str) -> aiohttp.ClientWebSocketResponse:
    """An owner's socket on ``url`` whose room ``room`` is open."""
    owner = await connect(url)
    await send_json(owner, create(room))
    assert (await receive_json(owner))["type"] == "created"
    return owner


async def joined(connect: Connect, url: str, room: str,
                 owner: aiohttp.ClientWebSocketResponse) -> aiohttp.ClientWebSocketResponse:
    """A researcher's socket on ``url`` in ``owner``'s room, the owner told of it."""
    researcher = await connect(url)
    await send_json(researcher, join(room))
    assert (await receive_json(researcher))["type"] == "joined"
    assert (await receive_json(owner))["type"] == "peer_joined"
    return researcher


async def pair_raw(connect: Connect, owner_url: str, researcher_url: str) -> None:
    """A whole pairing: owner on one replica, researcher on another."""
    room = secrets.token_hex(16)
    owner = await created(connect, owner_url, room)
    researcher = await joined(connect, researcher_url, room, owner)
    await send_json(owner, {"type": "signal", "kind": "offer", "payload": "sealed offer"})
    offer = await receive_json(researcher)
    assert (offer["kind"], offer["payload"]) == ("offer", "sealed offer")
    await send_json(researcher, {"type": "signal", "kind": "answer", "payload": "sealed answer"})
    answer = await receive_json(owner)
    assert (answer["kind"], answer["payload"]) == ("answer", "sealed answer")
    await owner.close()
    await researcher.close()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


async def test_owner_and_researcher_pair_through_different_replicas(
        redis: RedisServer, connect: Connect) -> None:
    with replicas(redis, 3) as (a, b, c):
        for url in (a.url, b.url, c.url):
            status, body = health(url)
            assert status == 200 and body["store"] == {"kind": "redis", "healthy": True}
        await pair_raw(connect, a.url, b.url)
        await pair_raw(connect, c.url, a.url)
        assert health(b.url)[1]["rooms"] == 0  # paired rooms are gone everywhere


async def test_exactly_one_of_a_hundred_racing_joiners_wins(redis: RedisServer,
                                                           connect: Connect) -> None:
    with replicas(redis, 3) as servers:
        room = secrets.token_hex(16)
        owner = await connect(servers[0].url)
        await send_json(owner, create(room))
        assert (await receive_json(owner))["type"] == "created"
        sockets = await asyncio.gather(*(connect(servers[i % 3].url) for i in range(100)))
        await asyncio.gather(*(send_json(ws, join(room)) for ws in sockets))
        replies = await asyncio.gather(*(receive_json(ws) for ws in sockets))
        kinds = [r["type"] if r["type"] == "joined" else r["code"] for r in replies]
        assert kinds.count("joined") == 1 and kinds.count("room_full") == 99
        assert (await receive_json(owner))["type"] == "peer_joined"
        for ws in [owner, *sockets]:
            await ws.close()


async def test_expiry_and_tombstones_are_seen_by_every_replica(redis: RedisServer,
                                                              connect: Connect) -> None:
    with replicas(redis, 2, room_ttl=1.0) as (a, b):
        expiring = secrets.token_hex(16)
        owner = await connect(a.url)
        await send_json(owner, create(expiring))
        assert (await receive_json(owner))["type"] == "created"
        expired = await receive_json(owner, timeout=10)  # replica A's timer
        assert expired["code"] == "expired"
        late = await connect(b.url)
        await send_json(late, join(expiring))
        assert (await receive_json(late))["code"] == "expired"
        again = await connect(b.url)
        await send_json(again, create(expiring))  # a tombstone: the id is never reused
        assert (await receive_json(again))["code"] == "room_exists"

        used = secrets.token_hex(16)
        first = await connect(a.url)
        await send_json(first, create(used))
        await receive_json(first)
        joiner = await connect(b.url)
        await send_json(joiner, join(used))
        assert (await receive_json(joiner))["type"] == "joined"
        assert (await receive_json(first))["type"] == "peer_joined"
        await send_json(joiner, {"type": "leave", "reason": "changed my mind"})
        left = await receive_json(first)
        assert left["type"] == "peer_left" and left["reason"] == "changed my mind"
        third = await connect(a.url)
        await send_json(third, join(used))
        assert (await receive_json(third))["code"] == "unknown_room"  # closed by its peer
        for ws in (owner, late, again, first, joiner, third):
            await ws.close()


async def test_redis_restart_fails_only_pairings_in_flight(connect: Connect) -> None:
    with redis_server() as redis, replicas(redis, 2) as (a, b):
        waiting = await connect(a.url)
        await send_json(waiting, create(secrets.token_hex(16)))
        assert (await receive_json(waiting))["type"] == "created"
        redis.kill()
        failure = await receive_json(waiting, timeout=20)  # its mailbox read broke
        assert failure["code"] == "unavailable" and "try again" in failure["message"]
        status, body = health(a.url)
        assert status == 503 and body["store"] == {"kind": "redis", "healthy": False}
        refused = await connect(b.url)
        await send_json(refused, create(secrets.token_hex(16)))
        assert (await receive_json(refused))["code"] == "unavailable"
        redis.start()
        for server in (a, b):
            for _ in range(100):
                if health(server.url)[0] == 200:
                    break
                await asyncio.sleep(0.1)
            assert health(server.url)[0] == 200
        await pair_raw(connect, b.url, a.url)  # later pairings work
        for ws in (waiting, refused):
            await ws.close()


async def test_a_replica_killed_mid_pairing_leaves_the_others_working(
        redis: RedisServer, connect: Connect) -> None:
    with replicas(redis, 3, room_ttl=2.0) as (a, b, c):
        room = secrets.token_hex(16)
        owner = await created(connect, a.url, room)
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(10)
        closed = await owner.receive(timeout=10)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                               aiohttp.WSMsgType.ERROR)
        await asyncio.sleep(2.5)  # the dead replica's room expires in Redis by itself
        late = await connect(b.url)
        await send_json(late, join(room))
        assert (await receive_json(late))["code"] == "expired"
        await pair_raw(connect, b.url, c.url)
        await late.close()


async def test_a_joined_researcher_hears_of_expiry_when_the_owners_replica_died(
        redis: RedisServer, connect: Connect) -> None:
    with replicas(redis, 2, room_ttl=2.0) as (a, b):
        room = secrets.token_hex(16)
        owner = await created(connect, a.url, room)
        researcher = await joined(connect, b.url, room, owner)
        a.process.send_signal(signal.SIGKILL)  # nobody is left to tell the researcher "left"
        a.process.wait(10)
        expired = await receive_json(researcher, timeout=10)  # replica B's own timer
        assert expired["code"] == "expired" and "expired after 2 s" in expired["message"]
        closed = await researcher.receive(timeout=10)
        assert closed.type == aiohttp.WSMsgType.CLOSE
        assert health(b.url)[1]["rooms"] == 0
        await owner.close()


async def test_expiry_reaches_each_peer_once_across_replicas(redis: RedisServer,
                                                             connect: Connect) -> None:
    with replicas(redis, 2, room_ttl=1.0) as (a, b):
        room = secrets.token_hex(16)
        owner = await created(connect, a.url, room)
        researcher = await joined(connect, b.url, room, owner)
        for ws in (owner, researcher):  # both timers fire: one deletes the room and tells both
            assert (await receive_json(ws, timeout=10))["code"] == "expired"
            closed = await ws.receive(timeout=10)
            assert closed.type == aiohttp.WSMsgType.CLOSE, closed  # no second "expired"


async def test_a_room_past_its_deadline_cannot_be_joined_while_its_keys_linger(
        redis: RedisServer, connect: Connect) -> None:
    # The owner's replica died, so nobody deleted the room at its deadline; its keys linger in
    # Redis for a grace period. Another room created meanwhile prunes the deadline index: the
    # lingering room must still read as expired, not as a room waiting for its researcher.
    with replicas(redis, 2, room_ttl=1.0) as (a, b):
        room = secrets.token_hex(16)
        owner = await created(connect, a.url, room)
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(10)
        await asyncio.sleep(1.5)
        other = await created(connect, b.url, secrets.token_hex(16))  # prunes past deadlines
        late = await connect(b.url)
        await send_json(late, join(room))
        assert (await receive_json(late))["code"] == "expired"
        for ws in (owner, other, late):
            await ws.close()


def test_real_duet_sessions_pair_across_replicas(redis: RedisServer) -> None:
    with replicas(redis, 2) as (a, b):
        owner = duet.launch(server=a.url, ice_servers=[], show=False,
                            audit_path=tempfile.mktemp(suffix=".db"))
        try:
            owner.share(np.arange(10.0), name="ages")
            researcher = duet.join(owner.code, server=b.url, ice_servers=[])
            try:
                handle = researcher.np.mean(researcher.store.wait_for("ages", 30)).request("m")
                request = owner.requests.wait(30)
                assert request is not None
                request.approve()
                assert handle.result(30) == 4.5
            finally:
                researcher.close()
        finally:
            owner.close()


async def test_a_replica_starts_while_redis_is_down_and_recovers(connect: Connect) -> None:
    redis = RedisServer()  # not started yet: its port refuses connections
    try:
        with tempfile.TemporaryFile() as log:
            server = SignalingServerProcess(log, store=redis.url)
            try:
                for _ in range(150):
                    try:
                        status, body = health(server.url)
                        break
                    except OSError:
                        await asyncio.sleep(0.1)
                assert status == 503 and body["store"] == {"kind": "redis", "healthy": False}
                redis.start()
                for _ in range(100):
                    if health(server.url)[0] == 200:
                        break
                    await asyncio.sleep(0.1)
                assert health(server.url)[0] == 200
                await pair_raw(connect, server.url, server.url)
            finally:
                server.stop()
    finally:
        redis.kill()
