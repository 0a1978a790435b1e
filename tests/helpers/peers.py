"""Owner and researcher as separate OS processes, each running a small script.

A script talks back on stdout with ``emit(key, value)`` (one JSON line each); the test reads
those lines with ``PeerProcess.expect(key)``. The owner's join code reaches the researcher
through its environment (``DUET_CODE``), as a person would paste it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

PRELUDE = '''
import json, os, sys, time
import numpy as np
import duet

SERVER = os.environ["DUET_TEST_SERVER"]
CODE = os.environ.get("DUET_CODE", "")
TMP = os.environ.get("DUET_TEST_TMP", ".")

def emit(key, value=None):
    print("@@" + json.dumps({"key": key, "value": value}), flush=True)

def wait_for(path, timeout=120):
    """Block until the test creates ``TMP/path`` (a step signal from the test)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(TMP, path)):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.02)
'''


class PeerProcess:
    def __init__(
        self, name: str, script: str, *, server: str, tmp: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.tmp = tmp
        path = tmp / f"{name}.py"
        path.write_text(PRELUDE + textwrap.dedent(script))
        full_env = {
            **os.environ,
            "DUET_TEST_SERVER": server,
            "DUET_TEST_TMP": str(tmp),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
        )
        self.lines: list[str] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("@@"):
                self._events.put(json.loads(line[2:]))

    def expect(self, key: str, timeout: float = 60) -> Any:
        """The value of the next ``emit(key, ...)``; fails with the process output if absent."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = self._events.get(timeout=max(0.05, min(remaining, 0.5)))
            except queue.Empty:
                if remaining <= 0 or (
                    self.proc.poll() is not None
                    and self._events.empty()
                    and not self._reader.is_alive()
                ):
                    raise AssertionError(
                        f"{self.name} never emitted {key!r} (exit {self.proc.poll()}):\n"
                        + self.output
                    ) from None
                continue
            if event["key"] == key:
                return event["value"]
            if event["key"] == "error":
                raise AssertionError(f"{self.name} failed: {event['value']}\n{self.output}")

    def signal_step(self, name: str) -> None:
        (self.tmp / name).touch()

    @property
    def output(self) -> str:
        return "".join(self.lines[-200:])

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit:\n{self.output}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def owner_and_researcher(
    owner_script: str, researcher_script: str, *, server: str, tmp: Path
) -> tuple[PeerProcess, PeerProcess]:
    """Start the owner, read its join code, start the researcher with it."""
    owner = PeerProcess("owner", owner_script, server=server, tmp=tmp)
    code = owner.expect("code")
    researcher = PeerProcess(
        "researcher", researcher_script, server=server, tmp=tmp, env={"DUET_CODE": code}
    )
    return owner, researcher
