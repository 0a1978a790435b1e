"""Disclosure checks: would releasing this value reveal individual records?

Evaluated in the worker, where the data is, when a request is frozen: from the value's
provenance (``duet.provenance``: which records of which shared objects contributed, and how)
and the frozen value's size. Each check says ``pass``, ``fail`` or ``review`` with a
one-line reason and JSON evidence for the owner; ``review`` means the check cannot decide
(the provenance is unknown, or the kind of value is not one any rule can clear). The
request's ``check_status`` is the worst of them: ``fail`` > ``review`` > ``pass``.

The defaults follow ACRO (the output checker of the SACRO project): a minimum of 10
records per released number, the N-K dominance rule with N=2 at 90 % and the p-ratio rule
at 10 %, and DataSHIELD's model rule (parameters at most a third of the training records).
docs/disclosure.md explains each in plain words and what they do not catch.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .provenance import Aggregated, Declared, Part, Provenance, Rows, Unknown, state_of

__all__ = [
    "STATUSES",
    "Check",
    "CheckSettings",
    "History",
    "Status",
    "dp_release",
    "evaluate",
    "failed_value",
    "worst",
]

Status = Literal["pass", "fail", "review"]
STATUSES: tuple[Status, ...] = ("pass", "review", "fail")  # best to worst
MAX_LISTED = 20  # cells or requests named in one check's evidence
MAX_EVIDENCE_CHARS = 4_000


@dataclass(frozen=True)
class Check:
    """One disclosure check on one request's value."""

    name: str
    status: Status
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason,
                "evidence": dict(self.evidence)}

    def __str__(self) -> str:
        return f"{self.status.upper():6} {self.name}: {self.reason}"


def worst(checks: Iterable[Check]) -> Status:
    """The request's status: the worst check; ``review`` when there is none to decide."""
    statuses = [c.status for c in checks]
    if not statuses:
        return "review"
    return max(statuses, key=STATUSES.index)


@dataclass(frozen=True)
class CheckSettings:
    """Thresholds for one shared object (``s.share(..., min_count=...)``)."""

    min_count: int = 10
    zeros_disclosive: bool = True
    nk_n: int = 2
    nk_k: float = 0.9
    p_ratio: float = 0.1
    dof_ratio: float = 0.33
    rows_declared: bool = True  # the owner listed the row count (declare_rows=)

    def __post_init__(self) -> None:
        if not isinstance(self.min_count, int) or isinstance(self.min_count, bool) \
                or self.min_count < 1:
            raise ValueError("min_count must be a positive integer")


DEFAULT_SETTINGS = CheckSettings()


class History:
    """Record sets of earlier requests, per source, to catch differencing: two summaries
    over sets of records that differ by a few records reveal those records together.

    Each set is kept as a packed bit mask over the source's records (one bit per record),
    the newest first, at most ``limit`` sets and ``max_bytes`` per source. Kept in the worker
    for the worker's lifetime; a restarted worker starts empty (docs/disclosure.md)."""

    def __init__(self, limit: int = 200, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._sets: dict[str, deque[tuple[str, bytes, int]]] = {}
        self.limit = limit
        self.max_bytes = max_bytes

    def earlier(self, source: str) -> list[tuple[str, bytes, int]]:
        return list(self._sets.get(source, ()))

    def add(self, request_id: str, source: str, mask: bytes, total: int) -> None:
        room = max(1, min(self.limit, self.max_bytes // max(len(mask), 1)))
        sets = self._sets.setdefault(source, deque(maxlen=room))
        if any(known == mask for _, known, _ in sets):
            return
        if sets.maxlen != room:
            sets = self._sets[source] = deque(sets, maxlen=room)
        sets.appendleft((request_id, mask, total))


def packed(rows: np.ndarray | None, total: int) -> bytes:
    """A set of records as a bit mask over all ``total`` records."""
    mask = np.ones(total, dtype=bool) if rows is None else np.zeros(total, dtype=bool)
    if rows is not None:
        mask[rows] = True
    return np.packbits(mask).tobytes()


_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _difference(a: bytes, b: bytes) -> int:
    """How many records are in one set and not the other."""
    xor = np.bitwise_xor(np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8))
    return int(_BITS[xor].sum())


def dp_release(statistic: str, epsilon: float, delta: float) -> list[Check]:
    """A differentially private release: the noise, not output checking, bounds what it
    reveals about any one record; its cost is in the owner's budget ledger."""
    return [Check("differential_privacy", "pass",
                  f"a differentially private {statistic} (epsilon {epsilon:.3g}): its noise "
                  "bounds what it reveals about any one record",
                  {"statistic": statistic, "epsilon": epsilon, "delta": delta})]


def failed_value() -> list[Check]:
    """Checks for a value whose computation failed: whether and why is itself data."""
    return [Check("failure", "review", "computing the value failed; whether it fails, and "
                  "why, can depend on the data", {})]


def evaluate(request_id: str, provenance: Provenance, sources: Iterable[str], *,
             elements: int, settings: Mapping[str, CheckSettings] | None = None,
             history: History | None = None) -> list[Check]:
    """The checks for a value with ``provenance`` derived from ``sources`` (the complete
    list: a source missing from the provenance is unknown). Never raises: checks that
    cannot run leave the request for the owner to review."""
    try:
        return _evaluate(request_id, provenance, sources, elements, settings or {}, history)
    except Exception as exc:  # noqa: BLE001 - a bug here must not cost the request
        return [Check("checks", "review", f"the checks could not run ({type(exc).__name__})",
                      {})]


def _evaluate(request_id: str, provenance: Provenance, sources: Iterable[str], elements: int,
              settings: Mapping[str, CheckSettings], history: History | None) -> list[Check]:
    names = sorted(set(sources) | set(provenance))
    if not names:
        return [Check("provenance", "pass", "derives from no shared data", {"sources": []})]
    states = {name: state_of(provenance, name) for name in names}
    checks: list[Check] = [_provenance_check(states)]
    rows = {n: s for n, s in states.items() if isinstance(s, Rows)}
    if rows:
        checks.append(_record_level(rows))
    hidden = [n for n, s in states.items() if isinstance(s, Declared) and s.what == "rows"
              and not settings.get(n, DEFAULT_SETTINGS).rows_declared]
    if hidden:
        checks.append(Check("row_count", "review",
                            f"reveals how many records {hidden[0]!r} has, which the owner did "
                            "not declare", {"sources": hidden}))
    parts = [(name, part) for name, state in states.items() if isinstance(state, Aggregated)
             for part in state.parts]
    if parts:
        def setting(name: str) -> CheckSettings:
            return settings.get(name, DEFAULT_SETTINGS)
        checks.append(_min_count(parts, setting))
        magnitude = [(n, p) for n, p in parts if p.kind == "magnitude"]
        if magnitude:
            checks.append(_dominance(magnitude, setting))
        order = [(n, p) for n, p in parts if p.kind in ("order", "statistic")]
        if order:
            checks.append(_not_cleared(order))
        models = [(n, p) for n, p in parts if p.kind == "model"]
        if models:
            checks.append(_degrees_of_freedom(models, elements, setting))
        if history is not None:
            checks.append(_differencing(request_id, parts, setting, history))
    return [_bounded(c) for c in checks]


# -- the checks -------------------------------------------------------------------------------
def _provenance_check(states: Mapping[str, Any]) -> Check:
    unknown = {n: s.why for n, s in states.items() if isinstance(s, Unknown)}
    described = {n: _describe(s) for n, s in states.items()}
    if unknown:
        name, why = next(iter(unknown.items()))
        return Check("provenance", "review",
                     f"which records of {name!r} it reveals is unknown: {why}",
                     {"sources": described, "unknown": unknown})
    return Check("provenance", "pass", "every shared source's contributing records are known",
                 {"sources": described})


def _describe(state: Any) -> dict[str, Any]:
    if isinstance(state, Rows):
        return {"state": "record-level", "records": state.length, "of": state.total}
    if isinstance(state, Aggregated):
        return {"state": "summary", "parts": [
            {"kind": p.kind, "of": p.note, "records": p.n, "total": p.total}
            for p in state.parts[:MAX_LISTED]]}
    if isinstance(state, Declared):
        return {"state": "declared metadata"}
    return {"state": "unknown", "why": state.why}


def _record_level(rows: Mapping[str, Rows]) -> Check:
    name, state = next(iter(rows.items()))
    records = 1 if state.single else state.length
    what = "one record's values" if state.single else (
        f"{records} value row(s) that map one-to-one to records")
    return Check("record_level", "fail", f"releases {what} of {name!r}, whatever the size",
                 {name: {"records": records, "of": s.total, "single": s.single}
                  for name, s in rows.items()})


def _min_count(parts: list[tuple[str, Part]], setting: Any) -> Check:
    problems: list[dict[str, Any]] = []
    smallest: int | None = None
    for name, part in parts:
        limit = setting(name).min_count
        records = part.n
        if "n" in part.cells and part.cells["n"].size:  # records that are not NaN, per cell
            records = min(records, int(part.cells["n"].min()))
        if "nonzero" in part.cells and part.cells["nonzero"].size and not (
                "indicator" in part.cells and part.cells["indicator"].all()):
            # a total over 200 records of which 3 are not zero is a total of 3
            records = min(records, int(part.cells["nonzero"].min()))
        smallest = records if smallest is None else min(smallest, records)
        if records < limit:
            problems.append({"source": name, "of": part.note, "records": records,
                             "threshold": limit})
            continue
        counts = _cell_counts(part)
        if counts is None:
            continue
        cells, harmless = counts
        flat = cells.reshape(-1)
        small = (flat > 0) & (flat < limit)
        zero = (flat == 0) & ~harmless.reshape(-1) if setting(name).zeros_disclosive else (
            np.zeros(flat.shape, dtype=bool))
        if small.any() or zero.any():
            smallest = min(smallest, int(flat.min()))
            problems.append({"source": name, "of": part.note, "threshold": limit,
                             "cells": int(flat.size), "below_threshold": int(small.sum()),
                             "zero": int(zero.sum()),
                             "first_cells": [int(i) for i in
                                             np.flatnonzero(small | zero)[:MAX_LISTED]],
                             "smallest": int(flat.min())})
    if problems:
        first = problems[0]
        if "records" in first:
            reason = (f"only {first['records']} record(s) of {first['source']!r} contributed; "
                      f"the minimum is {first['threshold']}")
        else:
            reason = (f"{first['below_threshold']} count(s) below {first['threshold']} and "
                      f"{first['zero']} zero count(s) in {first['of'] or 'a table'} of "
                      f"{first['source']!r}")
        return Check("min_count", "fail", reason, {"problems": problems[:MAX_LISTED],
                                                   "smallest": smallest})
    threshold = min(setting(n).min_count for n, _ in parts)
    return Check("min_count", "pass", f"every number comes from at least {threshold} records",
                 {"smallest": smallest, "threshold": threshold})


def _cell_counts(part: Part) -> tuple[np.ndarray, np.ndarray] | None:
    """The counts that must each reach the threshold, and which zeros are harmless."""
    if part.kind in ("frequency", "table") and "counts" in part.cells:
        counts = part.cells["counts"]
        return counts, np.zeros(counts.shape, dtype=bool)
    if part.kind == "magnitude" and "counts" in part.cells:
        two_valued = part.cells["two_valued"]
        if not two_valued.any():
            return None
        counts = part.cells["counts"][:, two_valued]
        indicator = part.cells["indicator"][two_valued]
        # a constant (single-valued) sum reveals no count when it is not an indicator
        harmless = np.zeros_like(counts, dtype=bool)
        harmless[1] = ~indicator & (counts[1] == 0)
        return counts, harmless
    return None


def _dominance(parts: list[tuple[str, Part]], setting: Any) -> Check:
    problems: list[dict[str, Any]] = []
    missing = []
    for name, part in parts:
        cells = part.cells
        if "top1" not in cells and "two_valued" in cells and cells["two_valued"].all():
            continue  # booleans: a count, checked as one by min_count
        if "top1" not in cells:
            missing.append(name)
            continue
        config = setting(name)
        total, top1, top2 = cells["total"], cells["top1"], cells["top2"]
        positive = total > 0
        share = np.where(positive, (top1 + top2) / np.where(positive, total, 1), 0.0)
        nk = positive & (share >= config.nk_k)
        remainder = total - top1 - top2
        p_ratio = positive & (remainder < config.p_ratio * top1)
        if nk.any() or p_ratio.any():
            problems.append({"source": name, "of": part.note, "cells": int(total.size),
                             "nk_rule": int(nk.sum()), "p_ratio": int(p_ratio.sum()),
                             "largest_share": round(float(share.max()), 4),
                             "first_cells": [int(i) for i in
                                             np.flatnonzero(nk | p_ratio)[:MAX_LISTED]]})
    if problems:
        first = problems[0]
        config = setting(first["source"])
        return Check("dominance", "fail",
                     f"the largest {config.nk_n} records make up "
                     f"{first['largest_share']:.0%} of a total of {first['source']!r} "
                     f"(N-K rule: {config.nk_k:.0%}; p-ratio: {config.p_ratio:.0%})",
                     {"problems": problems})
    if missing:
        return Check("dominance", "review",
                     f"the contributions to a total of {missing[0]!r} could not be measured",
                     {"unmeasured": missing})
    return Check("dominance", "pass", "no total is dominated by one or two records",
                 {"cells": int(sum(p.cells["total"].size for _, p in parts
                                   if "total" in p.cells))})


def _not_cleared(parts: list[tuple[str, Part]]) -> Check:
    name, part = parts[0]
    if part.kind == "order":
        reason = (f"{part.note or 'an order statistic'} of {name!r} is one record's own value "
                  "(or places it); the owner decides")
    else:
        reason = (f"{part.note or 'a statistic'} of {name!r} is not a sum, count, table or "
                  "model: no automatic rule clears it")
    return Check("summary_kind", "review", reason,
                 {"parts": [{"source": n, "kind": p.kind, "of": p.note, "records": p.n}
                            for n, p in parts[:MAX_LISTED]]})


def _degrees_of_freedom(parts: list[tuple[str, Part]], elements: int, setting: Any) -> Check:
    worst_ratio = 0.0
    found: list[dict[str, Any]] = []
    for name, part in parts:
        ratio = elements / part.n if part.n else float("inf")
        limit = setting(name).dof_ratio
        found.append({"source": name, "parameters": elements, "records": part.n,
                      "limit": limit})
        if ratio > limit:
            return Check("degrees_of_freedom", "fail",
                         f"{elements} parameters from {part.n} training records of {name!r}: "
                         f"more than {limit:g} per record", {"models": found})
        worst_ratio = max(worst_ratio, ratio)
    return Check("degrees_of_freedom", "pass",
                 f"at most {worst_ratio:.3g} parameters per training record", {"models": found})


def _differencing(request_id: str, parts: list[tuple[str, Part]], setting: Any,
                  history: History) -> Check:
    """A summary over records that differ by fewer than the minimum from another summary
    (in this request or an earlier one) reveals the records in between."""
    close: list[dict[str, Any]] = []
    own = [(name, packed(part.rows, part.total), part.total) for name, part in parts
           if part.kind != "model"]
    compared = 0
    for index, (name, mask, total) in enumerate(own):
        limit = setting(name).min_count
        candidates = [*history.earlier(name), *(
            (request_id, other, t) for j, (n, other, t) in enumerate(own)
            if n == name and j != index)]
        nearest: tuple[int, str] | None = None
        for other_id, other, other_total in candidates:
            if other_total != total or len(other) != len(mask):
                continue
            compared += 1
            differ = _difference(mask, other)
            if 0 < differ < limit and (nearest is None or differ < nearest[0]):
                nearest = (differ, other_id)
        if nearest is not None:
            close.append({"source": name, "request": nearest[1], "differ_by": nearest[0],
                          "threshold": limit})
    for name, mask, total in own:
        history.add(request_id, name, mask, total)
    if close:
        first = close[0]
        where = ("another part of this value" if first["request"] == request_id
                 else f"request {first['request']}")
        return Check("differencing", "review",
                     f"its records of {first['source']!r} differ from those of {where} by "
                     f"only {first['differ_by']}: together they could reveal those records",
                     {"overlaps": close[:MAX_LISTED]})
    return Check("differencing", "pass", "no earlier summary covers nearly the same records",
                 {"compared": compared})


def _bounded(check: Check) -> Check:
    """Evidence small enough for the snapshot and the audit log, plain JSON."""
    evidence = _clean(check.evidence, 0)
    if len(json.dumps(evidence)) > MAX_EVIDENCE_CHARS:
        evidence = {"truncated": True, "keys": sorted(evidence)[:MAX_LISTED]}
    return Check(check.name, check.status, check.reason[:300], evidence)


def _clean(value: Any, depth: int) -> Any:
    if depth > 6:
        return "…"
    if isinstance(value, Mapping):
        return {str(k): _clean(v, depth + 1) for k, v in list(value.items())[:MAX_LISTED * 2]}
    if isinstance(value, (list, tuple)):
        return [_clean(v, depth + 1) for v in value[:MAX_LISTED]]
    if isinstance(value, np.ndarray):
        return _clean(value.reshape(-1)[:MAX_LISTED].tolist(), depth + 1)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
