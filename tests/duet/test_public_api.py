"""The public names DESIGN.md promises: outside users and tests depend on them."""

from pathlib import Path

import pytest

import duet

PROMISED = {
    "launch", "join", "DuetError", "RequestDenied", "RequestTimeout", "PolicyViolation",
    "RemoteError", "ConnectionLost", "PairingError", "OwnerSession", "ResearcherSession",
    "RequestQueue", "Request", "Pointer", "DP", "PrivacyBudgetExceeded",
}


EXPORTED = PROMISED | {
    "embedded_server_url", "Allowlist", "AuditEvent", "AuditLog", "BudgetExceeded",
    "DuetTimeout", "PairingTimeout", "ProtocolError", "RemoteModule", "RequestError",
    "RequestHandle", "Rule", "SessionConfig", "Store", "WorkerRestarted", "local_invitation",
    "TrainSettings",  # the owner's DP-SGD settings: duet.DP(..., training=TrainSettings(...))
}


def test_all_lists_exactly_the_exported_names() -> None:
    assert set(duet.__all__) == EXPORTED  # a new public name is a decision: add it here
    assert len(duet.__all__) == len(set(duet.__all__))
    for name in duet.__all__:
        assert hasattr(duet, name), name
    public = {n for n in vars(duet) if not n.startswith("_")}
    public -= {n for n in vars(duet) if isinstance(getattr(duet, n), type(duet))}
    assert public - {"load_ipython_extension"} == EXPORTED


def test_timeouts_are_one_family() -> None:
    for name in ["RequestTimeout", "PairingTimeout", "DuetTimeout"]:
        error = getattr(duet, name)
        assert issubclass(error, duet.DuetTimeout) and issubclass(error, TimeoutError)
    assert issubclass(duet.PairingTimeout, duet.PairingError)


def test_every_error_is_a_duet_error() -> None:
    for name in ["RequestDenied", "RequestTimeout", "PolicyViolation", "RemoteError",
                 "ConnectionLost", "PairingError", "ProtocolError", "RequestError",
                 "BudgetExceeded", "WorkerRestarted", "DuetTimeout", "PairingTimeout",
                 "PrivacyBudgetExceeded"]:
        assert issubclass(getattr(duet, name), duet.DuetError)


def test_signaling_server_does_not_import_duet() -> None:
    import subprocess
    import sys

    code = ("import sys, signaling_server, signaling_server.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('duet', 'numpy', 'torch')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_same_machine_launch_leaves_its_invitation_for_this_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import stat
    import time

    from duet.api import _invitation_path

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # no other duet's invitation
    owner = duet.launch(ice_servers=[], show=False, audit_path=f"{tmp_path}/audit.db")
    try:
        assert duet.local_invitation() == (owner.code, owner.server_url)
        mode = stat.S_IMODE(os.stat(_invitation_path()).st_mode)
        assert mode == 0o600  # the join code is a secret: this user only
        time.sleep(0.01)
        assert duet.local_invitation(max_age=0) is None  # stale invitations are ignored
    finally:
        owner.close()


def test_a_joined_duet_withdraws_its_spent_invitation_and_leaves_a_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A room pairs one researcher: a notebook opened after the join must not be handed the
    spent code ("already used"), while a duet launched since keeps its own invitation."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # no other duet's invitation
    first = duet.launch(ice_servers=[], show=False, audit_path=f"{tmp_path}/first.db")
    second = duet.launch(ice_servers=[], show=False, audit_path=f"{tmp_path}/second.db")
    researchers = []
    try:
        assert duet.local_invitation() == (second.code, second.server_url)  # the newest
        researchers.append(duet.join(first.code, first.server_url, ice_servers=[]))
        assert duet.local_invitation() == (second.code, second.server_url)  # not first's
        researchers.append(duet.join(*duet.local_invitation() or ("", ""), ice_servers=[]))
        assert second.wait_for_peer(timeout=10)
        assert duet.local_invitation() is None  # spent: nothing to hand a later notebook
    finally:
        for session in (*researchers, first, second):
            session.close()


def test_a_same_machine_duet_uses_no_public_stun_server(tmp_path: object) -> None:
    owner = duet.launch(show=False, audit_path=f"{tmp_path}/audit.db")  # embedded: loopback
    try:
        assert owner.config.ice_servers is not None and list(owner.config.ice_servers) == []
    finally:
        owner.close()
    explicit = duet.launch(show=False, audit_path=f"{tmp_path}/audit2.db",
                           ice_servers=["stun:stun.example.org:3478"])
    try:  # what the owner asks for is kept (nothing is contacted before a researcher joins)
        assert list(explicit.config.ice_servers or []) == ["stun:stun.example.org:3478"]
    finally:
        explicit.close()
