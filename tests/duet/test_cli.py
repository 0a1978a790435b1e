"""``duet audit``: in process and as the installed console script in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from duet.audit import AuditLog
from duet.cli import main

DUET = Path(sys.executable).parent / "duet"


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path) as log:
        log.record("session_started", session="s1", server="http://127.0.0.1:8765")
        log.record("request", session="s1", request_id="r1", pointer_id=5, nbytes=8, reason="m")
        log.record("decision", session="s1", request_id="r1", status="approved", by="owner")
        log.record("request", session="s2", request_id="r2", pointer_id=6, reason="n")
        log.record("decision", session="s2", request_id="r2", status="denied", by="rule:1")
    return path


def test_console_script_prints_json_lines_while_the_log_is_open(tmp_path: Path) -> None:
    path = tmp_path / "live.sqlite3"
    with AuditLog(path) as log:  # a running session keeps the log open and writing
        log.record("paired", session="live")
        log.record("value_sent", session="live", request_id="r9", nbytes=3, sha256="ab" * 32)
        done = subprocess.run(
            [str(DUET), "audit", str(path), "--json"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert [json.loads(ln) for ln in done.stdout.splitlines()] == [
            e.to_dict() for e in log.events()
        ]
        log.record("disconnect", session="live")  # the reader did not block the writer
        assert len(log) == 3


def test_python_dash_m_prints_a_table(log_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "duet.cli", "audit", str(log_path), "--session", "s2"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["id", "time", "session", "event"]
    assert [ln.split()[4] for ln in lines[2:]] == ["request", "decision"]
    assert "rule:1" in lines[-1] and "s1" not in done.stdout


def test_filters_in_process(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(log_path), "--json", "--event", "decision", "--limit", "1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    event = json.loads(line)
    assert (event["request_id"], event["detail"]["status"]) == ("r2", "denied")

    assert main(["audit", str(log_path), "--session", "nobody"]) == 0
    assert capsys.readouterr().out == f"no matching events in {log_path}\n"


def test_default_path_comes_from_the_environment(
    log_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DUET_AUDIT_PATH", str(log_path))
    assert main(["audit", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_missing_file_is_a_clear_error_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.sqlite3"
    assert main(["audit", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"duet audit: no audit log at {missing}\n"
    assert not missing.exists()


def test_corrupted_file_is_a_clear_error_in_a_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    path.write_bytes(b"\x00garbage" * 512)
    done = subprocess.run(
        [str(DUET), "audit", str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"duet audit: {path} is not a readable duet audit log")
    assert "Traceback" not in done.stderr


def test_usage_errors_exit_2(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "audit" in capsys.readouterr().err
    for bad in (["--event", "approved"], ["--limit", "0"], ["--limit", "x"]):
        with pytest.raises(SystemExit) as info:
            main(["audit", str(log_path), *bad])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "duet audit: error" in err and "Traceback" not in err
