"""The ``duet-signaling`` command: flags, environment, logs, SIGTERM, ``python -m``."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from signaling_server.cli import parse_config
from tests.helpers.signaling import (
    CONSOLE_SCRIPT,
    free_port,
    get_health,
    receive_json,
    send_json,
    signaling_server_process,
)


async def test_sigterm_closes_sockets_and_exits_zero() -> None:
    with signaling_server_process(shutdown_grace=5) as server:
        async with aiohttp.ClientSession() as session:
            owner = await session.ws_connect(f"{server.url}/ws")
            await send_json(owner, {"type": "create", "version": 1, "room": "ab" * 16})
            assert (await receive_json(owner))["type"] == "created"

            server.process.send_signal(signal.SIGTERM)
            reply = await receive_json(owner)
            assert (reply["type"], reply["code"]) == ("error", "shutting_down")
            closing = await owner.receive(timeout=10)
            assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        assert await asyncio.to_thread(server.process.wait, 15) == 0

        events = server.log_events()  # every line is JSON
        names = [event["event"] for event in events]
        for expected in ("server_started", "room_created", "signal_received", "server_stopped"):
            assert expected in names, names
        assert names.index("signal_received") < names.index("server_stopped")
        assert {"signal": "SIGTERM"}.items() <= events[names.index("signal_received")].items()
        created = events[names.index("room_created")]
        assert created["room"] == "ab" * 4  # only a prefix of the room id is logged


def test_python_dash_m_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "signaling_server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for text in ("--host", "--port", "--room-ttl", "--idle-timeout", "DUET_SIGNALING_PORT"):
        assert text in result.stdout


def test_python_dash_m_serves_like_the_console_script() -> None:
    with signaling_server_process(command=[sys.executable, "-m", "signaling_server"]) as server:
        assert get_health(server.url)["status"] == "ok"
        assert server.stop() == 0


def test_environment_configures_and_flags_override() -> None:
    port = free_port()
    env = {
        "DUET_SIGNALING_PORT": str(port),
        "DUET_SIGNALING_MAX_ROOMS": "7",
        "DUET_SIGNALING_ROOM_TTL": "30",
        "DUET_SIGNALING_IDLE_TIMEOUT": "9",
    }
    with signaling_server_process(env=env, room_ttl=12) as server:
        assert server.url.endswith(f":{port}")
        limits = get_health(server.url)["limits"]
        assert (limits["max_rooms"], limits["room_ttl"], limits["idle_timeout"]) == (7, 12, 9)


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--port", "70000"], "port"),
        (["--max-rooms", "0"], "max_rooms"),
        (["--log-level", "chatty"], "log_level"),
        (["--idle-timeout", "soon"], "--idle-timeout"),
    ],
)
def test_invalid_settings_exit_2_with_a_message(args: list[str], complaint: str) -> None:
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert complaint in result.stderr


def test_port_in_use_exits_1_with_a_log_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(CONSOLE_SCRIPT), "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert '"event": "startup_failed"' in result.stderr


def test_parse_config_prefers_flags_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUET_SIGNALING_IDLE_TIMEOUT", "9")
    monkeypatch.setenv("DUET_SIGNALING_MAX_ROOMS", "3")
    config = parse_config(["--idle-timeout", "5", "--log-level", "debug"])
    assert (config.idle_timeout, config.max_rooms, config.log_level) == (5, 3, "DEBUG")


def test_server_imports_nothing_from_duet() -> None:
    """The container image ships signaling_server alone: it must not need duet, numpy or torch."""
    probe = (
        "import sys, signaling_server.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('duet', 'numpy', 'torch')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_store_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config([]).store == "memory"
    monkeypatch.setenv("DUET_SIGNALING_STORE", "redis://:secret@10.1.2.3:6379/0")
    assert parse_config([]).store == "redis://:secret@10.1.2.3:6379/0"
    assert parse_config(["--store", "rediss://cache:6380/1"]).store == "rediss://cache:6380/1"
    with pytest.raises(SystemExit) as exited:
        parse_config(["--store", "postgres://db"])
    assert exited.value.code == 2
