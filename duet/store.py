"""The researcher's view of what the owner shared: names and declared metadata, as pointers."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

from tabulate import tabulate

from . import protocol as p
from .errors import DuetTimeout
from .pointers import Pointer, PointerHost

__all__ = ["Store"]


class Store(Mapping[str, Pointer]):
    """``r.store["ages"]`` is a Pointer to the owner's shared object; updates live."""

    def __init__(self, session: PointerHost) -> None:
        self._session = session
        self._entries: dict[str, p.StoreEntry] = {}
        self._changed = threading.Condition()

    def _update(self, entries: list[p.StoreEntry]) -> None:
        with self._changed:
            self._entries = {e.name: e for e in entries}
            self._changed.notify_all()

    def wait_for(self, name: str, timeout: float | None = None) -> Pointer:
        """Wait until the owner shares ``name`` (e.g. right after joining)."""
        with self._changed:
            if not self._changed.wait_for(lambda: name in self._entries, timeout):
                raise DuetTimeout(f"the owner has not shared {name!r} (waited {timeout} s)")
        return self[name]

    def __getitem__(self, name: str) -> Pointer:
        if name not in self._entries:
            shared = ", ".join(sorted(self._entries)) or "nothing yet"
            raise KeyError(f"the owner has not shared {name!r}; shared: {shared}")
        entry = self._entries[name]
        return Pointer(self._session, p.StoreRef(name), name, entry.family)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def info(self, name: str) -> p.StoreEntry:
        """What the owner declared about ``name``."""
        return self._entries[name]

    def _rows(self) -> list[list[str]]:
        return [[e.name, e.type, _shape(e), _dtype(e), e.description, ", ".join(e.tags)]
                for e in self._entries.values()]

    _HEADERS = ["name", "type", "shape", "dtype", "description", "tags"]

    def __repr__(self) -> str:
        if not self._entries:
            return "Store: the owner has shared nothing yet"
        return f"Store: {len(self)} shared objects\n" + tabulate(self._rows(), self._HEADERS)

    def _repr_html_(self) -> str:
        if not self._entries:
            return "<p><b>duet store</b>: the owner has shared nothing yet</p>"
        table = tabulate(self._rows(), self._HEADERS, tablefmt="html", disable_numparse=True)
        return f"<p><b>duet store</b>: {len(self)} shared objects</p>{table}"


_COLUMNS_SHOWN = 8
# Declared types whose allowlisted members the researcher's side checks before sending.

def _shape(entry: p.StoreEntry) -> str:
    """A table's declared size (rows may be hidden: "?"), else the declared shape."""
    if entry.columns is not None and entry.type == "pandas.DataFrame":
        rows = "?" if entry.rows is None else str(entry.rows)
        return f"{rows} rows x {len(entry.columns)} columns"
    if entry.type == "pandas.Series":
        return f"{'?' if entry.rows is None else entry.rows} rows"
    return "" if entry.shape is None else str(tuple(entry.shape))


def _dtype(entry: p.StoreEntry) -> str:
    """A table's columns with their dtypes (the first few), else the declared dtype."""
    if entry.columns is None or entry.dtypes is None or entry.type != "pandas.DataFrame":
        return entry.dtype or ""
    shown = [f"{c}: {t}" for c, t in zip(entry.columns, entry.dtypes, strict=False)]
    more = len(shown) - _COLUMNS_SHOWN
    return ", ".join(shown[:_COLUMNS_SHOWN]) + (f", … (+{more})" if more > 0 else "")
