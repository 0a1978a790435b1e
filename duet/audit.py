"""The owner's audit log: an append-only SQLite file on the owner's disk.

Every session event (pairing, sharing, operations, requests, decisions, values sent, errors)
is written here *before* the corresponding message leaves, so the log is the owner's proof of
what the researcher could have learned. The file survives a kill of the owner's kernel: each
``record`` is a committed, fsynced transaction (WAL, ``synchronous=FULL``), and triggers refuse
UPDATE and DELETE so rows cannot be rewritten through SQLite. Events that no message follows
(an operation ran, a request is waiting) may be written with ``sync=False``: committed at once,
made durable on disk by the next synced write, which always precedes anything leaving.

    log = AuditLog()                       # default path, see default_audit_path()
    log.record("request", session=sid, request_id="r1", pointer_id=7, reason="mean age")
    log.events(request_id="r1")            # -> [AuditEvent(...)]

``duet audit [PATH]`` (duet/cli.py) prints the same log from a shell.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import sqlite3
import threading
import time
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from html import escape as html_escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsIndex

import platformdirs
from tabulate import tabulate

from .errors import DuetError
from .screen import safe_text

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "EVENTS",
    "SCHEMA_VERSION",
    "AuditError",
    "AuditEvent",
    "AuditLog",
    "SessionAudit",
    "default_audit_path",
    "format_table",
    "sha256_of",
]

EVENTS: Mapping[str, str] = types.MappingProxyType(
    {
        "session_started": "The owner opened a session (detail: e.g. server URL).",
        "paired": "A researcher joined the owner's room through the signaling server.",
        "peer_authenticated": (
            "The peer's SDP (and DTLS fingerprint) verified with the join secret."
        ),
        "share": "The owner shared an object (pointer_id; detail: name, type, declared metadata).",
        "unshare": "The owner withdrew a shared object (detail: name).",
        "allowlist_changed": "The owner allowed or denied names mid-session (detail: names).",
        "op_executed": "An allowlisted operation ran (operation, lineage, pointer_id of result).",
        "op_refused": "An operation was refused by policy and never ran (detail: reason).",
        "op_failed": "An allowed operation raised on the owner's side (detail: exception type).",
        "request": "The researcher asked for a value (request_id, pointer_id, lineage, reason).",
        "decision": (
            "A request was decided (detail: status approved/denied, by 'owner' or "
            "'rule:<id>', reason)."
        ),
        "value_sent": "An approved value left the owner (request_id, nbytes, sha256).",
        "protocol_error": "The peer sent a frame that was rejected (detail: what was wrong).",
        "worker_restarted": (
            "The worker process that runs operations was restarted or stopped (detail: "
            "reason, whether it crashed, whether the restart limit stopped it)."
        ),
        "rule_error": "A request rule raised while being checked (detail: rule, error).",
        "disconnect": "The peer left or the data channel died.",
        "session_closed": "The owner closed the session.",
        "dp_budget": (
            "The owner shared a name with differential privacy (detail: name, total epsilon "
            "and delta, what the ledger says is spent)."
        ),
        "dp_charge": (
            "The privacy ledger changed for a request (detail: name, epsilon, delta, status "
            "reserved/spent/released/refused/unbounded)."
        ),
    }
)
"""The closed set of event names ``AuditLog.record`` accepts, each with what it means."""

SCHEMA_VERSION = 1
"""Stored in ``PRAGMA user_version``; a file with a newer version is refused, not rewritten."""

_SCHEMA = (
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        session TEXT NOT NULL,
        event TEXT NOT NULL,
        request_id TEXT,
        pointer_id INTEGER,
        operation TEXT,
        lineage TEXT,
        nbytes INTEGER,
        sha256 TEXT,
        detail TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX events_session ON events (session, id)",
    "CREATE INDEX events_request ON events (request_id)",
    """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the duet audit log is append-only'); END""",
    """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the duet audit log is append-only'); END""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

_COLUMNS = (
    "id, ts, session, event, request_id, pointer_id, operation, lineage, nbytes, sha256, detail"
)
_PAGE = 1000  # rows fetched per query while iterating, so a long log is never loaded at once
_CELL = 40  # widest cell in the text table; --json / to_jsonl() carry full values


_INSERT = ("INSERT INTO events (ts, session, event, request_id, pointer_id, operation,"
           " lineage, nbytes, sha256, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


class AuditError(DuetError):
    """The audit log cannot be opened or written (not an audit log, corrupted, closed ...)."""


def default_audit_path() -> Path:
    """``$DUET_AUDIT_PATH`` if set, else ``audit.sqlite3`` in the user's data directory."""
    env = os.environ.get("DUET_AUDIT_PATH")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("duet")) / "audit.sqlite3"


def sha256_of(buffers: Iterable[bytes | memoryview]) -> str:
    """Hex SHA-256 of the concatenated buffers of a value as sent, without joining them."""
    h = hashlib.sha256()
    for buf in buffers:
        h.update(buf)
    return h.hexdigest()


@dataclass(frozen=True)
class AuditEvent:
    """One row of the log; ``detail`` is the JSON object recorded with it."""

    id: int
    ts: float
    session: str
    event: str
    request_id: str | None
    pointer_id: int | None
    operation: str | None
    lineage: str | None
    nbytes: int | None
    sha256: str | None
    detail: dict[str, Any]

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> AuditEvent:
        """Build from a ``SELECT`` of the table's columns in schema order."""
        id_, ts, session, event, request_id, pointer_id, operation, lineage, nbytes, sha, detail = (
            row
        )
        return cls(
            id=id_,
            ts=ts,
            session=session,
            event=event,
            request_id=request_id,
            pointer_id=pointer_id,
            operation=operation,
            lineage=lineage,
            nbytes=nbytes,
            sha256=sha,
            detail=json.loads(detail),
        )

    @property
    def time(self) -> datetime:
        """``ts`` as a local datetime."""
        return datetime.fromtimestamp(self.ts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """One JSON line (the format of ``duet audit --json``)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)


class AuditLog:
    """Append-only event log in a SQLite file; safe to share between threads.

    One connection guarded by a lock: records come from the session's asyncio thread and from
    the worker that executes operations, and SQLite serialises writers anyway. Several
    processes may open the same file (WAL lets readers such as ``duet audit`` run alongside).
    ``readonly=True`` opens an existing log without ever writing to it.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, readonly: bool = False):
        self.path = Path(path).expanduser() if path is not None else default_audit_path()
        self.readonly = readonly
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if readonly and not self.path.is_file():
            raise FileNotFoundError(f"no audit log at {self.path}")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            self._init(conn)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise AuditError(f"{self.path} is not a readable duet audit log: {exc}") from exc
            raise
        self._conn = conn

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        conn.isolation_level = None  # autocommit: each INSERT is its own durable transaction
        return conn

    def _init(self, conn: sqlite3.Connection) -> None:
        """Check (and if new, create) the schema; refuse foreign or newer files untouched."""
        if not self.readonly:
            conn.execute("PRAGMA synchronous=FULL")
            # IMMEDIATE: two processes creating the same new log must not both create it.
            conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if version == 0 and not tables and not self.readonly:
                for stmt in _SCHEMA:
                    conn.execute(stmt)
            elif version > SCHEMA_VERSION:
                raise AuditError(
                    f"{self.path} was written by a newer duet (schema {version} > "
                    f"{SCHEMA_VERSION}); upgrade duet to read it"
                )
            elif version != SCHEMA_VERSION or "events" not in tables:
                raise AuditError(f"{self.path} is an SQLite file but not a duet audit log")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if conn.in_transaction:
            conn.execute("COMMIT")
        if not self.readonly:
            # Only once the file is known to be ours; WAL is a persistent property of the file.
            conn.execute("PRAGMA journal_mode=WAL")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AuditError(f"the audit log {self.path} is closed")
        return self._conn

    def record(
        self,
        event: str,
        *,
        session: str,
        request_id: str | None = None,
        pointer_id: SupportsIndex | None = None,
        operation: str | None = None,
        lineage: str | None = None,
        nbytes: SupportsIndex | None = None,
        sha256: str | None = None,
        **detail: Any,
    ) -> int:
        """Append one event and return its id once it is durably on disk.

        Call it before sending the message the event describes. ``detail`` values JSON cannot
        represent are stored as ``str()`` and integer columns take numpy integers, so a
        caller's numpy scalar never costs an event.
        """
        return self.record_many([(event, {
            "session": session, "request_id": request_id, "pointer_id": pointer_id,
            "operation": operation, "lineage": lineage, "nbytes": nbytes, "sha256": sha256,
            **detail})])[0]

    def record_many(self, events: Iterable[tuple[str, Mapping[str, Any]]], *,
                    sync: bool = True) -> list[int]:
        """Append several events in one transaction (one disk sync, not one each).

        Each item is ``(event, fields)`` with the keyword arguments ``record`` takes.
        ``sync=False`` is for events no message follows (an operation ran, a request waits):
        they reach the file at once, so they survive a killed process, but the wait for the
        disk is left to the next synced write, which in WAL order makes them durable too.
        """
        if self.readonly:
            raise AuditError(f"the audit log {self.path} was opened read-only")
        rows = [self._row(event, dict(fields)) for event, fields in events]
        if not rows:
            return []
        ids: list[int] = []
        with self._lock:
            conn = self._connection()
            try:
                if not sync:
                    conn.execute("PRAGMA synchronous=NORMAL")
                if len(rows) > 1:
                    conn.execute("BEGIN")
                if len(rows) == 1:
                    cur = conn.execute(_INSERT, rows[0])
                    assert cur.lastrowid is not None
                    ids.append(cur.lastrowid)
                else:  # one statement for the batch (a pipelined batch has thousands)
                    conn.executemany(_INSERT, rows)
                    # Rows of one transaction get consecutive ids: rowids are max + 1, and
                    # nothing else writes while it holds the lock (rows are never deleted).
                    last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                    ids.extend(range(last - len(rows) + 1, last + 1))
                if conn.in_transaction:
                    conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise AuditError(f"cannot write to the audit log {self.path}: {exc}") from exc
            finally:
                if not sync:
                    conn.execute("PRAGMA synchronous=FULL")
        return ids

    @staticmethod
    def _row(event: str, fields: dict[str, Any]) -> tuple[Any, ...]:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}; expected one of {sorted(EVENTS)}")
        session = fields.pop("session")
        request_id, pointer_id = fields.pop("request_id", None), fields.pop("pointer_id", None)
        operation, lineage = fields.pop("operation", None), fields.pop("lineage", None)
        nbytes, sha256 = fields.pop("nbytes", None), fields.pop("sha256", None)
        detail = fields
        return (
            time.time(),
            session,
            event,
            None if request_id is None else str(request_id),
            None if pointer_id is None else operator.index(pointer_id),
            operation,
            lineage,
            None if nbytes is None else operator.index(nbytes),
            sha256,
            json.dumps(detail, default=str, ensure_ascii=False) if detail else "{}",
        )

    def _select(self, where: list[str], params: list[Any], tail: str) -> list[AuditEvent]:
        sql = f"SELECT {_COLUMNS} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            try:
                rows = self._connection().execute(sql + " " + tail, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise AuditError(f"cannot read the audit log {self.path}: {exc}") from exc
        return [AuditEvent.from_row(r) for r in rows]

    def events(
        self,
        *,
        session: str | None = None,
        event: str | None = None,
        request_id: str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        """Matching events, oldest first; ``since`` is a unix time, ``limit`` keeps the newest."""
        if event is not None and event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}; expected one of {sorted(EVENTS)}")
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("session", session), ("event", event), ("request_id", request_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if limit is None:
            return self._select(where, params, "ORDER BY id")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        newest = self._select(where, params + [limit], "ORDER BY id DESC LIMIT ?")
        return newest[::-1]

    def tail(self, n: int = 20) -> list[AuditEvent]:
        """The last ``n`` events, oldest first."""
        return self.events(limit=n)

    def to_jsonl(self, **filters: Any) -> str:
        """The events selected by ``events(**filters)`` as JSON lines."""
        return "".join(e.to_json() + "\n" for e in self.events(**filters))

    def __len__(self) -> int:
        with self._lock:
            return int(self._connection().execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def __iter__(self) -> Iterator[AuditEvent]:
        """All events, oldest first, fetched a page at a time (events appended meanwhile show)."""
        last = 0
        while page := self._select(["id > ?"], [last], f"ORDER BY id LIMIT {_PAGE}"):
            yield from page
            last = page[-1].id

    def __repr__(self) -> str:
        if self._conn is None:
            return f"AuditLog('{self.path}', closed)"
        head = f"AuditLog('{self.path}'): {len(self)} events"
        events = self.tail()
        return head + ("\n" + format_table(events) if events else "")

    def _repr_html_(self) -> str:
        if self._conn is None:
            return f"<p>AuditLog <code>{html_escape(str(self.path))}</code> (closed)</p>"
        headers, rows = _table(self.tail())
        return (
            f"<p>AuditLog <code>{html_escape(str(self.path))}</code>: {len(self)} events"
            f" (last {len(rows)} shown)</p>"
            + tabulate(rows, headers, tablefmt="html", disable_numparse=True)
        )

    def bind(self, session: str) -> SessionAudit:
        """A writer that records every event under ``session``."""
        return SessionAudit(self, session)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionAudit:
    """An audit writer bound to one session id: ``record(event, **fields)``."""

    def __init__(self, log: AuditLog, session: str) -> None:
        self.log = log
        self.session = session

    def record(self, event: str, **fields: Any) -> int:
        return self.log.record(event, session=self.session, **fields)

    def record_many(self, events: Iterable[tuple[str, Mapping[str, Any]]], *,
                    sync: bool = True) -> list[int]:
        return self.log.record_many([(event, {**fields, "session": self.session})
                                     for event, fields in events], sync=sync)


def _clip(value: Any) -> str:
    """A cell as the owner reads it: researcher-written text (reasons, lineage, names in the
    detail) with control, bidirectional and invisible characters escaped (``safe_text``):
    JSON escapes only the C0 controls, and the table reaches a terminal and a notebook."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return _cut(safe_text(_cut(text)))  # cut before escaping (bounded cost) and after (an
                                         # escape is longer than the character it shows)


def _cut(text: str) -> str:
    return text if len(text) <= _CELL else text[: _CELL - 1] + "…"


def _table(events: list[AuditEvent]) -> tuple[list[str], list[list[str]]]:
    """Headers and clipped cells; optional columns empty in every row are left out."""
    optional = ("request_id", "pointer_id", "operation", "lineage", "nbytes", "sha256")
    shown = [c for c in optional if any(getattr(e, c) is not None for e in events)]
    headers = ["id", "time", "session", "event", *shown, "detail"]
    rows = [
        [
            str(e.id),
            e.time.isoformat(sep=" ", timespec="milliseconds"),
            _clip(e.session),
            e.event,
            *("" if getattr(e, c) is None else _clip(getattr(e, c)) for c in shown),
            _clip(e.detail) if e.detail else "",
        ]
        for e in events
    ]
    return headers, rows


def format_table(events: list[AuditEvent]) -> str:
    """A plain-text table of ``events`` (long cells clipped) for terminals."""
    headers, rows = _table(events)
    return tabulate(rows, headers, tablefmt="simple", disable_numparse=True)
