"""``duet-signaling``: run the signaling server until SIGTERM or SIGINT.

Settings come from the defaults, then ``DUET_SIGNALING_*`` environment variables (the container
way), then flags (the command-line way); each later source overrides the earlier ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from .app import log_event, start_server
from .config import ServerConfig

__all__ = ["JsonLogFormatter", "main", "parse_config", "run_server"]

# flag -> (ServerConfig field, type, help)
_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "TCP port (0: pick a free one)"),
    ("--max-message-bytes", "max_message_bytes", int, "largest accepted frame"),
    ("--room-ttl", "room_ttl", float, "seconds a room may wait to be paired"),
    ("--tombstone-ttl", "tombstone_ttl", float, "seconds a deleted room id is remembered"),
    ("--max-rooms", "max_rooms", int, "rooms open at once"),
    ("--max-connections-per-ip", "max_connections_per_ip", int, "sockets per client address"),
    ("--idle-timeout", "idle_timeout", float, "seconds without a client message"),
    ("--shutdown-grace", "shutdown_grace", float, "seconds to close sockets on shutdown"),
    ("--log-level", "log_level", str.upper, "DEBUG, INFO, WARNING or ERROR"),
    ("--store", "store", str, "memory, or redis://HOST:PORT/DB to share rooms between replicas"),
]


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, so log collectors need no parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duet-signaling",
        description="Pair duet owners and researchers over WebSockets (GET /ws, GET /healthz).",
        epilog="Every flag can also be set with an environment variable DUET_SIGNALING_<FIELD>, "
        "e.g. DUET_SIGNALING_PORT=9000; flags win over the environment.",
    )
    for flag, name, kind, text in _FLAGS:
        default = ServerConfig.model_fields[name].default
        env = f"DUET_SIGNALING_{name.upper()}"
        parser.add_argument(flag, dest=name, type=kind, help=f"{text} [{env}, default {default}]")
    return parser


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    """Flags over environment over defaults; invalid values exit with status 2 and a message."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    try:
        return ServerConfig(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        parser.error(problems)


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def _serve(config: ServerConfig) -> None:
    handle = await start_server(config)
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, received.put_nowait, signum)
    try:
        log_event("signal_received", signal=(await received.get()).name)
    finally:
        await handle.stop()


def run_server(config: ServerConfig | None = None) -> None:
    """Serve in the foreground until SIGTERM/SIGINT, then close every socket and return."""
    asyncio.run(_serve(config or ServerConfig()))


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    _configure_logging(config.log_level)
    try:
        run_server(config)
    except OSError as exc:  # typically: the port is taken
        log_event("startup_failed", logging.ERROR, error=str(exc))
        return 1
    return 0
