"""Server settings: defaults, overridden by ``DUET_SIGNALING_*`` environment variables, then flags.

Every limit the server enforces lives here, so an operator can tune them without code and the
tests can shrink them (a 0.3 s idle timeout) to exercise them quickly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .messages import MAX_PAYLOAD_CHARS

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "ServerConfig"]

# A signal carries up to MAX_PAYLOAD_CHARS of (ASCII) payload; JSON escaping of the SDP's line
# breaks and quotes plus the envelope keys need room on top, so a full-size signal always fits.
DEFAULT_MAX_MESSAGE_BYTES = MAX_PAYLOAD_CHARS + 16 * 1024

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class ServerConfig(BaseSettings):
    """Configuration of one signaling server process."""

    model_config = SettingsConfigDict(env_prefix="DUET_SIGNALING_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535, description="0 picks a free port")
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        ge=1024,
        description="larger frames are answered with error too_large",
    )
    room_ttl: float = Field(default=600.0, gt=0, description="seconds a room may wait for pairing")
    tombstone_ttl: float = Field(
        default=3600.0,
        ge=0,
        description="seconds a deleted room is remembered, so a late join hears why it is gone",
    )
    max_rooms: int = Field(default=10_000, ge=1)
    max_connections_per_ip: int = Field(default=256, ge=1)
    idle_timeout: float = Field(
        default=60.0, gt=0, description="seconds without a client message before disconnecting"
    )
    shutdown_grace: float = Field(
        default=5.0, ge=0, description="seconds open connections get to close on shutdown"
    )
    log_level: LogLevel = "INFO"
    store: str = Field(
        default="memory",
        pattern=r"^(memory|rediss?://.*|unix://.*)$",
        description="memory (one process), or redis://[:password@]host:port/db (rediss:// for "
        "TLS) so several replicas share rooms",
    )
