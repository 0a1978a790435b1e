"""duet: privacy-preserving data science between two notebooks over WebRTC.

Owner: ``s = duet.launch()`` then ``s.share(array, name="ages")``; decide ``s.requests``.
Researcher: ``r = duet.join(code, server=URL)``; ``x = r.store["ages"]``;
``r.np.mean(x).get(reason="...")`` returns once the owner approves.
"""

from .api import embedded_server_url, join, launch, local_invitation
from .approvals import Request, RequestQueue, Rule
from .audit import AuditEvent, AuditLog
from .config import SessionConfig
from .dp import DP
from .dp_train import TrainSettings
from .errors import (
    BudgetExceeded,
    ConnectionLost,
    DuetError,
    DuetTimeout,
    PairingError,
    PairingTimeout,
    PolicyViolation,
    PrivacyBudgetExceeded,
    ProtocolError,
    RemoteError,
    RequestDenied,
    RequestError,
    RequestTimeout,
    WorkerRestarted,
)
from .owner import OwnerSession
from .pointers import Pointer, RemoteModule, RequestHandle
from .policy import Allowlist
from .researcher import ResearcherSession
from .store import Store

__version__ = "0.1.0"


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext duet`` does what ``%load_ext kernel_ext`` does (imported only then)."""
    from kernel_ext import load_ipython_extension as load

    load(ipython)

__all__ = [
    "Allowlist",
    "AuditEvent",
    "AuditLog",
    "BudgetExceeded",
    "ConnectionLost",
    "DP",
    "DuetError",
    "DuetTimeout",
    "OwnerSession",
    "PairingError",
    "PairingTimeout",
    "Pointer",
    "PolicyViolation",
    "PrivacyBudgetExceeded",
    "ProtocolError",
    "RemoteError",
    "RemoteModule",
    "Request",
    "RequestDenied",
    "RequestError",
    "RequestHandle",
    "RequestQueue",
    "RequestTimeout",
    "ResearcherSession",
    "Rule",
    "SessionConfig",
    "Store",
    "TrainSettings",
    "WorkerRestarted",
    "embedded_server_url",
    "join",
    "launch",
    "local_invitation",
]
