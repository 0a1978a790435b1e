"""The wire protocol between owner and researcher: message models and their encoding.

A message is a pydantic model with a ``type`` tag. On the wire it is a msgpack *header*
(the model's fields) plus zero or more out-of-band *buffers*: the raw bytes of numpy arrays
and torch tensors, which travel as dtype + shape + bytes and are never packed into the
header, so a 256 MiB tensor is not copied on its way to the transport.

Values inside messages (operation arguments, approved results) may contain, besides
msgpack's own types, only the tagged types below, each a msgpack ``ExtType``:

    PointerRef  a researcher-created object on the owner (by id)
    StoreRef    a shared object (by name)
    tuple, slice, Ellipsis, complex, DTypeRef (a dtype by name)
    ArrayRef    an array or tensor whose bytes are buffer ``index`` of this message
    FrameRef    a pandas DataFrame, Series or Index: a spec of its columns whose arrays are
                ArrayRefs (``duet.frames``)

Decoding builds nothing else: there is no pickle, no eval, and no name is ever looked up
from a received string except through the owner's allowlist (``duet.policy``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast, get_args

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from . import frames
from .errors import DuetError, PolicyViolation, ProtocolError, RemoteError

PROTOCOL_VERSION = 3  # 2: small messages with buffers travel in one PACKED frame;
#                        3: the owner refuses messages over MAX_OPS or MAX_VALUES
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_VALUE_DEPTH = 32
MAX_NAME_CHARS = 200
MAX_REASON_CHARS = 2000
MAX_ARRAY_ELEMENTS = 2**48  # far above any real array; keeps shape products in int64
# Operations in one ``Ops`` message. The owner's loop checks a whole message in one go
# (tens of microseconds an operation): the cap keeps that to a few tenths of a second, so
# pongs and heartbeats keep flowing while a researcher pipelines 100,000 operations.
MAX_OPS = 4096
# Values (elements of lists, tuples and maps, at any depth) in one message from the
# researcher. The owner's kernel walks them several times to find references and dtypes
# (microseconds each); 4 MiB of nested lists would hold its loop for many seconds, long
# enough for the researcher to declare it gone. Counted while unpacking, so a message over
# the limit costs no more than the limit to refuse.
MAX_VALUES = 2**17

__all__ = [
    "PROTOCOL_VERSION",
    "ArrayRef",
    "Bye",
    "DTypeRef",
    "Decision",
    "ErrorNotice",
    "Free",
    "Hello",
    "AllowlistSummary",
    "AllowlistUpdate",
    "Message",
    "Op",
    "OpFailed",
    "Ops",
    "Ping",
    "PointerRef",
    "Pong",
    "RequestValue",
    "StoreEntry",
    "StoreRef",
    "StoreSnapshot",
    "Withdraw",
    "WorkerRestarted",
    "decode",
    "encode",
]


# -- values -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PointerRef:
    id: int


@dataclass(frozen=True)
class StoreRef:
    name: str


@dataclass(frozen=True)
class DTypeRef:
    name: str


@dataclass(frozen=True)
class ArrayRef:
    """Placeholder for an array on the wire; ``decode`` replaces it by the array itself."""

    kind: Literal["numpy", "torch"]
    dtype: str
    shape: tuple[int, ...]
    index: int


_EXT_POINTER, _EXT_STORE, _EXT_TUPLE, _EXT_SLICE, _EXT_ELLIPSIS = 1, 2, 3, 4, 5
_EXT_COMPLEX, _EXT_DTYPE, _EXT_ARRAY, _EXT_FRAME = 6, 7, 8, 9

# torch dtypes numpy cannot hold travel as raw bytes under their torch name.
_TORCH_ONLY_DTYPES = {"bfloat16": "int16"}


# -- messages -----------------------------------------------------------------------------
class _Message(BaseModel):
    """Strict: a message is valid only as sent, never coerced (``"5"`` is no object id, a map
    no pointer). The owner's worker rebuilds the messages its kernel validated without
    validating again (``decode(validated=True)``), so validation must not change what it
    accepts, or the kernel would check one message and the worker run another."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True,
                              strict=True)


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
ObjectId = Annotated[int, Field(ge=1, lt=2**63)]
RequestId = Annotated[str, Field(pattern=r"^[0-9a-f]{8,32}$")]


class AllowlistSummary(_Message):
    """What the owner allows, by name, so the researcher refuses early (the owner still
    checks everything): qualified function names; per type family (``ndarray``, ``Tensor``,
    ...) its method and attribute names; and which ``family.name`` are attributes or
    mutating methods."""

    functions: list[str] = Field(default_factory=list)
    members: dict[str, list[str]] = Field(default_factory=dict)
    attributes: list[str] = Field(default_factory=list)
    mutating: list[str] = Field(default_factory=list)


class Hello(_Message):
    """First message each way; the protocol versions must match."""

    type: Literal["hello"] = "hello"
    version: int
    role: Literal["owner", "researcher"]
    software: str = ""
    # The owner tells the researcher what it allows, so refusals happen before sending.
    allowlist: AllowlistSummary | None = None


class AllowlistUpdate(_Message):
    """The owner changed the allowlist mid-session; the researcher's early checks follow."""

    type: Literal["allowlist"] = "allowlist"
    allowlist: AllowlistSummary


class StoreEntry(_Message):
    """What the owner declared about a shared object: nothing else about it is visible.

    Tables (pandas) declare their column names and dtypes, and their row count unless the
    owner hid it (then ``rows`` and ``shape`` are None); never their index."""

    name: Name
    type: str
    shape: list[int] | None = None
    dtype: str | None = None
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    rows: int | None = None
    columns: list[str] | None = None
    dtypes: list[str] | None = None
    # the owner's allowlist family of the object (``Module``, ``DataFrame``, ...): the
    # researcher refuses a member outside it by name, before anything is sent
    family: Name | None = None


class StoreSnapshot(_Message):
    type: Literal["store"] = "store"
    entries: list[StoreEntry]


class Op(_Message):
    """One operation; its result becomes the owner's object ``result``.

    kind ``function``: call allowlisted ``name`` (e.g. ``numpy.mean``, ``operator.add``).
    kind ``method``: call method ``name`` of object ``target``.
    kind ``getattr``: read attribute ``name`` of ``target``.
    kind ``call``: call ``target`` itself (a torch module's forward).
    """

    result: ObjectId
    kind: Literal["function", "method", "getattr", "call"]
    name: Name
    target: PointerRef | StoreRef | None = None
    # Factories, not ``[]``/``{}``: pydantic deep-copies a mutable default for every model,
    # which was most of the cost of decoding a batch of operations.
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


def op_values(op: Op) -> int:
    """The values ``op`` adds to an ``Ops`` message, counted as ``decode`` counts them: its
    place in the list of operations, its six fields, then the elements of every list, tuple,
    map and slice in its arguments. The researcher keeps each batch within ``MAX_VALUES``."""
    values = [op.target, *op.args, *op.kwargs.values()]
    return 7 + len(op.args) + len(op.kwargs) + sum(map(_values, values))


def _values(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        return len(value) + sum(map(_values, value))
    if isinstance(value, dict):
        return len(value) + sum(map(_values, value.values()))
    if isinstance(value, slice):
        return 3 + sum(map(_values, (value.start, value.stop, value.step)))
    return 0


class Ops(_Message):
    """A batch of operations, executed in order: pipelining without a round trip per op."""

    type: Literal["ops"] = "ops"
    ops: list[Op] = Field(max_length=MAX_OPS)


class Free(_Message):
    type: Literal["free"] = "free"
    ids: list[ObjectId]


class OpFailed(_Message):
    """Operation ``result`` failed: names the operation and error type, never data values."""

    type: Literal["op_failed"] = "op_failed"
    result: ObjectId
    operation: str
    error_type: str
    policy: bool = False
    detail: str = ""  # only for policy refusals, which depend on names, not data


def failure_error(failure: OpFailed) -> DuetError:
    """The exception the researcher sees for a failed operation."""
    if failure.policy:
        return PolicyViolation(failure.detail or f"{failure.operation} is not allowed")
    return RemoteError(failure.operation, failure.error_type, failure.detail)


class RequestValue(_Message):
    type: Literal["request"] = "request"
    request_id: RequestId
    target: PointerRef | StoreRef
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


class Withdraw(_Message):
    type: Literal["withdraw"] = "withdraw"
    request_id: RequestId


class Decision(_Message):
    """The owner's answer to a request; ``value`` is present only when approved.

    ``failed``: the owner approved releasing that computing the value failed, and how
    (``operation`` and ``error_type``); ``error``: the request could not be served;
    ``over_budget``: a DP request would exceed the privacy budget of ``budget`` and was
    refused before anything was computed."""

    type: Literal["decision"] = "decision"
    request_id: str
    status: Literal["approved", "denied", "failed", "error", "over_budget"]
    reason: str = ""
    value: Any = None
    operation: str = ""
    error_type: str = ""
    budget: str = ""  # over_budget: the shared name whose privacy budget would be exceeded


class WorkerRestarted(_Message):
    """The owner's worker process was restarted (cancelled by the owner, crashed, ran out
    of time or memory): every object created before this message is gone."""

    type: Literal["worker_restarted"] = "worker_restarted"
    reason: str
    stopped: bool = False  # no new worker: the owner's restart limit was reached


class Ping(_Message):
    type: Literal["ping"] = "ping"
    nonce: int


class Pong(_Message):
    type: Literal["pong"] = "pong"
    nonce: int


class ErrorNotice(_Message):
    """The peer rejected something we sent that was not an operation (e.g. a malformed frame)."""

    type: Literal["error"] = "error"
    code: str
    message: str


class Bye(_Message):
    type: Literal["bye"] = "bye"
    reason: str = ""


Message = Annotated[
    Hello | AllowlistUpdate | StoreSnapshot | Ops | Free | OpFailed | RequestValue | Withdraw
    | Decision | WorkerRestarted | Ping | Pong | ErrorNotice | Bye,
    Field(discriminator="type"),
]
_message_adapter: TypeAdapter[Message] = TypeAdapter(Message)
_MESSAGE_TYPES: dict[str, type[BaseModel]] = {
    kind.model_fields["type"].default: kind for kind in get_args(get_args(Message)[0])}


# -- encoding -----------------------------------------------------------------------------
class _Encoder:
    """Turns a value tree into msgpack-able objects, collecting array bytes out of band."""

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []

    def default(self, obj: Any) -> Any:
        if isinstance(obj, PointerRef):
            return msgpack.ExtType(_EXT_POINTER, msgpack.packb(obj.id))
        if isinstance(obj, StoreRef):
            return msgpack.ExtType(_EXT_STORE, obj.name.encode())
        if isinstance(obj, tuple):
            return msgpack.ExtType(_EXT_TUPLE, self.pack(list(obj)))
        if isinstance(obj, slice):
            return msgpack.ExtType(_EXT_SLICE, self.pack([obj.start, obj.stop, obj.step]))
        if obj is Ellipsis:
            return msgpack.ExtType(_EXT_ELLIPSIS, b"")
        if isinstance(obj, complex):
            return msgpack.ExtType(_EXT_COMPLEX, msgpack.packb([obj.real, obj.imag]))
        if isinstance(obj, DTypeRef):
            return msgpack.ExtType(_EXT_DTYPE, obj.name.encode())
        if isinstance(obj, np.ndarray):
            return self._array("numpy", obj.dtype.name, obj)
        if isinstance(obj, np.generic):
            return self.default(np.asarray(obj)) if obj.dtype.kind in "cmMV" else obj.item()
        if type(obj).__module__.startswith("torch"):
            return self._tensor(obj)
        if type(obj).__module__.startswith("pandas"):
            return self._pandas(obj)
        raise ProtocolError(f"cannot send a value of type {type(obj).__name__}")

    def pack(self, obj: Any) -> bytes:
        return msgpack.packb(obj, default=self.default, use_bin_type=True, strict_types=True)

    def _array(self, kind: Literal["numpy", "torch"], dtype: str, array: np.ndarray) -> Any:
        if array.dtype.hasobject:
            raise ProtocolError("cannot send an array of Python objects")
        contiguous = np.ascontiguousarray(array)  # copies only if non-contiguous
        self.buffers.append(contiguous.reshape(-1).view(np.uint8).data)
        header = [kind, dtype, list(array.shape), len(self.buffers) - 1]
        return msgpack.ExtType(_EXT_ARRAY, msgpack.packb(header))

    def _pandas(self, obj: Any) -> Any:
        try:
            if frames.is_pandas(obj):
                return msgpack.ExtType(_EXT_FRAME, self.pack(frames.to_spec(obj)))
            plain = frames.scalar(obj)
            return None if plain is None else self.default(plain)
        except TypeError as exc:
            raise ProtocolError(str(exc)) from None

    def _tensor(self, obj: Any) -> Any:
        import torch

        if isinstance(obj, torch.dtype):
            return self.default(DTypeRef(str(obj).removeprefix("torch.")))
        if not isinstance(obj, torch.Tensor):
            raise ProtocolError(f"cannot send a value of type {type(obj).__name__}")
        tensor = obj.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype in _TORCH_ONLY_DTYPES:
            tensor = tensor.contiguous().view(getattr(torch, _TORCH_ONLY_DTYPES[dtype]))
        if tensor.is_conj():
            tensor = tensor.resolve_conj()
        return self._array("torch", dtype, tensor.numpy())


_nesting = threading.local()


def _ext_hook(code: int, data: bytes) -> Any:
    """Extension values nest (a tuple of tuples ...): each level unpacks again, so the depth
    is counted here; without a bound, a 1.5 KB frame would exhaust the C stack."""
    depth = getattr(_nesting, "depth", 0)
    if depth >= MAX_VALUE_DEPTH:
        raise ProtocolError("value nested too deeply")
    _nesting.depth = depth + 1
    try:
        return _ext_value(code, data)
    finally:
        _nesting.depth = depth


def _ext_value(code: int, data: bytes) -> Any:
    if code == _EXT_POINTER:
        value = msgpack.unpackb(data)
        if type(value) is not int or value < 1:  # True is an int to Python, but no id
            raise ProtocolError("malformed pointer reference")
        return PointerRef(value)
    if code == _EXT_STORE:
        return StoreRef(_text(data))
    if code == _EXT_TUPLE:
        return tuple(_unpack(data))
    if code == _EXT_SLICE:
        parts = _unpack(data)
        if not isinstance(parts, list) or len(parts) != 3:
            raise ProtocolError("malformed slice")
        return slice(*parts)
    if code == _EXT_ELLIPSIS:
        return Ellipsis
    if code == _EXT_COMPLEX:
        parts = msgpack.unpackb(data)
        if not (isinstance(parts, list) and len(parts) == 2
                and all(isinstance(v, (int, float)) for v in parts)):
            raise ProtocolError("malformed complex number")
        return complex(*parts)
    if code == _EXT_DTYPE:
        return DTypeRef(_text(data))
    if code == _EXT_ARRAY:
        _nesting.arrays = getattr(_nesting, "arrays", 0) + 1
        header = msgpack.unpackb(data)
        if not (isinstance(header, list) and len(header) == 4):
            raise ProtocolError("malformed array header")
        kind, dtype, shape, index = header
        if (kind not in ("numpy", "torch") or not isinstance(dtype, str)
                or not isinstance(shape, list) or len(shape) > 64
                or not all(isinstance(n, int) and 0 <= n <= MAX_ARRAY_ELEMENTS for n in shape)
                or not isinstance(index, int) or index < 0):
            raise ProtocolError("malformed array header")
        elements = 1
        for n in shape:  # Python integers: no overflow, checked before anything is allocated
            elements *= n
        if elements > MAX_ARRAY_ELEMENTS:
            raise ProtocolError("array shape too large")
        return ArrayRef(kind, dtype, tuple(shape), index)
    if code == _EXT_FRAME:
        # counted like arrays: a frame without buffers (empty, a RangeIndex) is built too
        _nesting.arrays = getattr(_nesting, "arrays", 0) + 1
        return frames.FrameRef(_unpack(data))
    raise ProtocolError(f"unknown extension type {code}")


def _text(data: bytes) -> str:
    if len(data) > MAX_NAME_CHARS:
        raise ProtocolError("name too long")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ProtocolError("name is not UTF-8") from None


def _unpack(data: bytes) -> Any:
    counted = getattr(_nesting, "max_values", None) is not None
    return msgpack.unpackb(
        data,
        ext_hook=_ext_hook,
        list_hook=_counted if counted else None,
        object_hook=_counted if counted else None,
        raw=False,
        strict_map_key=True,
    )


def _counted(container: Any) -> Any:
    """Unpacker hook: adds each list's and map's length to the message's count of values."""
    _nesting.values += len(container)
    if _nesting.values > _nesting.max_values:
        raise ProtocolError(f"a message may carry at most {_nesting.max_values} values "
                            "(elements of lists, tuples and maps); send bulk data as an array")
    return container


def encode(message: BaseModel) -> tuple[bytes, list[memoryview]]:
    """Encode a message as (msgpack header, out-of-band buffers)."""
    encoder = _Encoder()
    if isinstance(message, Ops):  # the hot path of pipelining: thousands of ops a second
        # (an Op's fields hold values, never models: no _plain walk through its arguments)
        names = tuple(Op.model_fields)
        fields: dict[str, Any] = {"type": "ops", "ops": [
            {name: getattr(op, name) for name in names} for op in message.ops]}
    else:
        fields = _plain({name: getattr(message, name) for name in type(message).model_fields})
    return encoder.pack(fields), encoder.buffers


def _plain(value: Any, depth: int = 0) -> Any:
    """Nested models (e.g. Op inside Ops) become dicts; everything else passes as is.

    Nesting is bounded as ``decode`` bounds it: a value chained deeper op by op is refused
    here with ``ProtocolError``, not by the interpreter's recursion limit."""
    if depth > MAX_VALUE_DEPTH:
        raise ProtocolError("value nested too deeply")
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name), depth + 1)
                for name in type(value).model_fields}
    if isinstance(value, list):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    return value


def decode(header: bytes, buffers: Sequence[memoryview | bytes | bytearray] = (), *,
           validated: bool = False, max_values: int | None = None) -> Message:
    """Decode and validate a message; any defect raises ``ProtocolError``.

    ``validated=True`` is for bytes this process's side already decoded with validation, or
    encoded itself (the owner's worker receives the researcher's messages exactly as the
    owner's kernel validated them, and reads back the value it froze): the models are built
    without checking again. ``max_values``: refuse a message holding more values than this
    (the owner passes ``MAX_VALUES``; an approved result may be any size).
    """
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"message header of {len(header)} bytes exceeds the limit")
    _nesting.arrays = 0  # counted by the extension hook: no second walk to find them
    _nesting.values, _nesting.max_values = 0, max_values
    try:
        raw = _unpack(header)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"malformed frame ({type(exc).__name__})") from None
    finally:
        _nesting.max_values = None
    if not isinstance(raw, dict):
        raise ProtocolError("a message must be a map")
    arrays = _nesting.arrays
    kind = raw.get("type")
    ops = raw.get("ops") if kind == "ops" else None
    if isinstance(ops, list) and len(ops) > MAX_OPS:  # refused before validating each one
        raise ProtocolError(f"an ops message may carry at most {MAX_OPS} operations, "
                            f"not {len(ops)}")
    trusted = _MESSAGE_TYPES.get(kind) if validated and isinstance(kind, str) else None
    if trusted is Ops:
        message: Message = Ops.model_construct(
            ops=[Op.model_construct(**op) for op in raw["ops"]])
    elif trusted is not None:
        message = cast(Message, trusted.model_construct(**raw))
    else:
        try:
            message = _message_adapter.validate_python(raw)
        except ValidationError as exc:
            errors = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]
            )
            raise ProtocolError(f"invalid {kind!r} message: {errors}") from None
    if buffers or arrays:
        _has_arrays(raw)  # bounds the depth before the recursive attach
        message = _attach_buffers(message, buffers)
    return message


def _has_arrays(value: Any, depth: int = 0) -> bool:
    if depth > MAX_VALUE_DEPTH:
        raise ProtocolError("value nested too deeply")
    if isinstance(value, (ArrayRef, frames.FrameRef)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_arrays(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_has_arrays(v, depth + 1) for v in value.values())
    return False


def _attach_buffers(message: Message, buffers: Sequence[memoryview | bytes | bytearray]) -> Message:
    used: set[int] = set()

    def resolve(value: Any) -> Any:
        if isinstance(value, ArrayRef):
            if value.index >= len(buffers) or value.index in used:
                raise ProtocolError("array refers to a missing buffer")
            used.add(value.index)
            return array_from_buffer(value, buffers[value.index])
        if isinstance(value, frames.FrameRef):
            return _pandas_value(resolve(value.spec))
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, tuple):
            return tuple(resolve(v) for v in value)
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, BaseModel):
            fields = {n: resolve(getattr(value, n)) for n in type(value).model_fields}
            return type(value).model_construct(**fields)
        return value

    resolved = resolve(message)
    if len(used) != len(buffers):
        raise ProtocolError("message carries buffers no value refers to")
    return resolved  # type: ignore[no-any-return]


def _pandas_value(spec: Any) -> Any:
    try:
        return frames.from_spec(spec)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas refuses what our checks let through
        raise ProtocolError(f"malformed pandas value ({type(exc).__name__})") from None


def array_from_buffer(ref: ArrayRef, buffer: memoryview | bytes | bytearray) -> Any:
    """Rebuild an array or tensor over ``buffer`` without copying it."""
    wire_dtype = _TORCH_ONLY_DTYPES.get(ref.dtype, ref.dtype) if ref.kind == "torch" else ref.dtype
    try:
        dtype = np.dtype(wire_dtype)
    except TypeError:
        raise ProtocolError(f"unknown dtype {ref.dtype!r}") from None
    if dtype.hasobject:
        raise ProtocolError("object arrays are not accepted")
    count = 1
    for n in ref.shape:
        count *= n
    if count * dtype.itemsize != memoryview(buffer).nbytes:
        raise ProtocolError("array buffer size does not match its dtype and shape")
    array = np.frombuffer(buffer, dtype=dtype).reshape(ref.shape)
    if ref.kind == "numpy":
        return array
    import torch

    if not array.flags.writeable:  # torch warns on read-only memory; own a copy instead
        array = array.copy()
    tensor = torch.from_numpy(array)
    if ref.dtype in _TORCH_ONLY_DTYPES:
        tensor = tensor.view(getattr(torch, ref.dtype))
    return tensor
