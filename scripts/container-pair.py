#!/usr/bin/env python3
"""Pair peers through a running signaling server (the container, in scripts/container-test.sh).

    container-pair.py URL               both checks below, raw first
    container-pair.py URL --check raw   two raw WebSocket clients speak the signaling protocol
                                        (create/join, offer/answer relay, room gone afterwards)
    container-pair.py URL --check duet  a real owner and a real researcher, each in its own
                                        process, pair with duet.launch()/duet.join(); the owner
                                        shares numpy.arange(10) as "x", the researcher sees it

URL is the server's base URL, e.g. http://127.0.0.1:8765. Each check prints one JSON line with
its result; the exit status is 0 only if every check passed (reasons go to stderr).

``--role owner`` and ``--role researcher --code CODE`` are the two child processes of the duet
check; they are not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from typing import Any

PAIR_TIMEOUT = 30.0  # seconds: wait_for_peer, and the researcher's wait for the shared "x"
CHILD_TIMEOUT = 90.0  # seconds a child process may take as a whole


class CheckFailed(Exception):
    pass


def _emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


# -- raw protocol ---------------------------------------------------------------------------
async def _raw_pairing(url: str) -> dict[str, Any]:
    import aiohttp

    from signaling_server.messages import (
        PROTOCOL_VERSION,
        Create,
        Join,
        Signal,
        server_message_adapter,
    )

    ws_url = url.rstrip("/") + "/ws"
    room = secrets.token_hex(16)
    offer = f"raw-offer-{secrets.token_hex(8)}"
    answer = f"raw-answer-{secrets.token_hex(8)}"

    async def receive(ws: aiohttp.ClientWebSocketResponse, who: str, expected: str) -> Any:
        msg = await asyncio.wait_for(ws.receive(), timeout=10)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise CheckFailed(f"{who}: expected {expected!r}, got frame {msg.type!r} {msg.data!r}")
        message = server_message_adapter.validate_json(msg.data)
        if message.type != expected:
            raise CheckFailed(f"{who}: expected {expected!r}, got {msg.data}")
        return message

    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(url.rstrip("/") + "/healthz") as response:
            health = await response.json()
            if response.status != 200 or health.get("status") != "ok":
                raise CheckFailed(f"/healthz answered {response.status}: {health}")
        async with http.ws_connect(ws_url) as owner, http.ws_connect(ws_url) as researcher:
            await owner.send_str(Create(room=room).model_dump_json())
            created = await receive(owner, "owner", "created")
            if created.room != room:
                raise CheckFailed(f"created the wrong room: {created.room} != {room}")
            await researcher.send_str(Join(room=room).model_dump_json())
            await receive(researcher, "researcher", "joined")
            await receive(owner, "owner", "peer_joined")
            await owner.send_str(Signal(kind="offer", payload=offer).model_dump_json())
            relayed = await receive(researcher, "researcher", "signal")
            if (relayed.kind, relayed.payload) != ("offer", offer):
                raise CheckFailed(f"offer relayed wrongly: {relayed!r}")
            await researcher.send_str(Signal(kind="answer", payload=answer).model_dump_json())
            relayed = await receive(owner, "owner", "signal")
            if (relayed.kind, relayed.payload) != ("answer", answer):
                raise CheckFailed(f"answer relayed wrongly: {relayed!r}")
            paired = time.perf_counter() - started
        # The room is deleted once paired: a late join is refused with an error.
        async with http.ws_connect(ws_url) as late:
            await late.send_str(Join(room=room).model_dump_json())
            refusal = await receive(late, "late joiner", "error")
    return {
        "check": "raw",
        "ok": True,
        "protocol": PROTOCOL_VERSION,
        "server_version": health.get("version"),
        "pairing_seconds": round(paired, 3),
        "late_join_error": refusal.code,
    }


def raw_main(url: str) -> int:
    try:
        result = asyncio.run(_raw_pairing(url))
    except Exception as exc:  # noqa: BLE001 - report any failure as the check's result
        print(f"raw pairing FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        _emit({"check": "raw", "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    _emit(result)
    return 0


# -- duet-level pairing: two processes ------------------------------------------------------
def _import_duet_api() -> Any:
    import duet

    missing = [name for name in ("launch", "join") if not callable(getattr(duet, name, None))]
    if missing:
        raise CheckFailed(
            f"duet.{' and duet.'.join(missing)} not available (duet imported from "
            f"{getattr(duet, '__file__', '?')}): the session API of DESIGN.md is not there yet"
        )
    return duet


def owner_main(url: str) -> int:
    """Child 1: launch, print the code, wait for the researcher, share x, wait for 'done'."""
    import numpy

    duet = _import_duet_api()
    s = duet.launch(server=url, ice_servers=[])
    try:
        _emit({"event": "code", "code": str(s.code)})
        paired = s.wait_for_peer(timeout=PAIR_TIMEOUT)
        if paired is False or not s.connected:
            raise CheckFailed(f"owner: no connected researcher after {PAIR_TIMEOUT:.0f} s")
        s.share(numpy.arange(10), name="x")
        _emit({"event": "shared", "connected": bool(s.connected)})
        # Stay up until the parent says the researcher is done (or closes our stdin).
        sys.stdin.readline()
        _emit({"event": "done", "connected": bool(s.connected)})
    finally:
        s.close()
    return 0


def researcher_main(url: str, code: str) -> int:
    """Child 2: join with the owner's code, check the connection and the shared 'x'."""
    duet = _import_duet_api()
    started = time.perf_counter()
    r = duet.join(code, server=url, ice_servers=[])
    try:
        joined = time.perf_counter() - started
        if not r.connected:
            raise CheckFailed("researcher: duet.join returned but r.connected is False")
        deadline = time.monotonic() + PAIR_TIMEOUT
        while "x" not in r.store:
            if time.monotonic() > deadline:
                raise CheckFailed(f'researcher: "x" not in r.store after {PAIR_TIMEOUT:.0f} s')
            time.sleep(0.05)
        _emit(
            {
                "event": "verified",
                "connected": bool(r.connected),
                "store": sorted(r.store),
                "join_seconds": round(joined, 3),
            }
        )
    finally:
        r.close()
    return 0


def _child(url: str, role: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), url, "--role", role, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """Read a child's stdout lines on a thread, so the parent can wait with a timeout."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next_event(lines: queue.Queue[str | None], who: str, deadline: float) -> dict[str, Any]:
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise CheckFailed(f"{who}: no answer in time") from None
        if line is None:
            raise CheckFailed(f"{who}: exited before reporting")
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            print(f"[{who}] {line.rstrip()}", file=sys.stderr)  # stray output: pass it on
            continue
        if isinstance(event, dict) and "event" in event:
            return event


def _stop(proc: subprocess.Popen[str], who: str, deadline: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise CheckFailed(f"{who}: did not exit in time; killed") from None
    return proc.returncode, err


def duet_main(url: str) -> int:
    started = time.perf_counter()
    deadline = time.monotonic() + CHILD_TIMEOUT
    owner = researcher = None
    try:
        # Fail fast and loudly if the session API does not exist yet.
        _import_duet_api()
        owner = _child(url, "owner")
        owner_lines = _lines(owner)
        code = _next_event(owner_lines, "owner", deadline)["code"]
        researcher = _child(url, "researcher", "--code", code)
        researcher_lines = _lines(researcher)
        verified = _next_event(researcher_lines, "researcher", deadline)
        rc, err = _stop(researcher, "researcher", deadline)
        if rc != 0:
            raise CheckFailed(f"researcher exited {rc}:\n{err}")
        shared = _next_event(owner_lines, "owner", deadline)
        assert owner.stdin is not None
        owner.stdin.write("done\n")
        owner.stdin.flush()
        done = _next_event(owner_lines, "owner", deadline)
        rc, err = _stop(owner, "owner", deadline)
        if rc != 0:
            raise CheckFailed(f"owner exited {rc}:\n{err}")
    except Exception as exc:  # noqa: BLE001 - report any failure as the check's result
        for proc, who in ((owner, "owner"), (researcher, "researcher")):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                _, err = proc.communicate()
                if err and err.strip():
                    print(f"--- {who} stderr ---\n{err.rstrip()}", file=sys.stderr)
        print(f"duet pairing FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        _emit({"check": "duet", "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    _emit(
        {
            "check": "duet",
            "ok": True,
            "owner_connected_after_share": shared.get("connected"),
            "owner_connected_at_end": done.get("connected"),
            "researcher_store": verified.get("store"),
            "join_seconds": verified.get("join_seconds"),
            "total_seconds": round(time.perf_counter() - started, 3),
        }
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Pair peers through a running duet signaling server."
    )
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8765")
    parser.add_argument("--check", choices=("all", "raw", "duet"), default="all")
    parser.add_argument("--role", choices=("owner", "researcher"), help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is not None:
        try:
            if args.role == "owner":
                return owner_main(args.url)
            return researcher_main(args.url, args.code)
        except Exception as exc:
            print(f"{args.role} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            raise
    status = 0
    if args.check in ("all", "raw"):
        status |= raw_main(args.url)
    if args.check in ("all", "duet"):
        status |= duet_main(args.url)
    return status


if __name__ == "__main__":
    sys.exit(main())
