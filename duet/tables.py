"""Sharing a pandas DataFrame or Series: what is refused, what is declared, how it travels.

The owner's kernel checks the table (``check``: only column kinds the worker can hold without
running anything of the owner's, labels that are plain scalars), declares what the
researcher may see (``declare``: column names, dtypes and, unless the owner says otherwise,
the row count; never the index, which often holds patient ids), and splits it for the worker
(``split``): numeric columns go into the sealed, read-only memory arrays already use; the
other columns, the index and the labels are copied over (the kernel-to-worker direction is
trusted). The worker puts the table back together over that memory (``assemble``); pandas 3
copies on write, so no operation writes into it, and the mapping makes a write impossible.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from . import protocol as p

__all__ = ["assemble", "check", "declare", "is_pandas_object", "is_table", "split"]

_NUMERIC = "biufcmM"  # numpy kinds that go into sealed memory
_MASKED = {"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
           "Float32", "Float64", "boolean"}
_LABELS = (str, int, float, bool)
_SCAN = 10_000_000  # object values inspected for their types (all of them, up to this)


def is_table(obj: Any) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and type(obj) in (pd.DataFrame, pd.Series)


def is_pandas_object(obj: Any) -> bool:
    """Any pandas object, subclasses included (``check`` refuses all but the two kinds)."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(obj, (pd.DataFrame, pd.Series, pd.Index))


def check(obj: Any) -> None:
    """Refuse, with the reason, a table the worker cannot hold safely: subclasses (their
    code), object columns holding anything but strings, column kinds without a wire form,
    labels that are not plain scalars."""
    import pandas as pd

    if type(obj) not in (pd.DataFrame, pd.Series):
        raise TypeError(f"cannot share a {type(obj).__module__}.{type(obj).__name__}: share a "
                        "pandas DataFrame or Series (not a subclass)")
    if isinstance(obj, pd.DataFrame):
        if obj.columns.nlevels > 1:
            for level in range(obj.columns.nlevels):
                _check_labels(obj.columns.get_level_values(level), "column")
        else:
            _check_labels(obj.columns, "column")
        for i in range(obj.shape[1]):
            _check_values(obj.iloc[:, i], f"column {obj.columns[i]!r}")
    else:
        if obj.name is not None and not _plain_label(obj.name):
            raise TypeError("a shared Series needs a plain name (a string or number)")
        _check_values(obj, "the Series")
    index = obj.index
    for level in range(index.nlevels):
        values = index.get_level_values(level) if index.nlevels > 1 else index
        _check_values(pd.Series(values, copy=False), "the index")


def _plain_label(label: Any) -> bool:
    if isinstance(label, tuple):
        return all(isinstance(v, _LABELS) for v in label)
    return isinstance(label, _LABELS)


def _check_labels(labels: Any, what: str) -> None:
    for label in labels:
        if not _plain_label(label):
            raise TypeError(f"{what} label {label!r} is a {type(label).__name__}: labels must "
                            "be strings or numbers")


def _check_values(series: Any, what: str) -> None:
    import pandas as pd

    dtype = series.dtype
    if isinstance(dtype, np.dtype):
        if dtype.kind in _NUMERIC:
            return
        if dtype.kind == "O":
            for value in series.iloc[:_SCAN]:
                if not (isinstance(value, str) or value is None or value is pd.NA or (
                        isinstance(value, float) and value != value)):
                    raise TypeError(
                        f"{what} holds a {type(value).__name__}: object columns may hold only "
                        "strings and missing values (convert it first, e.g. .astype(str))")
            return
    if isinstance(dtype, pd.StringDtype) or str(dtype) in _MASKED:
        return
    if isinstance(dtype, pd.DatetimeTZDtype):
        return
    if isinstance(dtype, pd.CategoricalDtype):
        _check_values(pd.Series(dtype.categories, copy=False), f"{what}'s categories")
        return
    raise TypeError(f"{what} has dtype {dtype}, which duet cannot share; convert it to a "
                    "number, string, category, datetime or nullable column")


def declare(obj: Any, name: str, description: str, tags: tuple[str, ...],
            declare_rows: bool) -> p.StoreEntry:
    """What the researcher sees of a shared table: type, column names and dtypes, and the
    row count if ``declare_rows``. The index is never declared."""
    import pandas as pd

    rows = int(len(obj)) if declare_rows else None
    if isinstance(obj, pd.DataFrame):
        return p.StoreEntry(
            name=name, type="pandas.DataFrame", description=description, tags=list(tags),
            shape=None if rows is None else [rows, int(obj.shape[1])], rows=rows,
            columns=[_label_text(c) for c in obj.columns],
            dtypes=[str(t) for t in obj.dtypes])
    return p.StoreEntry(
        name=name, type="pandas.Series", description=description, tags=list(tags),
        shape=None if rows is None else [rows], rows=rows, dtype=str(obj.dtype),
        columns=None if obj.name is None else [_label_text(obj.name)],
        dtypes=[str(obj.dtype)])


def _label_text(label: Any) -> str:
    return " | ".join(map(str, label)) if isinstance(label, tuple) else str(label)


def split(obj: Any) -> tuple[list[tuple[int, np.ndarray]], dict[str, Any]]:
    """The table's numeric columns by position (for sealed memory), and everything else
    (for a trusted copy): the other columns, the index, the labels, the kind and name."""
    import pandas as pd

    columns = [obj.iloc[:, i] for i in range(obj.shape[1])] if isinstance(
        obj, pd.DataFrame) else [obj]
    numeric: list[tuple[int, np.ndarray]] = []
    rest: dict[int, Any] = {}
    for position, column in enumerate(columns):
        if isinstance(column.dtype, np.dtype) and column.dtype.kind in _NUMERIC:
            numeric.append((position, column.to_numpy(copy=False)))
        else:
            rest[position] = column.array
    return numeric, {
        "kind": "DataFrame" if isinstance(obj, pd.DataFrame) else "Series",
        "rest": rest, "index": obj.index, "count": len(columns),
        "labels": obj.columns if isinstance(obj, pd.DataFrame) else None,
        "name": obj.name if isinstance(obj, pd.Series) else None,
    }


def assemble(numeric: dict[int, np.ndarray], parts: dict[str, Any]) -> Any:
    """The table again, over the (read-only) arrays of its numeric columns: no copy."""
    import pandas as pd

    arrays = {i: numeric[i] if i in numeric else parts["rest"][i]
              for i in range(parts["count"])}
    if parts["kind"] == "Series":
        return pd.Series(arrays[0], index=parts["index"], name=parts["name"], copy=False)
    frame = pd.DataFrame(arrays, index=parts["index"], copy=False)
    frame.columns = parts["labels"]
    return frame
