"""Session configuration: one small typed dataclass, defaults that suit the internet."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiortc import RTCConfiguration, RTCIceServer

__all__ = ["DEFAULT_ICE_SERVERS", "IceServerSpec", "SessionConfig"]

# A public STUN server lets peers behind ordinary NATs find each other. Peers behind
# symmetric NATs need a TURN relay:
# {"urls": "turn:host:3478", "username": ..., "credential": ...}.
DEFAULT_ICE_SERVERS: tuple[str, ...] = ("stun:stun.l.google.com:19302",)

IceServerSpec = str | Mapping[str, Any] | RTCIceServer


@dataclass(frozen=True)
class SessionConfig:
    """Knobs of a session. Every field has a default that works; tests override a few."""

    ice_servers: Sequence[IceServerSpec] | None = None
    # Offer 127.0.0.1 as the only ICE candidate (both peers on this machine). None: decide
    # from the signaling URL: a loopback server means a same-machine duet.
    ice_loopback: bool | None = None
    connect_timeout: float = 30.0
    # aiortc assumes 64 KiB when the remote does not state its maximum message size.
    frame_size: int = 64 * 1024
    max_message_bytes: int = 4 * 1024**3
    # Flow control: stop handing chunks to the channel above this many buffered bytes.
    buffer_high_water: int = 256 * 1024
    heartbeat_interval: float = 1.0
    # The peer is declared gone after this long without any frame from it (counted again
    # from the end of a stall of this side's own loop: its frames wait unread behind it).
    liveness_timeout: float = 10.0
    # tqdm bars for transfers of at least this many bytes; None: on for the researcher.
    progress: bool | None = None
    progress_threshold: int = 8 * 1024 * 1024
    # The owner's worker process: its address-space limit in bytes (None: three quarters of
    # the machine's memory), how long it may go without finishing a unit of work, and how
    # many unexpected stops (crash, timeout, out of memory) a session restarts from.
    worker_memory: int | None = None
    op_timeout: float | None = 600.0
    max_worker_restarts: int = 3
    # CPython's GIL switch interval (``sys.setswitchinterval``), lowered for the whole
    # process when a session starts, never raised. The session's loop shares the GIL with
    # the process's other threads (the owner's reader of its worker, the notebook's own
    # code); with CPython's default of 5 ms, a message ready to leave can wait out a busy
    # thread's slice (measured: pipelined ops 1.24x faster, pandas ops 2x, with 0.5 ms).
    # None leaves the interpreter alone.
    switch_interval: float | None = 0.0005

    def worker_memory_limit(self) -> int:
        if self.worker_memory is not None:
            return self.worker_memory
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4)

    def rtc_configuration(self) -> RTCConfiguration:
        specs = DEFAULT_ICE_SERVERS if self.ice_servers is None else self.ice_servers
        return RTCConfiguration(iceServers=[_ice_server(s) for s in specs])

    def loopback_for(self, server_url: str) -> bool:
        if self.ice_loopback is not None:
            return self.ice_loopback
        return is_loopback_host(urlsplit(server_url).hostname or "")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ice_server(spec: IceServerSpec) -> RTCIceServer:
    if isinstance(spec, RTCIceServer):
        return spec
    if isinstance(spec, str):
        return RTCIceServer(urls=spec)
    if isinstance(spec, Mapping) and "urls" in spec:
        return RTCIceServer(
            urls=spec["urls"], username=spec.get("username"), credential=spec.get("credential")
        )
    raise ValueError(
        f"bad ICE server {spec!r}: use a URL like 'stun:host:3478' or "
        "{'urls': 'turn:host:3478', 'username': ..., 'credential': ...}"
    )
