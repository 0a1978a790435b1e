"""``duet.launch`` and ``duet.join``: the two calls that start a duet."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import platformdirs

from .codes import JoinCode
from .config import IceServerSpec, SessionConfig
from .errors import PairingError, PairingTimeout
from .loop import LoopThread
from .owner import OwnerSession
from .policy import Allowlist
from .researcher import ResearcherSession
from .rtc import connect_as_owner, connect_as_researcher
from .signaling import SignalingClient, normalize_server_url

__all__ = ["embedded_server_url", "join", "launch", "local_invitation"]

log = logging.getLogger(__name__)
ENV_SERVER = "DUET_SIGNALING_URL"

_embedded_lock = threading.Lock()
_embedded: tuple[LoopThread, str] | None = None


def embedded_server_url() -> str:
    """Start (once per process) a signaling server on 127.0.0.1 and return its URL."""
    global _embedded
    with _embedded_lock:
        if _embedded is None:
            from signaling_server import ServerConfig, start_server

            loop = LoopThread(name="duet-embedded-signaling")
            handle = loop.run(start_server(ServerConfig(host="127.0.0.1", port=0)), timeout=30)
            _embedded = (loop, handle.url)
        return _embedded[1]


def _server_for_owner(server: str | None) -> str:
    return server or os.environ.get(ENV_SERVER) or embedded_server_url()


def _server_for_researcher(server: str | None) -> str:
    url = server or os.environ.get(ENV_SERVER)
    if not url:
        raise PairingError(
            "no signaling server given: pass server=... exactly as in the owner's join line, "
            f"or set {ENV_SERVER}"
        )
    return url


def _config(config: SessionConfig | None, ice_servers: Sequence[IceServerSpec] | None,
            overrides: dict[str, Any]) -> SessionConfig:
    config = config or SessionConfig()
    if ice_servers is not None:
        overrides["ice_servers"] = list(ice_servers)
    return replace(config, **overrides) if overrides else config


def _local_ice(config: SessionConfig, url: str) -> SessionConfig:
    """Both peers on this machine (a loopback signaling server, unless ``ice_loopback`` says
    otherwise): the default public STUN server could add nothing but a DNS lookup and packets
    to the internet, so none is used unless servers were given explicitly."""
    if config.ice_servers is None and config.loopback_for(url):
        return replace(config, ice_servers=[])
    return config


def launch(server: str | None = None, *, ice_servers: Sequence[IceServerSpec] | None = None,
           audit_path: str | os.PathLike[str] | None = None, allowlist: Allowlist | None = None,
           memory_budget: int | None = 2 * 1024**3, config: SessionConfig | None = None,
           show: bool = True, **options: Any) -> OwnerSession:
    """Open a duet as the data owner; returns at once, the researcher connects in the background.

    ``server``: the signaling server URL; None means ``$DUET_SIGNALING_URL``, else an embedded
    server on 127.0.0.1 (same-machine use). ``ice_servers``: STUN/TURN servers (None: a public
    STUN server; ``[]`` for none). ``show``: print the line the researcher must run.
    Any other keyword sets a ``SessionConfig`` field.
    """
    config = _config(config, ice_servers, options)
    url = normalize_server_url(_server_for_owner(server))
    config = _local_ice(config, url)
    code = JoinCode.generate()
    session = OwnerSession(config, allowlist=allowlist, audit_path=audit_path,
                           memory_budget=memory_budget)
    session.code = str(code)
    session.server_url = url
    loopback = config.loopback_for(url)
    try:
        session._signaling = session._loop.run(
            SignalingClient.create_room(url, code.room_id, timeout=config.connect_timeout),
            timeout=config.connect_timeout + 5)
    except BaseException:
        session.close()
        raise

    async def connect() -> Any:
        await session._signaling.wait_peer_joined()
        session.audit.record("paired", session=session.session_id)
        if loopback:
            _withdraw_invitation(session.code)
        transport = await connect_as_owner(session._signaling, code, config, loopback)
        await session._signaling.close()
        return transport

    session.start(connect)
    if loopback:
        _write_invitation(session.code, url)
    if show:
        print(f"duet: share this line with the researcher:\n  {session.join_line}")
    return session


def _invitation_path() -> Path:
    return Path(platformdirs.user_data_dir("duet")) / "last-invitation.json"


def _write_invitation(code: str, server: str) -> None:
    """Same-machine duets only: leave the join code where this user's researcher notebook
    finds it (``local_invitation``), readable by this user alone."""
    path = _invitation_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"code": code, "server": server, "created": time.time()}, out)
        os.replace(path.with_suffix(".tmp"), path)
    except OSError as exc:
        log.info("could not leave the invitation for a local researcher: %s", exc)


def _withdraw_invitation(code: str) -> None:
    """A room pairs one researcher: once one has joined, the invitation is spent, and a
    researcher notebook opened later must not be handed it ("this join code was already
    used"). A newer duet's invitation is left alone."""
    path = _invitation_path()
    try:
        invite = json.loads(path.read_text())
        if isinstance(invite, dict) and invite.get("code") == code:
            path.unlink()
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        log.info("could not withdraw the spent invitation for a local researcher: %s", exc)


def local_invitation(max_age: float = 3600.0) -> tuple[str, str] | None:
    """``(code, server)`` of the newest duet this user launched on this machine (through a
    loopback signaling server) within ``max_age`` seconds that no researcher has joined yet,
    or None: two notebooks side by side in one JupyterLab need no copy and paste.
    ``duet.join(*duet.local_invitation())``."""
    try:
        invite = json.loads(_invitation_path().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(invite, dict) or time.time() - float(invite.get("created", 0)) > max_age:
        return None
    return str(invite["code"]), str(invite["server"])


def join(code: str, server: str | None = None, *,
         ice_servers: Sequence[IceServerSpec] | None = None,
         config: SessionConfig | None = None, timeout: float | None = None,
         **options: Any) -> ResearcherSession:
    """Join the owner's duet with the code from their join line; returns once connected."""
    config = _config(config, ice_servers, options)
    join_code = JoinCode.parse(code)
    url = normalize_server_url(_server_for_researcher(server))
    config = _local_ice(config, url)
    session = ResearcherSession(config)
    loopback = config.loopback_for(url)

    async def connect() -> Any:
        signaling = await SignalingClient.join_room(url, join_code.room_id,
                                                    timeout=config.connect_timeout)
        session._signaling = signaling
        try:
            return await connect_as_researcher(signaling, join_code, config, loopback)
        finally:
            await signaling.close()

    session.start(connect)
    try:
        if not session._wait_ready(timeout or config.connect_timeout + 10):
            raise PairingTimeout("timed out while connecting to the owner")
    except BaseException:
        session.close()
        raise
    return session
