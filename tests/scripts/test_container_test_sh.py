"""scripts/container-test.sh's helpers on a machine like a fresh CI one: no iptables rules,
or no iptables at all, and a failing command that must say why (it once ended silently)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "container-test.sh"


def run_with_helpers(snippet: str,
                     path_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Source the script's helpers (no container work) and run ``snippet`` in that shell."""
    env = {**os.environ, "DUET_CONTAINER_TEST_FUNCTIONS_ONLY": "1"}
    if path_dir is not None:  # stand-ins for system binaries come first, or alone
        env["PATH"] = f"{path_dir}:/usr/bin:/bin"
    return subprocess.run(["bash", "-c", f'source "{SCRIPT}"; {snippet}'], env=env,
                          capture_output=True, text=True, timeout=60)


def fake_binary(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize("rules, exit_code", [("", 0), ("", 1), ("# generated\\n", 0)])
def test_iptables_probe_survives_a_machine_with_no_rules(tmp_path: Path, rules: str,
                                                         exit_code: int) -> None:
    for tool in ("iptables-save", "ip6tables-save"):
        fake_binary(tmp_path, tool, f'printf "{rules}"; exit {exit_code}')
    result = run_with_helpers('state=$(iptables_state); echo "state=$state"', tmp_path)
    assert result.returncode == 0, result.stderr
    state = result.stdout.strip().removeprefix("state=")
    assert len(state) == 64 and all(c in "0123456789abcdef" for c in state)


def test_iptables_probe_sees_a_change_in_rules(tmp_path: Path) -> None:
    states = []
    for rules in (":INPUT ACCEPT [0:0]\\n-A INPUT -j ACCEPT\\n",
                  ":INPUT ACCEPT [0:0]\\n-A INPUT -j DROP\\n",
                  ":INPUT ACCEPT [7:420]\\n-A INPUT -j DROP\\n"):
        fake_binary(tmp_path, "iptables-save", f'printf "{rules}"')
        fake_binary(tmp_path, "ip6tables-save", "true")
        result = run_with_helpers("iptables_state", tmp_path)
        assert result.returncode == 0, result.stderr
        states.append(result.stdout.strip())
    assert states[0] != states[1] and states[1] == states[2]  # counters are ignored


def test_iptables_probe_without_iptables_installed(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    for tool in ("sha256sum", "grep", "sed", "cut", "mktemp", "date", "dirname", "rm"):
        target = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True,
                                text=True).stdout.strip()
        (empty / tool).symlink_to(target)
    env = {**os.environ, "DUET_CONTAINER_TEST_FUNCTIONS_ONLY": "1", "PATH": str(empty)}
    result = subprocess.run(["/bin/bash", "-c", f'source "{SCRIPT}"; iptables_state'], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no-iptables"


def test_a_failing_command_says_what_failed_before_the_script_ends() -> None:
    snippet = ("trap 'on_error \"$BASH_COMMAND\" \"$?\" \"$LINENO\"' ERR; "
               "echo before; false; echo never")
    result = run_with_helpers(snippet)
    assert result.returncode == 1
    assert "before" in result.stdout and "never" not in result.stdout
    assert 'ERROR: "false" failed with status 1' in result.stderr
