"""The owner's audit log: real SQLite files, real threads, a real SIGKILLed process."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import platformdirs
import pytest

from duet import DuetError, audit
from duet.audit import EVENTS, AuditError, AuditEvent, AuditLog, default_audit_path, sha256_of


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path / "audit.sqlite3") as opened:
        yield opened


def test_record_returns_ids_and_events_round_trip(log: AuditLog) -> None:
    before = time.time()
    first = log.record("session_started", session="s1", server="http://127.0.0.1:8765")
    second = log.record(
        "request",
        session="s1",
        request_id="r1",
        pointer_id=7,
        operation="np.mean",
        lineage="np.mean(ages * 2)",
        nbytes=8,
        reason="mean age for the paper",
    )
    assert second == first + 1
    events = log.events()
    assert [e.id for e in events] == [first, second]
    req = events[1]
    assert req == AuditEvent(
        id=second,
        ts=req.ts,
        session="s1",
        event="request",
        request_id="r1",
        pointer_id=7,
        operation="np.mean",
        lineage="np.mean(ages * 2)",
        nbytes=8,
        sha256=None,
        detail={"reason": "mean age for the paper"},
    )
    assert before <= events[0].ts <= req.ts <= time.time()
    assert events[0].detail == {"server": "http://127.0.0.1:8765"}
    with pytest.raises(AttributeError):
        req.event = "decision"  # type: ignore[misc]


def test_filters_and_limit_keep_the_newest(log: AuditLog) -> None:
    for i in range(5):
        log.record("request", session="a", request_id=f"r{i}")
        log.record("decision", session="b", request_id=f"r{i}", status="approved", by="owner")
    assert [e.request_id for e in log.events(session="a")] == [f"r{i}" for i in range(5)]
    assert {e.session for e in log.events(event="decision")} == {"b"}
    assert [e.event for e in log.events(request_id="r3")] == ["request", "decision"]
    assert [e.request_id for e in log.events(session="a", limit=2)] == ["r3", "r4"]
    assert log.events(limit=0) == []
    cut = log.events()[6].ts
    assert [e.id for e in log.events(since=cut)] == [e.id for e in log.events()[6:]]
    assert log.tail(3) == log.events()[-3:]
    assert len(log) == 10
    with pytest.raises(ValueError, match="limit"):
        log.events(limit=-1)


def test_unknown_event_is_rejected_and_nothing_is_written(log: AuditLog) -> None:
    with pytest.raises(ValueError, match="unknown audit event 'approved'"):
        log.record("approved", session="s")
    with pytest.raises(ValueError, match="unknown audit event"):
        log.events(event="aproved")
    assert len(log) == 0


def test_event_set_is_closed_and_documented() -> None:
    assert set(EVENTS) == {
        "session_started", "paired", "peer_authenticated", "share", "unshare",
        "allowlist_changed", "op_executed",
        "op_refused", "op_failed", "request", "decision", "value_sent", "protocol_error",
        "disconnect", "session_closed", "worker_restarted", "rule_error",
        "dp_budget", "dp_charge",
    }  # fmt: skip
    assert all(isinstance(doc, str) and len(doc) > 20 for doc in EVENTS.values())
    with pytest.raises(TypeError):
        EVENTS["new_event"] = "added at runtime"  # type: ignore[index]


def test_append_only_triggers_refuse_update_and_delete(log: AuditLog) -> None:
    log.record("decision", session="s", request_id="r1", status="denied", by="owner")
    raw = sqlite3.connect(log.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute('UPDATE events SET detail = \'{"status": "approved"}\'')
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("DELETE FROM events")
        raw.rollback()
    finally:
        raw.close()
    assert [e.detail["status"] for e in log.events()] == ["denied"]


def test_schema_version_wal_and_full_sync(log: AuditLog) -> None:
    raw = sqlite3.connect(log.path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == audit.SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [r[1] for r in raw.execute("PRAGMA table_info(events)")]
    finally:
        raw.close()
    assert columns == [
        "id", "ts", "session", "event", "request_id", "pointer_id", "operation", "lineage",
        "nbytes", "sha256", "detail",
    ]  # fmt: skip
    conn = log._connection()
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopen_keeps_events_and_continues_ids(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dirs" / "audit.sqlite3"
    with AuditLog(path) as first:
        ids = [first.record("share", session="s", pointer_id=i, name=f"x{i}") for i in range(3)]
    assert path.is_file()
    with AuditLog(path) as again:
        assert [e.id for e in again] == ids
        assert again.record("unshare", session="s", name="x0") == ids[-1] + 1
        assert len(again) == 4


def test_default_path_is_user_data_dir_unless_env_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DUET_AUDIT_PATH", raising=False)
    assert default_audit_path() == Path(platformdirs.user_data_dir("duet")) / "audit.sqlite3"
    target = tmp_path / "env" / "log.sqlite3"
    monkeypatch.setenv("DUET_AUDIT_PATH", str(target))
    assert default_audit_path() == target
    with AuditLog() as log:
        assert log.path == target
        log.record("session_started", session="s")
    assert target.is_file()


def test_detail_and_columns_accept_numpy_scalars(log: AuditLog) -> None:
    log.record(
        "value_sent",
        session="s",
        pointer_id=np.int64(4),
        nbytes=np.int64(800),
        shape=(10, 10),
        dtype=np.dtype("float64"),
    )
    (event,) = log.events()
    assert (event.pointer_id, event.nbytes) == (4, 800)
    assert type(event.nbytes) is int
    assert event.detail == {"shape": [10, 10], "dtype": "float64"}
    with pytest.raises(TypeError):  # a float count is a caller's bug, not something to round
        log.record("value_sent", session="s", nbytes=8.5)  # type: ignore[arg-type]
    assert len(log) == 1


def test_sha256_of_hashes_buffers_as_one_stream() -> None:
    raw = np.arange(1000, dtype=np.float32).tobytes()
    pieces: list[bytes | memoryview] = [memoryview(raw)[:1200], raw[1200:], b""]
    assert sha256_of(pieces) == hashlib.sha256(raw).hexdigest()
    assert sha256_of([]) == hashlib.sha256(b"").hexdigest()


def test_iteration_pages_through_a_long_log(log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_PAGE", 3)
    ids = [log.record("op_executed", session="s", operation="add", pointer_id=i) for i in range(10)]
    assert [e.id for e in log] == ids
    assert [e.pointer_id for e in log] == list(range(10))


def test_concurrent_writers_from_threads(log: AuditLog) -> None:
    threads_n, per_thread = 8, 50
    start = threading.Barrier(threads_n + 1)

    def writer(t: int) -> list[int]:
        start.wait()
        return [
            log.record("op_executed", session=f"t{t}", pointer_id=i, operation="add")
            for i in range(per_thread)
        ]

    def reader() -> list[int]:
        start.wait()
        seen = []
        for _ in range(20):
            seen.append(len(log))
            ids = [e.id for e in log.tail(5)]
            assert ids == sorted(ids)
        return seen

    with ThreadPoolExecutor(threads_n + 1) as pool:
        writers = [pool.submit(writer, t) for t in range(threads_n)]
        reading = pool.submit(reader)
        returned = [w.result(timeout=60) for w in writers]
        seen = reading.result(timeout=60)
    assert seen == sorted(seen)
    assert len({i for ids in returned for i in ids}) == threads_n * per_thread
    assert len(log) == threads_n * per_thread
    for t in range(threads_n):
        mine = log.events(session=f"t{t}")
        assert [e.id for e in mine] == returned[t]
        assert [e.pointer_id for e in mine] == list(range(per_thread))


def test_two_handles_on_one_file_interleave(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    with AuditLog(path) as a, AuditLog(path) as b:
        ids = [(a if i % 2 else b).record("paired", session=f"s{i}") for i in range(6)]
        assert ids == sorted(ids) and len(set(ids)) == 6
        assert [e.session for e in a] == [f"s{i}" for i in range(6)]
        assert len(b) == 6


_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from duet.audit import AuditLog
    log = AuditLog(sys.argv[1])
    i = 0
    while True:
        rid = log.record("decision", session="killed", request_id=f"r{i}",
                         status="approved", by="rule:1", reason="auto")
        print(rid, i, flush=True)
        i += 1
    """
)


def test_every_acknowledged_event_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    acknowledged: list[tuple[int, int]] = []
    try:
        while len(acknowledged) < 50:
            line = proc.stdout.readline()
            assert line, f"writer died early with code {proc.poll()}"
            rid, i = map(int, line.split())
            acknowledged.append((rid, i))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        acknowledged += [tuple(map(int, ln.split())) for ln in proc.stdout]  # type: ignore[misc]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with AuditLog(path) as reopened:
        stored = {e.id: e for e in reopened.events(session="killed")}
        for rid, i in acknowledged:
            assert stored[rid].request_id == f"r{i}"
            assert stored[rid].detail == {"status": "approved", "by": "rule:1", "reason": "auto"}
        # Appending after the crash works and continues after everything that made it to disk.
        assert reopened.record("session_started", session="next") > max(stored)


def test_garbage_file_gives_clear_error_and_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    junk = b"this is not a database, it is a shopping list\n" * 100
    path.write_bytes(junk)
    with pytest.raises(AuditError, match="not a readable duet audit log") as info:
        AuditLog(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, DuetError)
    with pytest.raises(AuditError, match="not a readable duet audit log"):
        AuditLog(path, readonly=True)
    assert path.read_bytes() == junk


def test_foreign_and_newer_sqlite_files_are_refused_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.sqlite3"
    raw = sqlite3.connect(foreign)
    raw.execute("CREATE TABLE customers (name TEXT)")
    raw.commit()
    raw.close()
    before = foreign.read_bytes()
    with pytest.raises(AuditError, match="not a duet audit log"):
        AuditLog(foreign)
    assert foreign.read_bytes() == before
    raw = sqlite3.connect(foreign)
    assert [r[0] for r in raw.execute("SELECT name FROM sqlite_master")] == ["customers"]
    raw.close()

    newer = tmp_path / "newer.sqlite3"
    AuditLog(newer).close()
    raw = sqlite3.connect(newer)
    raw.execute(f"PRAGMA user_version = {audit.SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(AuditError, match="newer duet"):
        AuditLog(newer)


def test_unopenable_path_is_an_audit_error(tmp_path: Path) -> None:
    (tmp_path / "a_directory").mkdir()
    with pytest.raises(AuditError, match="not a readable duet audit log"):
        AuditLog(tmp_path / "a_directory")


def test_readonly_reads_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    with pytest.raises(FileNotFoundError):
        AuditLog(path, readonly=True)
    assert not path.exists()
    with AuditLog(path) as writer, AuditLog(path, readonly=True) as reader:
        writer.record("disconnect", session="s", why="peer left")
        assert [e.event for e in reader] == ["disconnect"]
        with pytest.raises(AuditError, match="read-only"):
            reader.record("disconnect", session="s")
        assert len(writer) == 1
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    with pytest.raises(AuditError, match="not a duet audit log"):
        AuditLog(empty, readonly=True)


def test_close_is_idempotent_and_closed_log_refuses_use(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite3")
    log.record("session_closed", session="s")
    log.close()
    log.close()
    assert "closed" in repr(log)
    assert "closed" in log._repr_html_()
    with pytest.raises(AuditError, match="closed"):
        log.record("session_closed", session="s")
    with pytest.raises(AuditError, match="closed"):
        log.events()


def test_repr_is_a_table_of_the_last_events(log: AuditLog) -> None:
    assert repr(log).endswith(": 0 events")
    for i in range(25):
        log.record("op_refused", session="s", operation=f"op{i}", reason="not allowlisted")
    text = repr(log)
    lines = text.splitlines()
    assert lines[0] == f"AuditLog('{log.path}'): 25 events"
    assert lines[1].split() == ["id", "time", "session", "event", "operation", "detail"]
    assert len(lines) == 2 + 1 + 20  # heading, header row, rule, the last 20 events
    assert "op24" in lines[-1] and "op4 " not in text and "op5 " in text


def test_table_clips_long_cells(log: AuditLog) -> None:
    lineage = "np.sum(" + " + ".join(f"x{i}" for i in range(40)) + ")"
    log.record("op_executed", session="s", lineage=lineage)
    text = repr(log)
    assert lineage not in text and lineage[:30] in text and "…" in text
    assert log.events()[0].lineage == lineage


def test_repr_html_escapes_values(log: AuditLog) -> None:
    log.record("request", session="s", request_id="r1", reason="<script>alert(1)</script>")
    page = log._repr_html_()
    assert page.startswith("<p>AuditLog") and "<table>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_to_jsonl_round_trips(log: AuditLog) -> None:
    log.record("value_sent", session="s", request_id="r1", nbytes=3, sha256=sha256_of([b"abc"]))
    log.record("decision", session="s", request_id="r2", status="denied", by="owner", reason="é")
    lines = log.to_jsonl(request_id="r2").splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == log.events(request_id="r2")[0].to_dict()
    everything = [json.loads(ln) for ln in log.to_jsonl().splitlines()]
    assert [e["sha256"] for e in everything] == [hashlib.sha256(b"abc").hexdigest(), None]
