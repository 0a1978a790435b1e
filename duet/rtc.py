"""The real transport: an aiortc data channel, paired through the signaling server.

Pairing authenticates each SDP with a MAC under the join code's secret, which the signaling
server never sees. The SDP carries the DTLS certificate fingerprint, so once both MACs check
out, the encrypted channel is end to end between the two holders of the code: a server that
rewrites an SDP to insert itself is detected and pairing fails with ``PairingError``.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

import aioice.ice
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from .codes import JoinCode
from .config import SessionConfig
from .errors import PairingError, ProtocolError
from .signaling import SignalingClient
from .transport import FramedTransport, Progress

__all__ = ["WebRTCTransport", "connect_as_owner", "connect_as_researcher", "seal", "unseal"]

log = logging.getLogger(__name__)

CHANNEL_LABEL = "duet"

# -- loopback ICE -------------------------------------------------------------------------
# aioice never offers 127.0.0.1 as a host candidate, so two peers on a machine without a
# usable interface would never connect. In loopback mode (scoped to the gathering task by a
# context variable, so other connections in the process are unaffected) 127.0.0.1 is the
# only host candidate: same-machine duets and tests never touch another address.
_loopback_only: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "duet_loopback", default=False)
_original_host_addresses: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if _loopback_only.get():
        return ["127.0.0.1"]
    return _original_host_addresses(use_ipv4, use_ipv6)


aioice.ice.get_host_addresses = _host_addresses


# -- SDP authentication -------------------------------------------------------------------
def _mac(code: JoinCode, kind: str, sdp: str) -> str:
    message = f"{kind}\n{code.room_id}\n{sdp}".encode()
    return hmac.new(code.mac_key, message, hashlib.sha256).hexdigest()


def seal(code: JoinCode, kind: str, sdp: str) -> str:
    """Wrap an SDP with its MAC for the (untrusted) signaling server to relay."""
    return json.dumps({"sdp": sdp, "mac": _mac(code, kind, sdp)})


def unseal(code: JoinCode, kind: str, envelope: str) -> str:
    """Return the SDP if its MAC verifies under our code, else raise ``PairingError``."""
    try:
        data = json.loads(envelope)
        sdp, mac = data["sdp"], data["mac"]
        if not isinstance(sdp, str) or not isinstance(mac, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise PairingError(f"the peer's {kind} arrived malformed: pairing aborted") from None
    if not hmac.compare_digest(mac, _mac(code, kind, sdp)):
        raise PairingError(
            f"the peer's {kind} failed authentication: it was altered on the way (a tampering "
            "signaling server?) or the other side used a different join code. Pairing aborted."
        )
    return sdp


# -- the transport ------------------------------------------------------------------------
class WebRTCTransport(FramedTransport):
    def __init__(self, pc: RTCPeerConnection, channel: RTCDataChannel, config: SessionConfig,
                 progress: Progress | None = None,
                 on_error: Callable[[ProtocolError], None] | None = None) -> None:
        super().__init__(config.frame_size, config.max_message_bytes, progress,
                         config.progress_threshold, on_error)
        self.pc = pc
        self.channel = channel
        self.high_water = config.buffer_high_water
        channel.bufferedAmountLowThreshold = config.buffer_high_water // 2
        self._room = asyncio.Event()
        self._room.set()
        channel.on("bufferedamountlow", self._room.set)
        channel.on("message", self._on_channel_message)
        channel.on("close", lambda: self._lost("the data channel closed"))
        pc.on("connectionstatechange", self._on_state)

    def _on_channel_message(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self._receive_frame(data)

    def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self._lost(f"the peer connection {self.pc.connectionState}")

    def _lost(self, reason: str) -> None:
        self._room.set()
        self._closed(reason)

    def _send_frame(self, frame: bytes) -> None:
        if self.channel.readyState != "open":
            self._lost("the data channel closed")
            return
        self.channel.send(frame)
        if self.channel.bufferedAmount > self.high_water:
            self._room.clear()

    async def _writable(self) -> None:
        while self.channel.bufferedAmount > self.high_water and not self.closed:
            self._room.clear()
            await self._room.wait()

    async def close(self) -> None:
        self._lost("closed locally")
        self._room.set()
        await self.pc.close()


async def _open_channel(channel: RTCDataChannel, pc: RTCPeerConnection, timeout: float) -> None:
    opened = asyncio.Event()
    if channel.readyState == "open":
        return
    channel.on("open", opened.set)
    try:
        await asyncio.wait_for(opened.wait(), timeout)
    except asyncio.TimeoutError:
        raise PairingError(
            f"the peer-to-peer connection did not open within {timeout:.0f} s "
            f"(ICE state {pc.iceConnectionState}). The peers could not reach each other: "
            "if they are on different networks behind strict NATs, configure a TURN server "
            "with ice_servers=[...]; on one machine, use a signaling server on 127.0.0.1."
        ) from None


async def _describe_and_seal(pc: RTCPeerConnection, kind: str, code: JoinCode,
                             loopback: bool) -> str:
    """Create our offer or answer (gathering ICE candidates, loopback-only if asked), set it
    as the local description and return it sealed with the join code's MAC."""
    token = _loopback_only.set(loopback)
    try:
        description = await (pc.createOffer() if kind == "offer" else pc.createAnswer())
        await pc.setLocalDescription(description)
    finally:
        _loopback_only.reset(token)
    return seal(code, kind, pc.localDescription.sdp)


async def connect_as_owner(signaling: SignalingClient, code: JoinCode, config: SessionConfig,
                           loopback: bool, **transport_kwargs: Any) -> WebRTCTransport:
    """Offer a data channel once the researcher joined; return it open and authenticated."""
    pc = RTCPeerConnection(config.rtc_configuration())
    try:
        channel = pc.createDataChannel(CHANNEL_LABEL, ordered=True)
        await signaling.send_signal("offer", await _describe_and_seal(pc, "offer", code, loopback))
        envelope = await signaling.receive_signal("answer", timeout=config.connect_timeout)
        answer = unseal(code, "answer", envelope)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        transport = WebRTCTransport(pc, channel, config, **transport_kwargs)
        await _open_channel(channel, pc, config.connect_timeout)
        return transport
    except BaseException:
        await pc.close()
        raise


async def connect_as_researcher(signaling: SignalingClient, code: JoinCode,
                                config: SessionConfig, loopback: bool,
                                **transport_kwargs: Any) -> WebRTCTransport:
    """Answer the owner's authenticated offer; return the open data channel."""
    pc = RTCPeerConnection(config.rtc_configuration())
    try:
        ready: asyncio.Future[WebRTCTransport] = asyncio.get_running_loop().create_future()

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            # Wrap at once: a frame arriving before we resume must not find no listener.
            if channel.label == CHANNEL_LABEL and not ready.done():
                ready.set_result(WebRTCTransport(pc, channel, config, **transport_kwargs))

        envelope = await signaling.receive_signal("offer", timeout=config.connect_timeout)
        offer = unseal(code, "offer", envelope)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await signaling.send_signal("answer",
                                    await _describe_and_seal(pc, "answer", code, loopback))
        try:
            transport = await asyncio.wait_for(ready, config.connect_timeout)
        except asyncio.TimeoutError:
            raise PairingError(
                f"no data channel from the owner within {config.connect_timeout:.0f} s "
                f"(ICE state {pc.iceConnectionState}); see TURN in the README"
            ) from None
        await _open_channel(transport.channel, pc, config.connect_timeout)
        return transport
    except BaseException:
        await pc.close()
        raise
