"""Pointers: the researcher's handles on objects that live, and stay, on the owner's machine.

Every operation on a ``Pointer`` (Python operators, indexing, allowlisted methods and
attributes, ``r.np.*`` / ``r.torch.*`` functions) returns a new ``Pointer`` at once and is
queued for the owner; queued operations are sent in batches and run there in order, so a
loop of 10,000 ``x + 1`` costs no round trip per step. A value comes back only through
``request``/``get``, which the owner must approve.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import sys
from collections.abc import Iterator
from typing import Any, NoReturn, Protocol

import numpy as np

from . import dtypes, lineage
from . import protocol as p
from .errors import DuetError, PolicyViolation, RequestDenied, RequestTimeout

__all__ = ["DPNamespace", "DPTraining", "Pointer", "PointerHost", "RemoteFunction",
           "RemoteModule", "RemoteNamespace", "RequestHandle", "no_value"]


class PointerHost(Protocol):
    """What a pointer needs from the researcher's session, and nothing more."""

    allowlist: p.AllowlistSummary

    def new_id(self) -> int: ...
    def submit_op(self, op: p.Op) -> None: ...
    def free(self, pointer_id: int) -> None: ...
    def check(self, pointer_id: int) -> None: ...
    def request(self, target: p.PointerRef | p.StoreRef, reason: str,
                lineage: str) -> RequestHandle: ...
    def withdraw(self, request_id: str) -> None: ...


class RequestHandle:
    """A pending request for a value; ``result()`` waits for the owner's decision."""

    def __init__(self, host: PointerHost, request_id: str, lineage: str,
                 future: concurrent.futures.Future[Any]) -> None:
        self.id = request_id
        self.lineage = lineage
        self._host = host
        self._future = future

    @property
    def done(self) -> bool:
        return self._future.done()

    @property
    def status(self) -> str:
        if not self._future.done():
            return "pending"
        exc = self._future.exception()
        if exc is None:
            return "approved"
        return "denied" if isinstance(exc, RequestDenied) else "error"

    def result(self, timeout: float | None = None) -> Any:
        """The approved value; raises RequestDenied, RequestTimeout, ConnectionLost,
        RemoteError (computing it failed, and the owner approved saying so) or
        WorkerRestarted."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RequestTimeout(
                f"no decision on request {self.id} within {timeout} s; it stays pending "
                "(call .result() again, or .withdraw())") from None
        except DuetError as exc:
            # A denial is an answer, not a crash: show it without the thread machinery's
            # frames, so a notebook prints a short traceback ending in the user's own call.
            raise exc.with_traceback(None) from None

    def withdraw(self) -> None:
        if not self._future.done():
            self._host.withdraw(self.id)

    def __repr__(self) -> str:
        return f"<RequestHandle {self.id} {self.status}: {self.lineage}>"

def no_value(what: str) -> NoReturn:
    raise TypeError(
        f"{what} needs the value of a Pointer, which lives on the owner's machine. "
        "Compute remotely (r.np.*, r.torch.*, operators), then ask for the result with "
        "ptr.get(reason) once you need it."
    )


class Pointer:
    """A reference to an object on the owner's side."""

    __slots__ = ("__weakref__", "_family", "_lineage", "_ref", "_session")
    __array_ufunc__ = None  # numpy defers to our reflected operators: array + ptr works

    def __init__(self, session: PointerHost, ref: p.PointerRef | p.StoreRef | None,
                 lineage: str, family: str | None = None) -> None:
        self._session = session
        self._ref = ref
        self._lineage = lineage
        # the type family the owner declared (shared tables): its members are known here
        self._family = family

    # -- identity ---------------------------------------------------------------------------
    @property
    def id(self) -> int | str:
        ref = self._resolve()
        return ref.id if isinstance(ref, p.PointerRef) else ref.name

    @property
    def lineage(self) -> str:
        """How this object was computed from shared objects (as the researcher wrote it)."""
        return self._lineage

    def _resolve(self) -> p.PointerRef | p.StoreRef:
        if self._ref is None:
            raise DuetError(f"{self._lineage} was deleted: its object on the owner is gone")
        return self._ref

    def _check(self) -> p.PointerRef | p.StoreRef:
        """The reference to send, raising if the owner reported that this object failed."""
        ref = self._resolve()
        if isinstance(ref, p.PointerRef):
            self._session.check(ref.id)
        return ref

    # -- requests ---------------------------------------------------------------------------
    def request(self, reason: str = "") -> RequestHandle:
        """Ask the owner for this value; returns at once with a handle to wait on."""
        return self._session.request(self._check(), reason, self._lineage)

    def get(self, reason: str = "", timeout: float | None = None) -> Any:
        """Ask the owner for this value and wait for the decision.

        Returns the value if approved; raises ``RequestDenied`` with the owner's reason,
        ``RequestTimeout`` after ``timeout`` seconds (the request stays pending), or
        ``RemoteError`` if computing it failed on the owner's side.
        """
        return self.request(reason).result(timeout)

    def delete(self) -> None:
        """Free the owner's object now rather than when this Pointer is garbage collected."""
        ref = self._ref
        if isinstance(ref, p.PointerRef):
            self._ref = None
            self._session.free(ref.id)

    def __del__(self) -> None:
        ref = getattr(self, "_ref", None)
        if isinstance(ref, p.PointerRef):
            self._session.free(ref.id)

    # -- building operations -------------------------------------------------------------
    def _op(self, kind: str, name: str, target: Pointer | None, args: tuple[Any, ...],
            kwargs: dict[str, Any], text: str) -> Pointer:
        return _submit(self._session, kind, name, target, args, kwargs, text)

    def _binary(self, name: str, left: Any, right: Any) -> Pointer:
        return self._function(f"operator.{name}", left, right)

    def _function(self, qualname: str, *args: Any) -> Pointer:
        text = lineage.function(qualname, [_show(a) for a in args])
        return self._op("function", qualname, None, args, {}, text)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        members = self._session.allowlist.members
        families = [f for f, names in members.items() if name in names]
        own = members.get(self._family or "")
        if own is not None and name not in own:
            close = difflib.get_close_matches(name, own, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise PolicyViolation(f"{self._family}.{name} is not on the owner's allowlist."
                                  f"{hint}")
        if members and not families:
            every = sorted({n for names in members.values() for n in names})
            close = difflib.get_close_matches(name, every, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise PolicyViolation(f"'.{name}' is not on the owner's allowlist.{hint}")
        return _Member(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Pointer.__slots__:
            object.__setattr__(self, name, value)
        else:
            raise TypeError("cannot assign attributes of a remote object")

    def __call__(self, *args: Any, **kwargs: Any) -> Pointer:
        text = lineage.call(self._lineage, _show_args(args, kwargs))
        return self._op("call", "__call__", self, args, kwargs, text)

    # -- operators ------------------------------------------------------------------------
    def __add__(self, other: Any) -> Pointer: return self._binary("add", self, other)
    def __radd__(self, other: Any) -> Pointer: return self._binary("add", other, self)
    def __sub__(self, other: Any) -> Pointer: return self._binary("sub", self, other)
    def __rsub__(self, other: Any) -> Pointer: return self._binary("sub", other, self)
    def __mul__(self, other: Any) -> Pointer: return self._binary("mul", self, other)
    def __rmul__(self, other: Any) -> Pointer: return self._binary("mul", other, self)
    def __truediv__(self, other: Any) -> Pointer: return self._binary("truediv", self, other)
    def __rtruediv__(self, other: Any) -> Pointer: return self._binary("truediv", other, self)
    def __floordiv__(self, other: Any) -> Pointer: return self._binary("floordiv", self, other)
    def __rfloordiv__(self, other: Any) -> Pointer: return self._binary("floordiv", other, self)
    def __mod__(self, other: Any) -> Pointer: return self._binary("mod", self, other)
    def __rmod__(self, other: Any) -> Pointer: return self._binary("mod", other, self)
    def __pow__(self, other: Any) -> Pointer: return self._binary("pow", self, other)
    def __rpow__(self, other: Any) -> Pointer: return self._binary("pow", other, self)
    def __matmul__(self, other: Any) -> Pointer: return self._binary("matmul", self, other)
    def __rmatmul__(self, other: Any) -> Pointer: return self._binary("matmul", other, self)
    def __and__(self, other: Any) -> Pointer: return self._binary("and_", self, other)
    def __rand__(self, other: Any) -> Pointer: return self._binary("and_", other, self)
    def __or__(self, other: Any) -> Pointer: return self._binary("or_", self, other)
    def __ror__(self, other: Any) -> Pointer: return self._binary("or_", other, self)
    def __xor__(self, other: Any) -> Pointer: return self._binary("xor", self, other)
    def __rxor__(self, other: Any) -> Pointer: return self._binary("xor", other, self)
    def __lt__(self, other: Any) -> Pointer: return self._binary("lt", self, other)
    def __le__(self, other: Any) -> Pointer: return self._binary("le", self, other)
    def __gt__(self, other: Any) -> Pointer: return self._binary("gt", self, other)
    def __ge__(self, other: Any) -> Pointer: return self._binary("ge", self, other)
    def __eq__(self, other: object) -> Pointer: return self._binary("eq", self, other)  # type: ignore[override]
    def __ne__(self, other: object) -> Pointer: return self._binary("ne", self, other)  # type: ignore[override]
    def __hash__(self) -> int: return id(self)

    def __neg__(self) -> Pointer: return self._unary("neg", "-")
    def __pos__(self) -> Pointer: return self._unary("pos", "+")
    def __abs__(self) -> Pointer: return self._function("operator.abs", self)
    def __invert__(self) -> Pointer: return self._unary("invert", "~")

    def _unary(self, name: str, symbol: str) -> Pointer:
        return self._function(f"operator.{name}", self)

    def __getitem__(self, key: Any) -> Pointer:
        subscript = isinstance(key, tuple) and len(key) > 0
        text = lineage.function("operator.getitem", [self._lineage, _show(key)],
                                subscript=subscript)
        return self._op("function", "operator.getitem", None, (self, key), {}, text)

    # -- what needs a value here -------------------------------------------------------
    def __bool__(self) -> bool: no_value("truth testing (if/while/and/or)")
    def __len__(self) -> int: no_value("len()")
    def __iter__(self) -> Iterator[Any]: no_value("iterating")
    def __index__(self) -> int: no_value("using a Pointer as an index")
    def __int__(self) -> int: no_value("int()")
    def __float__(self) -> float: no_value("float()")
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        no_value("a local numpy function (use r.np.* for the remote one)")
    def __reduce__(self) -> Any:
        raise TypeError("a Pointer cannot be pickled or copied: it refers to the owner's object")
    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("remote objects are not modified in place; compute a new one, "
                        "e.g. r.np.where(mask, value, x)")

    def __repr__(self) -> str:
        ref = self._ref
        where = f"#{ref.id}" if isinstance(ref, p.PointerRef) else (
            f"store[{ref.name!r}]" if isinstance(ref, p.StoreRef) else "(pending)")
        return f"<Pointer {where}: {self._lineage}>"

    def _repr_html_(self) -> str:
        import html

        return f"<code>{html.escape(repr(self))}</code>"


class _Member(Pointer):
    """``ptr.name``: a method if called, else the attribute (fetched remotely on first use)."""

    __slots__ = ("_name", "_owner")

    def __init__(self, owner: Pointer, name: str) -> None:
        super().__init__(owner._session, None, lineage.attribute(owner._lineage, name))
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_name", name)

    def _resolve(self) -> p.PointerRef | p.StoreRef:
        if self._ref is None:
            attr = _submit(self._session, "getattr", self._name, self._owner, (), {},
                           self._lineage)
            # Take over the attribute's reference; the temporary must not free it.
            self._ref, attr._ref = attr._ref, None
        assert self._ref is not None
        return self._ref

    def __call__(self, *args: Any, **kwargs: Any) -> Pointer:
        owner = self._owner
        if isinstance(owner._ref, p.StoreRef) and _always_mutating(
                self._session.allowlist, self._name):
            # known without any data: the target is the shared object itself
            raise PolicyViolation(
                f".{self._name}() would modify shared object {owner._ref.name!r}; the owner's "
                f"data cannot change. Work on a copy, e.g. {owner._ref.name}.copy() or "
                f".clone()")
        text = lineage.method(owner._lineage, self._name, _show_args(args, kwargs))
        return _submit(self._session, "method", self._name, owner, args, kwargs, text)

    def __repr__(self) -> str:
        return f"<Pointer member {self._lineage}>" if self._ref is None else super().__repr__()


def _always_mutating(allowed: p.AllowlistSummary, name: str) -> bool:
    """Whether method ``name`` changes its object in every family that has it (``float``
    converts a tensor but changes a module: then only the owner can tell)."""
    families = [f for f, members in allowed.members.items()
                if name in members and f"{f}.{name}" not in allowed.attributes]
    return bool(families) and all(f"{f}.{name}" in allowed.mutating for f in families)


def _submit(session: PointerHost, kind: str, name: str, target: Pointer | None,
            args: tuple[Any, ...], kwargs: dict[str, Any], text: str) -> Pointer:
    # Built without validation: every field comes from this module (ids from the session,
    # names from the allowlist summary); the owner validates what arrives.
    op = p.Op.model_construct(
        result=session.new_id(), kind=kind, name=name,
        target=None if target is None else _to_wire(target, session),
        args=[_to_wire(a, session) for a in args],
        kwargs={k: _to_wire(v, session) for k, v in kwargs.items()},
    )
    if 2 + p.op_values(op) > p.MAX_VALUES:  # refused here, not with the rest of its batch
        raise ValueError(f"the arguments of {name} hold more than {p.MAX_VALUES} values (items "
                         "of lists, tuples and dicts): the owner refuses such a message. Pass "
                         "bulk data as an array: np.asarray(...)")
    session.submit_op(op)
    return Pointer(session, p.PointerRef(op.result), text)


def _to_wire(value: Any, session: PointerHost, depth: int = 0) -> Any:
    """Arguments as the protocol carries them: pointers become references."""
    if type(value) in _PLAIN:  # the common case first: a number or a string is itself
        return value
    if depth > p.MAX_VALUE_DEPTH:
        raise ValueError("argument nested too deeply")
    if isinstance(value, RemoteModule):
        value = value._as_pointer()
    if isinstance(value, Pointer):
        if value._session is not session:
            raise DuetError(f"{value!r} belongs to another duet session; objects cannot move "
                            "between sessions without the owners' approval")
        return value._check()
    if isinstance(value, (list, tuple)):
        items = [_to_wire(v, session, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _to_wire(v, session, depth + 1) for k, v in value.items()}
    if isinstance(value, p.DTypeRef):
        return value
    name = dtypes.wire_name(value)
    if name is not None:
        return p.DTypeRef(name)
    if isinstance(value, type) or isinstance(value, np.dtype):
        raise PolicyViolation(f"{value!r} is not a dtype the owner accepts; use one of "
                              f"{', '.join(dtypes.CANONICAL)}")
    if isinstance(value, _SENDABLE) or value is Ellipsis or _is_tensor(value):
        return value
    # Refused here, at the call: found only when the batch is encoded, it would take the
    # other operations of the batch with it.
    if callable(value):
        raise PolicyViolation(f"{value!r} is code of yours: the owner runs only allowlisted "
                              "functions (r.np.*, r.torch.*, ...), never a function you pass")
    raise TypeError(f"a {type(value).__module__}.{type(value).__name__} cannot be sent to the "
                    "owner; pass numbers, strings, lists, tuples, dicts, slices, arrays, "
                    "tensors or pointers")


_SENDABLE = (bytes, complex, slice, np.ndarray, np.generic, p.PointerRef, p.StoreRef)


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


# -- lineage text (rendered by duet.lineage, exactly as the owner renders it) -----------
_PLAIN = frozenset((int, float, bool, str, type(None)))  # never dtypes (wire_name: None)


def _show(value: Any, depth: int = 0) -> str:
    if isinstance(value, Pointer):
        return value._lineage
    if type(value) in _PLAIN:
        return lineage.scalar(value)
    if isinstance(value, RemoteModule):
        return type(value).__name__
    if isinstance(value, np.ndarray):
        return lineage.array("array", str(value.dtype), value.shape)
    if type(value).__module__ == "torch" and hasattr(value, "shape"):
        return lineage.array("tensor", str(value.dtype), value.shape)
    if isinstance(value, p.DTypeRef):
        return value.name
    if depth < p.MAX_VALUE_DEPTH:
        if isinstance(value, list):
            return lineage.sequence([_show(v, depth + 1) for v in value], "[", "]")
        if isinstance(value, tuple):
            return lineage.sequence([_show(v, depth + 1) for v in value], "(", ")")
        if isinstance(value, dict):
            return lineage.sequence([f"{k!r}: {_show(v, depth + 1)}" for k, v in value.items()],
                                    "{", "}")
        if isinstance(value, slice):
            return lineage.slice_text(*(None if v is None else _show(v, depth + 1)
                                        for v in (value.start, value.stop, value.step)))
    name = dtypes.wire_name(value)
    return name if name is not None else lineage.scalar(value)


def _show_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    return [_show(a) for a in args] + [f"{k}={_show(v)}" for k, v in kwargs.items()]


# -- remote namespaces --------------------------------------------------------------------
class RemoteFunction:
    """An allowlisted function on the owner, e.g. ``r.np.mean`` or ``r.torch.nn.Linear``."""

    def __init__(self, session: PointerHost, qualname: str) -> None:
        self._session = session
        self.qualname = qualname

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        text = lineage.function(self.qualname, _show_args(args, kwargs))
        result = _submit(self._session, "function", self.qualname, None, args, kwargs, text)
        if self.qualname in _SPLITS:
            # train_test_split returns two parts per array: a count that depends only on the
            # call, so the parts can be unpacked here (X_train, X_test, y_train, y_test = ...)
            return tuple(result[i] for i in range(2 * len(args)))
        return result

    def __repr__(self) -> str:
        return f"<remote function {self.qualname}>"


_SPLITS = frozenset({"sklearn.model_selection.train_test_split"})


class RemoteNamespace:
    """``r.np``, ``r.torch``, ``r.torch.nn`` ...: only allowlisted names resolve."""

    def __init__(self, session: PointerHost, prefix: str) -> None:
        self._session = session
        self._prefix = prefix

    def _functions(self) -> list[str]:
        return self._session.allowlist.functions

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise PolicyViolation(f"{self._prefix}.{name}: private and dunder names are never "
                                  "reachable")
        qualname = f"{self._prefix}.{name}"
        functions = self._functions()
        if self._prefix == "torch" and name == "no_grad":
            return lambda: _NoGrad(self._session)
        if qualname in functions:
            return RemoteFunction(self._session, qualname)
        if any(f.startswith(qualname + ".") for f in functions):
            return RemoteNamespace(self._session, qualname)
        found = dtypes.canonical(name)
        if found is not None and self._prefix in ("numpy", "torch"):
            return p.DTypeRef(f"torch.{found[1]}" if self._prefix == "torch" else found[1])
        close = difflib.get_close_matches(qualname, functions, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise PolicyViolation(f"{qualname} is not on the owner's allowlist.{hint}")

    def __dir__(self) -> list[str]:
        depth = self._prefix.count(".") + 1
        names = {f.split(".")[depth] for f in self._functions()
                 if f.startswith(self._prefix + ".")}
        return sorted(names)

    def __repr__(self) -> str:
        return f"<remote namespace {self._prefix}: {len(dir(self))} names>"


class _NoGrad:
    """``with r.torch.no_grad():`` switches autograd off on the owner's worker, then back."""

    def __init__(self, session: PointerHost) -> None:
        self._session = session

    def _set(self, enabled: bool) -> None:
        RemoteFunction(self._session, "torch.set_grad_enabled")(enabled).delete()

    def __enter__(self) -> _NoGrad:
        self._set(False)
        return self

    def __exit__(self, *exc: object) -> None:
        self._set(True)


class RemoteModule:
    """Write a torch model as usual, from remote layers; it runs entirely on the owner.

        class Net(duet.RemoteModule):
            def __init__(self, r):
                super().__init__()
                self.fc1 = r.torch.nn.Linear(30, 16)
                self.fc2 = r.torch.nn.Linear(16, 2)

            def forward(self, x):
                return self.fc2(r.torch.relu(self.fc1(x)))

    Layers are pointers to real ``torch.nn`` modules on the owner. ``parameters()``,
    ``state_dict()``, ``train()``/``eval()`` act on a remote ``ModuleList`` of them.
    """

    _layers: dict[str, Pointer | RemoteModule]
    _remote: Pointer | None

    def __init__(self) -> None:
        object.__setattr__(self, "_layers", {})
        object.__setattr__(self, "_remote", None)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, (Pointer, RemoteModule)) and not name.startswith("_"):
            self._layers[name] = value
            object.__setattr__(self, "_remote", None)
        object.__setattr__(self, name, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("define forward() in your subclass")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def _as_pointer(self) -> Pointer:
        """A remote ``ModuleDict`` holding this model's layers (names as attributes)."""
        if self._remote is None:
            if not self._layers:
                raise ValueError(f"{type(self).__name__} has no remote layers yet")
            first = next(iter(self._layers.values()))
            pointer = first if isinstance(first, Pointer) else first._as_pointer()
            module_dict = RemoteFunction(pointer._session, "torch.nn.ModuleDict")(
                dict(self._layers))
            object.__setattr__(module_dict, "_lineage", type(self).__name__)
            object.__setattr__(self, "_remote", module_dict)
            return module_dict
        return self._remote

    def parameters(self) -> Pointer:
        return self._as_pointer().parameters()

    def state_dict(self) -> Pointer:
        return self._as_pointer().state_dict()

    def load_state_dict(self, state: Any) -> Pointer:
        return self._as_pointer().load_state_dict(state)

    def train(self, mode: bool = True) -> RemoteModule:
        self._as_pointer().train(mode).delete()
        return self

    def eval(self) -> RemoteModule:
        return self.train(False)

    def zero_grad(self) -> None:
        self._as_pointer().zero_grad().delete()

    def __repr__(self) -> str:
        layers = ", ".join(f"{k}={_show(v)}" for k, v in self._layers.items())
        return f"<RemoteModule {type(self).__name__}({layers})>"



class DPNamespace:
    """``r.dp``: differentially private statistics of data the owner shared with ``dp=``.

    Each returns a ``Pointer`` at once; its ``get(reason)`` is a DP request: the owner's side
    reserves ``epsilon`` from the shared name's budget (or raises ``PrivacyBudgetExceeded``
    before computing anything), draws the noise, and the owner (or a rule) approves. Bounds,
    the privacy unit and delta are the owner's: they cannot be passed here. Group keys and
    quantile candidates are public values you choose (never read from the data).
    """

    def __init__(self, session: PointerHost) -> None:
        self._session = session

    def _statistic(self, name: str, data: Any, **kwargs: Any) -> Pointer:
        given = {k: v for k, v in kwargs.items() if v is not None}
        text = lineage.function(f"dp.{name}", _show_args((data,), given))
        return _submit(self._session, "function", f"dp.{name}", None, (data,), given, text)

    def count(self, data: Any, *, epsilon: float, by: Any = None,
              categories: list[Any] | None = None) -> Pointer:
        """Rows of ``data`` (a table, a column, a filtered one), or per group of ``by``."""
        return self._statistic("count", data, epsilon=epsilon, by=by, categories=categories)

    def sum(self, column: Any, *, epsilon: float, by: Any = None,
            categories: list[Any] | None = None) -> Pointer:
        """Sum of a column clamped to the owner's bounds; per group with ``by=``."""
        return self._statistic("sum", column, epsilon=epsilon, by=by, categories=categories)

    def mean(self, column: Any, *, epsilon: float, by: Any = None,
             categories: list[Any] | None = None) -> Pointer:
        """Mean of a column clamped to the owner's bounds (noisy sum / noisy count); per
        group with ``by=`` (a dict keyed by ``str(category)``)."""
        return self._statistic("mean", column, epsilon=epsilon, by=by, categories=categories)

    def variance(self, column: Any, *, epsilon: float) -> Pointer:
        """Variance of a column clamped to the owner's bounds."""
        return self._statistic("variance", column, epsilon=epsilon)

    def histogram(self, column: Any, *, epsilon: float, bins: int | list[float] | None = None,
                  categories: list[Any] | None = None) -> Pointer:
        """Counts per bin (``bins``: a number of equal bins over the owner's bounds, or
        edges) as ``{"edges", "counts"}``, or per public category as a dict."""
        return self._statistic("histogram", column, epsilon=epsilon, bins=bins,
                               categories=categories)

    def quantile(self, column: Any, *, epsilon: float, q: float | list[float] = 0.5,
                 candidates: list[float] | None = None) -> Pointer:
        """The ``q`` quantile(s), chosen among ``candidates`` (default: 101 evenly spaced
        values over the owner's bounds) by the exponential mechanism."""
        return self._statistic("quantile", column, epsilon=epsilon, q=q, candidates=candidates)

    def train(self, model: Any, *, data: Any, labels: Any, loss: str, epochs: int,
              batch_size: int, lr: float, epsilon: float, delta: float | None = None,
              optimizer: str = "sgd", **owner_only: Any) -> DPTraining:
        """Train ``model`` with DP-SGD (Opacus) on the owner's side; see docs/dp_training.md.

        ``model``: a remote ``torch.nn`` model the owner's worker can run by itself, e.g.
        ``r.torch.nn.Sequential(r.torch.nn.Linear(64, 32), r.torch.nn.ReLU(), ...)``.
        ``data``/``labels``: all rows of data the owner shared with ``dp=`` (columns of it).
        ``batch_size`` is the expected batch size (sampling is Poisson). Sampling, clipping,
        the noise and the bound on epochs are the owner's and cannot be passed here.
        Returns a ``DPTraining``; its ``get(reason)`` asks the owner to start (showing the
        cost), then returns ``{"parameters": {name: tensor}, "epsilon": ..., ...}``.
        """
        if owner_only:
            raise PolicyViolation(f"r.dp.train: {', '.join(sorted(owner_only))} cannot be chosen "
                                  "by the researcher; the data owner sets what the privacy "
                                  "guarantee depends on")
        if isinstance(model, RemoteModule):
            raise TypeError("r.dp.train needs a model the owner's side can run by itself, e.g. "
                            "r.torch.nn.Sequential(...) of remote layers: a duet.RemoteModule's "
                            "forward is Python in your kernel")
        given = {k: v for k, v in dict(loss=loss, epochs=epochs, batch_size=batch_size, lr=lr,
                                       epsilon=epsilon, delta=delta,
                                       optimizer=optimizer).items() if v is not None}
        kwargs = {"data": data, "labels": labels, **given}
        text = lineage.function("dp.train", _show_args((model,), kwargs))
        return DPTraining(_submit(self._session, "function", "dp.train", None, (model,), kwargs,
                                  text))

    def __repr__(self) -> str:
        return "<r.dp: count, sum, mean, variance, histogram, quantile, train>"


class DPTraining:
    """A DP-SGD run on the owner's side, asked for in two steps (``get`` does both):
    ``start(reason)`` asks the owner to approve its cost (epsilon, delta, noise, sampling),
    then ``result()`` waits for the trained parameters. Each run trains at most once."""

    def __init__(self, pointer: Pointer) -> None:
        self.pointer = pointer
        self.started: dict[str, Any] | None = None

    def start(self, reason: str = "", timeout: float | None = None) -> dict[str, Any]:
        """Ask the owner to start; returns what you asked for once approved (raises
        ``PrivacyBudgetExceeded`` before anything runs if the budget cannot pay)."""
        self.started = self.pointer.get(reason, timeout)
        return self.started

    def result(self, reason: str = "", timeout: float | None = None) -> dict[str, Any]:
        """The trained parameters (only ``parameters()``, never buffers), after ``start``."""
        if self.started is None:
            raise DuetError("start() the training first: the owner approves its cost")
        value: dict[str, Any] = self.pointer.get(reason, timeout)
        return value

    def get(self, reason: str = "", timeout: float | None = None) -> dict[str, Any]:
        if self.started is None:
            self.start(reason, timeout)
        return self.result(reason, timeout)

    def __repr__(self) -> str:
        state = "not started" if self.started is None else "started"
        return f"<DPTraining {self.pointer.lineage} ({state})>"
