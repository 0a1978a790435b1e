"""The privacy budget ledger: what each DP-shared name may spend, and what it has spent.

One SQLite file in the owner's data directory, next to the audit log
(``ledger.sqlite3`` in the audit log's directory). A budget belongs to the shared *name*:
researchers have no lasting identity yet, so sharing under the same name again, in a new
session or after a restart of the owner's kernel, continues the same ledger (the owner's
latest declaration sets the total; what was spent stays spent).

A charge goes through three states, so two requests arriving together can never spend the
same budget twice:

    reserved  the kernel checked the cost against what is left and set it aside, before the
              worker computes anything; counts as spent from then on
    spent     the owner (or a rule) approved: the value left
    released  denied, withdrawn, or the value could not be made: nothing left, nothing spent

A reservation left behind by a crash stays ``reserved`` and so counts as spent: a value may
have left just before the crash (conservative by construction). Reserving is one
``BEGIN IMMEDIATE`` transaction, so even two owner processes sharing one file cannot
overspend. An exact (non-DP) release of DP-protected data is recorded as *unbounded* loss:
nothing is left of that budget afterwards.

Charging API (also for DP-SGD training, which is charged to the same ledger)::

    ledger.reserve(name, epsilon, delta, charge_id, what)   # PrivacyBudgetExceeded if over
    ledger.commit(charge_id, epsilon=actual, delta=actual)  # at most what was reserved
    ledger.release(charge_id)
    ledger.record_unbounded(name, charge_id, what)
    ledger.budget(name) -> Budget
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import PrivacyBudgetExceeded

__all__ = ["LEDGER_FILE", "Budget", "Charge", "Ledger"]

LEDGER_FILE = "ledger.sqlite3"
_TOLERANCE = 1e-9  # float sums of charges may exceed the total by rounding, never more
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS budgets (
        name TEXT PRIMARY KEY,
        epsilon REAL NOT NULL,
        delta REAL NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS charges (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        charge_id TEXT NOT NULL UNIQUE,
        epsilon REAL NOT NULL,
        delta REAL NOT NULL,
        unbounded INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL CHECK (status IN ('reserved', 'spent', 'released')),
        what TEXT NOT NULL DEFAULT '',
        ts REAL NOT NULL,
        pid INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS charges_name ON charges (name, status)",
)


@dataclass(frozen=True, repr=False)
class Budget:
    """A shared name's privacy budget as the ledger has it now."""

    name: str
    epsilon: float
    delta: float
    epsilon_spent: float  # reservations included (they may become spent at any moment)
    delta_spent: float
    reserved: int = 0  # charges reserved and not yet decided
    unbounded: bool = False  # an exact release of this data was approved

    @property
    def epsilon_left(self) -> float:
        return 0.0 if self.unbounded else max(self.epsilon - self.epsilon_spent, 0.0)

    @property
    def delta_left(self) -> float:
        return 0.0 if self.unbounded else max(self.delta - self.delta_spent, 0.0)

    def allows(self, epsilon: float, delta: float) -> bool:
        return not self.unbounded and (
            self.epsilon_spent + epsilon <= self.epsilon * (1 + _TOLERANCE) + _TOLERANCE
            and self.delta_spent + delta <= self.delta * (1 + _TOLERANCE) + 1e-15)

    def __str__(self) -> str:
        if self.unbounded:
            return (f"budget {self.name!r}: UNBOUNDED loss (an exact value of this DP data "
                    f"was released); ε total {self.epsilon:g}")
        return (f"budget {self.name!r}: ε {self.epsilon_spent:.4g} spent of {self.epsilon:g} "
                f"({self.epsilon_left:.4g} left), δ {self.delta_spent:.3g} of {self.delta:g}")

    def __repr__(self) -> str:
        return f"<{self}>"

    def _repr_html_(self) -> str:
        import html

        return f"<p><b>privacy {html.escape(str(self))}</b></p>"


@dataclass(frozen=True)
class Charge:
    name: str
    charge_id: str
    epsilon: float
    delta: float
    unbounded: bool
    status: str
    what: str
    ts: float


class Ledger:
    """The privacy budget ledger (see module doc); safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA journal_mode=WAL")
        with self._transaction() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    @classmethod
    def beside(cls, audit_path: str | os.PathLike[str]) -> Ledger:
        """The ledger in the same directory as the audit log at ``audit_path``."""
        return cls(Path(audit_path).expanduser().resolve().parent / LEDGER_FILE)

    # -- budgets ----------------------------------------------------------------------------
    def declare(self, name: str, epsilon: float, delta: float) -> Budget:
        """Set the total budget of ``name`` (kept if it exists: spending continues)."""
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO budgets (name, epsilon, delta, created, updated) VALUES "
                "(?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET epsilon=excluded.epsilon, "
                "delta=excluded.delta, updated=excluded.updated",
                (name, float(epsilon), float(delta), now, now))
            return self._budget(conn, name)

    def budget(self, name: str) -> Budget:
        with self._transaction() as conn:
            return self._budget(conn, name)

    def names(self) -> list[str]:
        with self._transaction() as conn:
            return [r[0] for r in conn.execute("SELECT name FROM budgets ORDER BY name")]

    def charges(self, name: str) -> list[Charge]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT name, charge_id, epsilon, delta, unbounded, status, what, ts FROM "
                "charges WHERE name = ? ORDER BY id", (name,)).fetchall()
        return [Charge(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7]) for r in rows]

    # -- charging ---------------------------------------------------------------------------
    def reserve(self, name: str, epsilon: float, delta: float, charge_id: str,
                what: str = "") -> Budget:
        """Set ``(epsilon, delta)`` aside for ``charge_id``; raises
        ``PrivacyBudgetExceeded`` (reserving nothing) if it does not fit. Returns the
        budget with the reservation counted."""
        if not (math.isfinite(epsilon) and epsilon >= 0 and math.isfinite(delta)
                and 0 <= delta < 1):
            raise ValueError(f"a charge needs finite epsilon >= 0 and delta in [0, 1), got "
                             f"({epsilon!r}, {delta!r})")
        with self._transaction() as conn:
            budget = self._budget(conn, name)
            if not budget.allows(epsilon, delta):
                raise PrivacyBudgetExceeded(name, epsilon, delta, budget.epsilon_left,
                                            budget.delta_left, unbounded=budget.unbounded)
            conn.execute(
                "INSERT INTO charges (name, charge_id, epsilon, delta, status, what, ts, pid)"
                " VALUES (?, ?, ?, ?, 'reserved', ?, ?, ?)",
                (name, charge_id, float(epsilon), float(delta), what, time.time(),
                 os.getpid()))
            return self._budget(conn, name)

    def commit(self, charge_id: str, *, epsilon: float | None = None,
               delta: float | None = None) -> Budget:
        """The reserved charge was released to the researcher: it is spent. ``epsilon`` and
        ``delta`` may lower it to what was actually spent (never raise it)."""
        with self._transaction() as conn:
            row = conn.execute("SELECT name, epsilon, delta, status FROM charges WHERE "
                               "charge_id = ?", (charge_id,)).fetchone()
            if row is None or row[3] != "reserved":
                raise KeyError(f"no reserved charge {charge_id!r}")
            name, reserved_epsilon, reserved_delta, _ = row
            spent_epsilon = reserved_epsilon if epsilon is None else min(epsilon,
                                                                         reserved_epsilon)
            spent_delta = reserved_delta if delta is None else min(delta, reserved_delta)
            conn.execute("UPDATE charges SET status='spent', epsilon=?, delta=? WHERE "
                         "charge_id = ?", (spent_epsilon, spent_delta, charge_id))
            return self._budget(conn, name)

    def release(self, charge_id: str) -> Budget | None:
        """Nothing left for this reservation: give it back. Unknown or decided: None."""
        with self._transaction() as conn:
            row = conn.execute("SELECT name FROM charges WHERE charge_id = ? AND "
                               "status = 'reserved'", (charge_id,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE charges SET status='released' WHERE charge_id = ?",
                         (charge_id,))
            return self._budget(conn, row[0])

    def record_unbounded(self, name: str, charge_id: str, what: str = "") -> Budget:
        """An exact value of DP-protected ``name`` was released: unbounded privacy loss."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO charges (name, charge_id, epsilon, delta, unbounded, status, what,"
                " ts, pid) VALUES (?, ?, 0, 0, 1, 'spent', ?, ?, ?)",
                (name, charge_id, what, time.time(), os.getpid()))
            return self._budget(conn, name)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- internals --------------------------------------------------------------------------
    def _budget(self, conn: sqlite3.Connection, name: str) -> Budget:
        total = conn.execute("SELECT epsilon, delta FROM budgets WHERE name = ?",
                             (name,)).fetchone()
        if total is None:
            raise KeyError(f"no privacy budget for {name!r}: share it with dp=duet.DP(...)")
        spent = conn.execute(
            "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0), "
            "COALESCE(MAX(unbounded), 0), COALESCE(SUM(status = 'reserved'), 0) FROM charges "
            "WHERE name = ? AND status IN ('reserved', 'spent')", (name,)).fetchone()
        return Budget(name, total[0], total[1], float(spent[0]), float(spent[1]),
                      int(spent[3]), bool(spent[2]))

    def _transaction(self) -> _Transaction:
        return _Transaction(self)


class _Transaction:
    """``with ledger._transaction() as conn``: one IMMEDIATE transaction under the lock."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def __enter__(self) -> sqlite3.Connection:
        self._ledger._lock.acquire()
        conn = self._ledger._conn
        if conn is None:
            self._ledger._lock.release()
            raise RuntimeError(f"the ledger {self._ledger.path} is closed")
        conn.execute("BEGIN IMMEDIATE")
        return conn

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        conn = self._ledger._conn
        try:
            if conn is not None:
                conn.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self._ledger._lock.release()
