"""The wire form of pandas objects: column-wise numpy buffers, never pickle.

A DataFrame, Series or Index travels as a small *spec* (msgpack, in the message header) that
names each column's kind, plus the raw bytes of its numpy arrays out of band, exactly like
arrays (``duet.protocol``). Every kind of column pandas uses for tables has a form here:

    np        a numpy column (bool, ints, floats, complex, datetime64, timedelta64)
    str       strings: one UTF-8 buffer, int64 offsets and a missing-value mask
    obj       other object columns: a list of plain scalars (bounded by the header size)
    masked    pandas' nullable Int*/UInt*/Float*/boolean: values and mask
    cat       categoricals: integer codes and the categories (itself a column)
    tz        timezone-aware datetimes: int64 ticks, unit and the zone's name
    interval  intervals (``pd.cut``'s categories): left and right columns, closed side

Column labels and the index are encoded the same way (an Index is a column with a name;
``range`` and ``multi`` forms keep RangeIndex and MultiIndex). The index is data: it travels
only inside an approved value.

This module builds specs from pandas objects (``to_spec``) and pandas objects from specs
whose arrays were already rebuilt from their buffers (``from_spec``). It validates every
field it reads: a spec comes from the peer. Column-wise buffers rather than Arrow IPC: pandas
3 switches its default string dtype to Arrow when pyarrow is installed, which would change
the behaviour of every owner's code; the numpy form adds no dependency, and its round trip
is measured in ``bench/ops.py``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ProtocolError

__all__ = ["FrameRef", "from_spec", "is_pandas", "scalar", "to_spec"]

MAX_COLUMNS = 100_000
_TZ = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*")
_MASKED = {"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
           "Float32", "Float64", "boolean"}
_STRINGS = {"str", "string", "object"}
_UNITS = {"s", "ms", "us", "ns"}
_CLOSED = {"left", "right", "both", "neither"}
_LABEL_TYPES = (str, int, float, bool, type(None))


class FrameRef:
    """A decoded spec whose arrays are not attached yet; ``duet.protocol`` replaces it by the
    pandas object once its buffers are resolved."""

    __slots__ = ("spec",)

    def __init__(self, spec: Any) -> None:
        self.spec = spec


def is_pandas(value: Any) -> bool:
    """Whether ``value`` is a pandas DataFrame, Series or Index (pandas already imported)."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(value, (pd.DataFrame, pd.Series, pd.Index))


def scalar(value: Any) -> Any:
    """A pandas scalar as the plain or numpy value the wire carries: a Timestamp as a
    ``datetime64``, a Timedelta as a ``timedelta64``, missing values as None or NaT."""
    import pandas as pd

    if value is pd.NA:
        return None
    if value is pd.NaT:
        return np.datetime64("NaT")
    if isinstance(value, pd.Timestamp):
        return value.tz_convert("UTC").to_datetime64() if value.tz else value.to_datetime64()
    if isinstance(value, pd.Timedelta):
        return value.to_timedelta64()
    raise TypeError(f"cannot send a value of type {type(value).__name__}")


# -- pandas -> spec ----------------------------------------------------------------------------
def to_spec(value: Any) -> dict[str, Any]:
    """The spec of a DataFrame, Series or Index; numpy arrays stay in it as they are (the
    protocol's encoder sends them out of band). Raises TypeError for what has no wire form."""
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        return {"k": "frame", "cols": _index(value.columns), "index": _index(value.index),
                "data": [_column(value.iloc[:, i].array) for i in range(value.shape[1])]}
    if isinstance(value, pd.Series):
        return {"k": "series", "name": _label(value.name), "index": _index(value.index),
                "data": _column(value.array)}
    if isinstance(value, pd.Index):
        return _index(value)
    raise TypeError(f"cannot send a {type(value).__name__}")


def _index(index: Any) -> dict[str, Any]:
    import pandas as pd

    if isinstance(index, pd.RangeIndex):
        return {"k": "range", "start": int(index.start), "stop": int(index.stop),
                "step": int(index.step), "name": _label(index.name)}
    if isinstance(index, pd.MultiIndex):
        return {"k": "multi", "names": [_label(n) for n in index.names],
                "levels": [_column(index.get_level_values(i).array)
                           for i in range(index.nlevels)]}
    return {"k": "index", "name": _label(index.name), "data": _column(index.array)}


def _label(label: Any) -> Any:
    """A column or index name: a plain scalar or a tuple of them (pandas' own scalars are
    turned into their plain or numpy counterparts)."""
    if isinstance(label, tuple):
        return tuple(_label(v) for v in label)
    if isinstance(label, np.generic):
        return label.item() if label.dtype.kind in "biufc" else label
    if isinstance(label, _LABEL_TYPES):
        return label
    import pandas as pd

    if label is pd.NA or label is pd.NaT:
        return None
    if isinstance(label, (pd.Timestamp, pd.Timedelta)):
        return str(label)
    if isinstance(label, pd.Interval):
        return str(label)
    raise TypeError(f"cannot send a label of type {type(label).__name__}")


def _column(array: Any) -> dict[str, Any]:
    """One column (an ExtensionArray or numpy array) as a spec."""
    import pandas as pd

    dtype = array.dtype
    if isinstance(dtype, np.dtype):
        if dtype.kind == "O":
            return _objects(np.asarray(array, dtype=object), "object")
        return {"t": "np", "v": np.asarray(array)}
    if isinstance(dtype, pd.StringDtype):
        name = "str" if dtype.na_value is not pd.NA else "string"
        return _strings(np.asarray(array, dtype=object), name)
    if isinstance(dtype, pd.CategoricalDtype):
        return {"t": "cat", "codes": np.asarray(array.codes), "ordered": bool(dtype.ordered),
                "categories": _column(dtype.categories.array)}
    if isinstance(dtype, pd.DatetimeTZDtype):
        return {"t": "tz", "v": np.asarray(array.asi8), "unit": dtype.unit, "tz": str(dtype.tz)}
    if isinstance(dtype, pd.IntervalDtype):
        return {"t": "interval", "closed": array.closed, "left": _column(array.left.array),
                "right": _column(array.right.array)}
    if str(dtype) in _MASKED:
        return {"t": "masked", "dtype": str(dtype),
                "v": np.asarray(array.to_numpy(dtype=dtype.numpy_dtype, na_value=0)),
                "mask": np.asarray(array.isna())}
    if isinstance(array, pd.arrays.NumpyExtensionArray):
        return _column(np.asarray(array))
    raise TypeError(f"cannot send a column of dtype {dtype}")


def _strings(values: np.ndarray, dtype: str) -> dict[str, Any]:
    """Strings and missing values as one UTF-8 buffer, int64 offsets and a mask (joined in
    one piece: for ASCII text the byte lengths are the character lengths)."""
    import pandas as pd

    mask = np.asarray(pd.isna(values), dtype=bool)
    present = values[~mask]
    if not all(isinstance(v, str) for v in present):
        return _objects(values, dtype)
    joined = "".join(present)
    data = joined.encode()
    if len(data) == len(joined):
        lengths = np.fromiter(map(len, present), dtype=np.int64, count=len(present))
    else:
        lengths = np.fromiter((len(v.encode()) for v in present), dtype=np.int64,
                              count=len(present))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    sizes = np.zeros(len(values), dtype=np.int64)
    sizes[~mask] = lengths
    np.cumsum(sizes, out=offsets[1:])
    return {"t": "str", "dtype": dtype, "bytes": np.frombuffer(data, dtype=np.uint8),
            "offsets": offsets, "mask": mask}


def _objects(values: np.ndarray, dtype: str) -> dict[str, Any]:
    """An object column: strings if it holds only strings and missing values, else a list
    of plain scalars; anything else (Python objects, nested containers) is refused."""
    if all(isinstance(v, str) or _missing(v) for v in values):
        return _strings(values, dtype) if dtype in _STRINGS else _strings(values, "object")
    items = []
    for v in values:
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, np.dtype) or _is_dtype(v):
            v = str(v)  # dtypes (``df.dtypes``) travel as their names
        if _missing(v):
            v = v if isinstance(v, float) else None  # NaN stays NaN
        elif not isinstance(v, _LABEL_TYPES):
            raise TypeError(f"cannot send a column holding {type(v).__name__} objects")
        items.append(v)
    return {"t": "obj", "v": items}


def _is_dtype(value: Any) -> bool:
    import pandas as pd

    return isinstance(value, pd.api.extensions.ExtensionDtype)


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or value is pd.NA or value is pd.NaT or (
        isinstance(value, float) and value != value)


# -- spec -> pandas ----------------------------------------------------------------------------
def from_spec(spec: Any) -> Any:
    """Build the pandas object a (peer-supplied) spec describes; any defect raises
    ``ProtocolError``. Arrays in the spec are numpy arrays already (never object dtype)."""
    import pandas as pd

    kind = _field(spec, "k", str)
    if kind == "frame":
        columns = _build_index(_field(spec, "cols", dict))
        index = _build_index(_field(spec, "index", dict))
        data = _field(spec, "data", list)
        if len(data) != len(columns) or len(data) > MAX_COLUMNS:
            raise ProtocolError("a frame's columns do not match its labels")
        arrays = {i: _build_column(c, len(index)) for i, c in enumerate(data)}
        frame = pd.DataFrame(arrays, index=index, copy=False)
        frame.columns = columns
        return frame
    if kind == "series":
        index = _build_index(_field(spec, "index", dict))
        values = _build_column(_field(spec, "data", dict), len(index))
        return pd.Series(values, index=index, name=_check_label(spec.get("name")), copy=False)
    return _build_index(spec)


def _build_index(spec: Any) -> Any:
    import pandas as pd

    kind = _field(spec, "k", str)
    name = _check_label(spec.get("name"))
    if kind == "range":
        start, stop, step = (_field(spec, key, int) for key in ("start", "stop", "step"))
        if step == 0:
            raise ProtocolError("a range index with step 0")
        return pd.RangeIndex(start, stop, step, name=name)
    if kind == "multi":
        levels = _field(spec, "levels", list)
        names = _field(spec, "names", list)
        if not levels or len(levels) != len(names) or len(levels) > 64:
            raise ProtocolError("a malformed multi-index")
        arrays = [_build_column(level, None) for level in levels]
        if len({len(a) for a in arrays}) != 1:
            raise ProtocolError("multi-index levels of different lengths")
        return pd.MultiIndex.from_arrays(arrays, names=[_check_label(n) for n in names])
    if kind == "index":
        return pd.Index(_build_column(_field(spec, "data", dict), None), name=name, copy=False)
    raise ProtocolError(f"unknown pandas object kind {kind!r}")


def _build_column(spec: Any, length: int | None) -> Any:
    column = _COLUMN_BUILDERS.get(_field(spec, "t", str))
    if column is None:
        raise ProtocolError("unknown column kind")
    values = column(spec)
    if length is not None and len(values) != length:
        raise ProtocolError("a column's length does not match its index")
    return values


def _np_column(spec: dict[str, Any]) -> Any:
    return _array(spec, "v", None)


def _str_column(spec: dict[str, Any]) -> Any:
    import pandas as pd

    dtype = _field(spec, "dtype", str)
    if dtype not in _STRINGS:
        raise ProtocolError(f"unknown string dtype {dtype!r}")
    data = _array(spec, "bytes", "u1").tobytes()
    offsets = _array(spec, "offsets", "i8")
    mask = _array(spec, "mask", "b1")
    if (len(offsets) != len(mask) + 1 or (len(offsets) and offsets[0] != 0)
            or (len(offsets) and offsets[-1] != len(data)) or np.any(np.diff(offsets) < 0)):
        raise ProtocolError("malformed string offsets")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ProtocolError("a string column is not UTF-8") from None
    ends = offsets.tolist()
    if len(text) == len(data):  # ASCII: byte offsets are character offsets
        values: list[str | None] = [text[a:b] for a, b in zip(ends[:-1], ends[1:], strict=True)]
    else:
        values = [data[a:b].decode() for a, b in zip(ends[:-1], ends[1:], strict=True)]
    objects = np.array(values, dtype=object)
    objects[mask] = None
    if dtype == "object":
        return objects
    return pd.array(objects, dtype="str" if dtype == "str" else "string")


def _obj_column(spec: dict[str, Any]) -> Any:
    items = _field(spec, "v", list)
    if not all(isinstance(v, _LABEL_TYPES) for v in items):
        raise ProtocolError("an object column holds something other than plain scalars")
    values = np.empty(len(items), dtype=object)
    values[:] = items
    return values


def _masked_column(spec: dict[str, Any]) -> Any:
    import pandas as pd

    dtype = _field(spec, "dtype", str)
    if dtype not in _MASKED:
        raise ProtocolError(f"unknown nullable dtype {dtype!r}")
    values = _array(spec, "v", None)
    mask = _array(spec, "mask", "b1")
    if len(values) != len(mask):
        raise ProtocolError("a nullable column's mask does not match its values")
    expected = pd.api.types.pandas_dtype(dtype).numpy_dtype
    if values.dtype != expected:
        raise ProtocolError(f"a {dtype} column must carry {expected} values")
    result = pd.array(values, dtype=dtype)
    result[mask] = pd.NA
    return result


def _cat_column(spec: dict[str, Any]) -> Any:
    import pandas as pd

    codes = _array(spec, "codes", None)
    if codes.dtype.kind != "i":
        raise ProtocolError("categorical codes must be integers")
    categories = pd.Index(_build_column(_field(spec, "categories", dict), None))
    if len(codes) and (codes.min() < -1 or codes.max() >= len(categories)):
        raise ProtocolError("categorical codes out of range")
    if not categories.is_unique:
        raise ProtocolError("categories must be unique")
    return pd.Categorical.from_codes(codes, categories=categories,
                                     ordered=_field(spec, "ordered", bool))


def _tz_column(spec: dict[str, Any]) -> Any:
    import pandas as pd

    unit, tz = _field(spec, "unit", str), _field(spec, "tz", str)
    if unit not in _UNITS or len(tz) > 64 or ".." in tz or not _TZ.fullmatch(tz):
        raise ProtocolError("malformed timezone column")
    ticks = _array(spec, "v", "i8")
    try:
        dtype = pd.DatetimeTZDtype(unit=unit, tz=tz)
    except Exception:  # noqa: BLE001 - an unknown zone name, whatever the library raises
        raise ProtocolError(f"unknown timezone {tz!r}") from None
    naive = ticks.view(f"M8[{unit}]")
    return pd.array(pd.DatetimeIndex(naive).tz_localize("UTC").tz_convert(dtype.tz))


def _interval_column(spec: dict[str, Any]) -> Any:
    import pandas as pd

    closed = _field(spec, "closed", str)
    if closed not in _CLOSED:
        raise ProtocolError("malformed interval column")
    left = _build_column(_field(spec, "left", dict), None)
    right = _build_column(_field(spec, "right", dict), len(left))
    try:
        return pd.arrays.IntervalArray.from_arrays(left, right, closed=closed)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ProtocolError("malformed interval column") from None


_COLUMN_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "np": _np_column, "str": _str_column, "obj": _obj_column, "masked": _masked_column,
    "cat": _cat_column, "tz": _tz_column, "interval": _interval_column,
}


def _field(spec: Any, key: str, kind: type) -> Any:
    if not isinstance(spec, dict):
        raise ProtocolError("a malformed pandas spec")
    value = spec.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"a pandas spec's {key!r} is missing or malformed")
    return value


def _array(spec: dict[str, Any], key: str, dtype: str | None) -> np.ndarray:
    value = spec.get(key)
    if not isinstance(value, np.ndarray) or value.ndim != 1:
        raise ProtocolError(f"a pandas spec's {key!r} must be a one-dimensional array")
    if dtype is not None and value.dtype != np.dtype(dtype):
        raise ProtocolError(f"a pandas spec's {key!r} must be {np.dtype(dtype)}")
    return value


def _check_label(label: Any) -> Any:
    if isinstance(label, tuple):
        if len(label) > 64:
            raise ProtocolError("a label tuple is too long")
        return tuple(_check_label(v) for v in label)
    if isinstance(label, _LABEL_TYPES):
        return label
    if isinstance(label, np.ndarray) and label.ndim == 0:
        return label[()]
    raise ProtocolError("a label must be a plain scalar or a tuple of them")
