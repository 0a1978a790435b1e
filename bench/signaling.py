"""Benchmark the signaling server on loopback and print the figures as JSON.

Starts ``duet-signaling`` as a subprocess (limits raised: every socket comes from 127.0.0.1),
then with duet's own client measures

* N concurrent pairings (owner creates, researcher joins, offer and answer relayed) for
  N = 100 and 1000: latency of one pairing (median, p99) and pairings per second;
* the server's resident memory per open room: RSS growth while 1000 owners wait in rooms;
* with ``--redis N``: N pairings across three replicas sharing a real ``redis-server`` (owner
  and researcher always on different replicas), against the same N on one in-memory process
  in the same run, and Redis's memory per open room (``INFO memory``).

Usage: ``python bench/signaling.py [--sizes 100 1000] [--open-rooms 1000] [--redis 10000]``.
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


def _start_server(connections: int, *store: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("duet-signaling")),
        *("--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"),
        *("--max-connections-per-ip", str(connections), "--max-rooms", str(connections)),
        *(("--store", store[0]) if store else ()),
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


async def _pairing(url: str, researcher_url: str | None = None) -> float:
    """One full pairing (the researcher on another replica if given); latency in seconds."""
    room = JoinCode.generate().room_id
    start = time.perf_counter()
    owner = await SignalingClient.create_room(url, room, timeout=60)
    researcher = await SignalingClient.join_room(researcher_url or url, room, timeout=60)
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


def _with_server(connections: int, job: Callable[[str, int], Coroutine[Any, Any, _T]],
                 *store: str) -> _T:
    """Run ``job(url, pid)`` against a fresh server, which must then stop cleanly on SIGTERM."""
    process, url = _start_server(connections, *store)
    try:
        return asyncio.run(job(url, process.pid))
    finally:
        process.terminate()
        exit_code = process.wait(30)
        if exit_code:
            raise RuntimeError(f"the server exited with {exit_code} on SIGTERM")


async def _spread(urls: list[str], total: int, concurrency: int) -> dict[str, Any]:
    """``total`` pairings, ``concurrency`` at a time, owner on replica i, researcher on i+1."""
    latencies: list[float] = []
    start = time.perf_counter()
    for first in range(0, total, concurrency):
        batch = range(first, min(total, first + concurrency))
        latencies += await asyncio.gather(*(
            _pairing(urls[i % len(urls)], urls[(i + 1) % len(urls)]) for i in batch))
    wall = time.perf_counter() - start
    latencies.sort()
    return {"n": total, "replicas": len(urls), "concurrency": concurrency,
            "wall_s": round(wall, 3), "pairings_per_s": round(total / wall, 1),
            "latency_ms_median": round(statistics.median(latencies) * 1000, 2),
            "latency_ms_p99": round(latencies[min(total - 1, int(total * 0.99))] * 1000, 2)}


def _redis_used_memory(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"INFO memory\r\n")
        data = b""
        while b"used_memory:" not in data or not data.endswith(b"\r\n"):
            data += sock.recv(65536)
    line = next(x for x in data.decode().splitlines() if x.startswith("used_memory:"))
    return int(line.split(":")[1])


def _redis_mode(total: int, open_rooms: int, concurrency: int) -> dict[str, Any]:
    """Three replicas on one real redis-server vs one in-memory process, same workload."""
    import shutil
    import tempfile

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--redis needs redis-server (make test installs it)")
    port = _free_port()
    directory = tempfile.mkdtemp(prefix="duet-bench-redis-")
    redis = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", directory],
                             stdout=subprocess.DEVNULL)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
        connections = 8 * max(concurrency, open_rooms)
        started = [_start_server(connections, url) for _ in range(3)]
        servers = [process for process, _ in started]
        urls = [u for _, u in started]

        async def run() -> dict[str, Any]:
            await _spread(urls, 30, 10)  # warm up
            shared = await _spread(urls, total, concurrency)
            before = _redis_used_memory(port)
            owners = await asyncio.gather(*(SignalingClient.create_room(
                urls[i % 3], JoinCode.generate().room_id, timeout=60)
                for i in range(open_rooms)))
            after = _redis_used_memory(port)
            await asyncio.gather(*(owner.close() for owner in owners))
            return {"pairings": shared, "open_rooms": open_rooms,
                    "redis_bytes_per_open_room": round((after - before) / open_rooms, 1)}

        redis_report = asyncio.run(run())
    finally:
        for process in servers:
            process.terminate()
            process.wait(30)
        redis.kill()
        shutil.rmtree(directory, ignore_errors=True)
    memory_report = _with_server(8 * concurrency, lambda u, _pid: _spread([u], total, concurrency))
    return {"redis_three_replicas": redis_report, "memory_one_process": memory_report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--open-rooms", type=int, default=1000)
    parser.add_argument("--redis", type=int, default=0, metavar="N",
                        help="also N pairings across 3 replicas on a real redis-server")
    parser.add_argument("--concurrency", type=int, default=200)
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
    if args.redis:
        report["redis"] = _redis_mode(args.redis, args.open_rooms, args.concurrency)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
