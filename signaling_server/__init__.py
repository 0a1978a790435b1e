"""The duet signaling server: pairs an owner's kernel with a researcher's over WebSockets.

It relays only pairing messages (opaque, end-to-end authenticated SDP) and never imports
``duet``, so its container image needs nothing but aiohttp and pydantic.
"""

from .app import ServerHandle, create_app, start_server
from .cli import main, run_server
from .config import ServerConfig
from .messages import PROTOCOL_VERSION
from .store import InMemoryRoomStore, RoomStore

__all__ = [
    "PROTOCOL_VERSION",
    "InMemoryRoomStore",
    "RoomStore",
    "ServerConfig",
    "ServerHandle",
    "create_app",
    "main",
    "run_server",
    "start_server",
]
