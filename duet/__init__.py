"""duet: privacy-preserving data science between two notebooks over WebRTC."""

from .errors import (
    BudgetExceeded,
    ConnectionLost,
    DuetError,
    PairingError,
    PolicyViolation,
    ProtocolError,
    RemoteError,
    RequestDenied,
    RequestError,
    RequestTimeout,
)

__all__ = [
    "BudgetExceeded",
    "ConnectionLost",
    "DuetError",
    "PairingError",
    "PolicyViolation",
    "ProtocolError",
    "RemoteError",
    "RequestDenied",
    "RequestError",
    "RequestTimeout",
]
