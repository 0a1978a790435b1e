"""The exceptions duet raises, all in one place.

    DuetError                    base of everything below
    ├── PairingError             pairing failed: signaling server, join code, SDP authentication
    │   └── PairingTimeout       ... because the peer did not come in time (also a DuetTimeout)
    ├── ConnectionLost           the peer left or the channel died; pending calls fail with it
    ├── ProtocolError            the peer sent a frame we cannot accept (malformed, oversized)
    ├── PolicyViolation          the operation is not on the owner's allowlist; it never ran
    ├── RemoteError              the operation failed on the owner's side (op and type, no values)
    ├── RequestDenied            the owner denied a request (carries the owner's reason)
    ├── RequestError             a request cannot be made or decided (freed object, twice ...)
    ├── WorkerRestarted          the owner's worker restarted: objects made before it are gone
    ├── BudgetExceeded           the owner's memory budget for this session would be exceeded
    ├── PrivacyBudgetExceeded    a DP request would exceed the shared name's privacy budget
    └── DuetTimeout              a blocking call ran out of time (also a builtin TimeoutError)
        ├── RequestTimeout       no decision arrived in time; the request stays pending
        └── PairingTimeout       (see above)

Every blocking call that gives up after ``timeout`` raises a ``DuetTimeout``, so
``except TimeoutError`` catches them all; ``wait_for_peer`` and ``requests.wait`` return
False / None instead, as documented.

Messages never include data values held by the owner: an error that crosses the channel names
the operation and the exception type, nothing else.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "ConnectionLost",
    "DuetError",
    "DuetTimeout",
    "PairingError",
    "PairingTimeout",
    "PolicyViolation",
    "PrivacyBudgetExceeded",
    "ProtocolError",
    "RemoteError",
    "RequestDenied",
    "RequestError",
    "RequestTimeout",
    "WorkerRestarted",
]


class DuetError(Exception):
    """Base class of every error duet raises."""


class PairingError(DuetError):
    """Pairing through the signaling server failed, or the peer could not be authenticated."""


class ConnectionLost(DuetError):
    """The peer left, its process died, or the data channel closed."""


class ProtocolError(DuetError):
    """A frame or message from the peer violates the wire protocol."""


class PolicyViolation(DuetError):
    """The operation is not on the owner's allowlist, so it was never executed."""


class RemoteError(DuetError):
    """An operation failed on the owner's side.

    The message names the operation and the exception type only; the owner's exception text
    may contain data values and never crosses the channel.
    """

    def __init__(self, operation: str, error_type: str, detail: str = "") -> None:
        self.operation = operation
        self.error_type = error_type
        message = f"{operation} failed on the owner's side with {error_type}"
        super().__init__(f"{message}: {detail}" if detail else message)


class RequestDenied(DuetError):
    """The owner denied the request."""

    def __init__(self, request_id: str, reason: str = "") -> None:
        self.request_id = request_id
        self.reason = reason
        text = f"request {request_id} was denied by the owner"
        super().__init__(f"{text}: {reason}" if reason else text)


class DuetTimeout(DuetError, TimeoutError):
    """A blocking call ran out of time."""


class RequestTimeout(DuetTimeout):
    """No decision on the request arrived within the timeout; the request stays pending."""


class PairingTimeout(PairingError, DuetTimeout):
    """The peer did not arrive, or the connection did not come up, in time."""


class WorkerRestarted(DuetError):
    """The owner's worker process was restarted (cancelled by the owner, or it stopped
    unexpectedly): objects created before the restart are gone; compute them again."""


class RequestError(DuetError):
    """The request cannot be made or decided in its current state."""


class BudgetExceeded(DuetError):
    """The owner's memory budget for the session would be exceeded."""


class PrivacyBudgetExceeded(DuetError):
    """A differentially private request would spend more than is left of the privacy budget
    of the shared name ``budget``; it was refused before anything was computed."""

    def __init__(self, budget: str, epsilon: float = 0.0, delta: float = 0.0,
                 epsilon_left: float = 0.0, delta_left: float = 0.0, *,
                 unbounded: bool = False, message: str = "") -> None:
        self.budget = budget
        self.epsilon = epsilon
        self.delta = delta
        self.epsilon_left = epsilon_left
        self.delta_left = delta_left
        if not message:
            if unbounded:
                why = "an exact value of this data was released, so no budget is left"
            else:
                why = (f"the request needs epsilon={epsilon:.4g}"
                       + (f", delta={delta:.3g}" if delta else "")
                       + f" and {epsilon_left:.4g}"
                       + (f" (delta {delta_left:.3g})" if delta else "") + " is left")
            message = (f"privacy budget of {budget!r} exceeded: {why}; refused before "
                       "anything was computed")
        super().__init__(message)
