"""Run a real signaling server for tests: as a subprocess through the console script, as users do.

``start_signaling_server(room_ttl=1)`` starts ``duet-signaling --room-ttl 1 --port <free>``,
waits for ``/healthz`` and yields the server's base URL; end-to-end tests reuse it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import aiohttp

__all__ = [
    "SignalingServerProcess",
    "free_port",
    "get_health",
    "receive_json",
    "send_json",
    "signaling_server_process",
    "start_signaling_server",
    "wait_for_health",
]

CONSOLE_SCRIPT = Path(sys.executable).with_name("duet-signaling")


MakeServer = Callable[..., Awaitable[str]]  # the make_server fixture


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_health(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/healthz", timeout=timeout) as response:
        assert response.status == 200
        body: dict[str, Any] = json.load(response)
        return body


def wait_for_health(
    url: str, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None
) -> dict[str, Any]:
    """Poll ``/healthz`` until it answers; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"signaling server exited with {process.returncode} before healthy")
        try:
            return get_health(url, timeout=1.0)
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _flag_args(flags: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


class SignalingServerProcess:
    """``duet-signaling`` in a subprocess; its stderr (JSON log lines) is kept for assertions."""

    def __init__(
        self,
        log: IO[bytes],
        *,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        **flags: Any,
    ) -> None:
        flags.setdefault("host", "127.0.0.1")
        if "port" not in flags and not (env and "DUET_SIGNALING_PORT" in env):
            flags["port"] = free_port()
        self.port = int(flags.get("port") or (env or {})["DUET_SIGNALING_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log
        self.process = subprocess.Popen(
            [*(command or [str(CONSOLE_SCRIPT)]), *_flag_args(flags)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_healthy(self, timeout: float = 15.0) -> dict[str, Any]:
        try:
            return wait_for_health(self.url, timeout, self.process)
        except (OSError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"signaling server did not come up; output:\n{self.logs()}") from exc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` (once) and wait; kill if it does not exit; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def logs(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        """Every log line parsed as JSON (fails the test if one is not JSON)."""
        return [json.loads(line) for line in self.logs().splitlines() if line.strip()]


@contextmanager
def signaling_server_process(**kwargs: Any) -> Iterator[SignalingServerProcess]:
    """A healthy server subprocess for the duration (``env``, ``command`` and flags as kwargs)."""
    with tempfile.TemporaryFile() as log:
        server = SignalingServerProcess(log, **kwargs)
        try:
            server.wait_healthy()
            yield server
        finally:
            server.stop()


@contextmanager
def start_signaling_server(**flags: Any) -> Iterator[str]:
    """A healthy ``duet-signaling`` subprocess for the duration; yields ``http://127.0.0.1:port``."""
    with signaling_server_process(**flags) as server:
        yield server.url


async def send_json(ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> None:
    await ws.send_str(json.dumps(message))


async def receive_json(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0
) -> dict[str, Any]:
    """The next text frame as JSON; fails clearly on a close instead."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type!r}"
    body: dict[str, Any] = json.loads(msg.data)
    return body
