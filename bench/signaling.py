"""Benchmark the signaling server on loopback and print the figures as JSON.

Starts ``duet-signaling`` as a subprocess (limits raised: every socket comes from 127.0.0.1),
then with duet's own client measures

* N concurrent pairings (owner creates, researcher joins, offer and answer relayed) for
  N = 100 and 1000: latency of one pairing (median, p99) and pairings per second;
* the server's resident memory per open room: RSS growth while 1000 owners wait in rooms.

Usage: ``python bench/signaling.py [--sizes 100 1000] [--open-rooms 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import psutil

from duet.codes import JoinCode
from duet.signaling import SignalingClient

OFFER = "v=0\r\n" + "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host\r\n" * 40
ANSWER = OFFER.replace("50000", "50001")
_T = TypeVar("_T")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
        body: dict[str, Any] = json.load(response)
        return body


def _start_server(connections: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("duet-signaling")),
        *("--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"),
        *("--max-connections-per-ip", str(connections), "--max-rooms", str(connections)),
    ]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            _health(url)
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the signaling server did not start") from None
            time.sleep(0.05)


async def _pairing(url: str) -> float:
    """One full pairing; returns its latency in seconds."""
    room = JoinCode.generate().room_id
    start = time.perf_counter()
    owner = await SignalingClient.create_room(url, room, timeout=60)
    researcher = await SignalingClient.join_room(url, room, timeout=60)
    try:
        await owner.send_signal("offer", OFFER)
        assert await researcher.receive_signal("offer", timeout=60) == OFFER
        await researcher.send_signal("answer", ANSWER)
        assert await owner.receive_signal("answer", timeout=60) == ANSWER
        return time.perf_counter() - start
    finally:
        await owner.close()
        await researcher.close()


async def _concurrent_pairings(url: str, n: int) -> dict[str, Any]:
    start = time.perf_counter()
    latencies = sorted(await asyncio.gather(*(_pairing(url) for _ in range(n))))
    wall = time.perf_counter() - start
    return {
        "n": n,
        "wall_s": round(wall, 3),
        "pairings_per_s": round(n / wall, 1),
        "latency_ms_median": round(statistics.median(latencies) * 1000, 2),
        "latency_ms_p99": round(latencies[min(n - 1, int(n * 0.99))] * 1000, 2),
    }


async def _rss_per_open_room(url: str, pid: int, rooms: int) -> dict[str, Any]:
    server = psutil.Process(pid)
    before = server.memory_info().rss
    owners = await asyncio.gather(
        *(
            SignalingClient.create_room(url, JoinCode.generate().room_id, timeout=60)
            for _ in range(rooms)
        )
    )
    open_rooms = (await asyncio.to_thread(_health, url))["rooms"]
    after = server.memory_info().rss
    await asyncio.gather(*(owner.close() for owner in owners))
    return {
        "open_rooms": open_rooms,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "rss_per_open_room_kib": round((after - before) / open_rooms / 1024, 2),
    }


async def _pairings(url: str, sizes: list[int]) -> list[dict[str, Any]]:
    await _concurrent_pairings(url, 20)  # warm up both processes
    return [await _concurrent_pairings(url, n) for n in sizes]


async def _memory(url: str, pid: int, open_rooms: int) -> dict[str, Any]:
    await _concurrent_pairings(url, 5)  # load the code paths, so the delta is the rooms alone
    return await _rss_per_open_room(url, pid, open_rooms)


def _with_server(connections: int, job: Callable[[str, int], Coroutine[Any, Any, _T]]) -> _T:
    """Run ``job(url, pid)`` against a fresh server, which must then stop cleanly on SIGTERM."""
    process, url = _start_server(connections)
    try:
        return asyncio.run(job(url, process.pid))
    finally:
        process.terminate()
        exit_code = process.wait(30)
        if exit_code:
            raise RuntimeError(f"the server exited with {exit_code} on SIGTERM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--open-rooms", type=int, default=1000)
    args = parser.parse_args()
    # Two sockets per pairing on each side, plus the client's own: raise the descriptor limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8 * max([*args.sizes, args.open_rooms]) + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    connections = 4 * max([*args.sizes, args.open_rooms])
    pairings = _with_server(connections, lambda url, _pid: _pairings(url, args.sizes))
    memory = _with_server(connections, lambda url, pid: _memory(url, pid, args.open_rooms))
    report = {
        "benchmark": "signaling",
        "python": platform.python_version(),
        "cpus": psutil.cpu_count(),
        "transport": "loopback, duet.signaling.SignalingClient, one aiohttp session per peer",
        "pairings": pairings,
        "memory": memory,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
