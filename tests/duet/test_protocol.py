"""Wire protocol: every dtype round-trips bit-exact; garbage is refused with ProtocolError."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from duet import ProtocolError
from duet import protocol as p

NUMPY_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32",
                "uint64", "float16", "float32", "float64", "complex64", "complex128"]
TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
                torch.complex128]


def roundtrip(value: object) -> object:
    header, buffers = p.encode(p.Decision(request_id="ab" * 4, status="approved", value=value))
    # The transport hands over fresh buffers: copy, as the receiver would own them.
    decoded = p.decode(header, [bytearray(b) for b in buffers])
    assert isinstance(decoded, p.Decision)
    return decoded.value


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4, 5)])
def test_numpy_roundtrip_bit_exact(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize,
                       dtype=np.uint8)
    array = raw.view(dtype).reshape(shape)  # arbitrary bit patterns, NaN payloads included
    out = roundtrip(array)
    assert isinstance(out, np.ndarray)
    assert out.dtype == array.dtype and out.shape == array.shape
    assert out.tobytes() == array.tobytes()


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_roundtrip_bit_exact(dtype: torch.dtype) -> None:
    base = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4) * 1.37 - 9
    tensor = base.to(dtype) if dtype != torch.bool else base > 0
    out = roundtrip(tensor)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_non_contiguous_and_conjugate_views() -> None:
    array = np.arange(60, dtype=np.float32).reshape(6, 10)[::2, 1::3].T
    assert not array.flags.c_contiguous
    assert np.array_equal(roundtrip(array), array)
    tensor = torch.arange(30.0).reshape(5, 6).t()[1:, ::2]
    assert torch.equal(roundtrip(tensor), tensor)
    z = torch.tensor([1 + 2j, 3 - 1j]).conj()
    assert torch.equal(roundtrip(z), z.resolve_conj())


def test_nested_values_keep_their_types() -> None:
    value = {"w": torch.ones(2), "stats": (1, 2.5, None, "x", [np.int64(3)]), "z": 1 + 2j,
             "s": slice(1, None, 2), "e": ...}
    out = roundtrip(value)
    assert isinstance(out, dict)
    assert torch.equal(out["w"], torch.ones(2))
    assert out["stats"] == (1, 2.5, None, "x", [3])
    assert out["z"] == 1 + 2j and out["s"] == slice(1, None, 2) and out["e"] is Ellipsis


def test_large_array_is_not_copied_into_the_header() -> None:
    array = np.zeros(1_000_000, dtype=np.float64)
    header, buffers = p.encode(p.Decision(request_id="ab" * 4, status="approved", value=array))
    assert len(header) < 200
    assert buffers[0].nbytes == array.nbytes
    assert np.shares_memory(np.frombuffer(buffers[0], dtype=np.uint8), array)


def test_refuses_objects_it_cannot_send_safely() -> None:
    for value in [object(), np.array([object()], dtype=object), {1, 2}, lambda: 0]:
        with pytest.raises(ProtocolError):
            p.encode(p.Decision(request_id="ab" * 4, status="approved", value=value))


@pytest.mark.parametrize("header", [
    b"", b"\xc1", b"\x92\x01\x02", msgpack.packb({"type": "nope"}),
    msgpack.packb({"type": "ping"}), msgpack.packb({"type": "ping", "nonce": "x"}),
    msgpack.packb({"type": "ping", "nonce": 1, "extra": 2}),
    msgpack.packb({"type": "ops", "ops": [{"result": 0, "kind": "function", "name": "x"}]}),
    msgpack.packb({"type": "ops", "ops": [{"result": 1, "kind": "eval", "name": "x"}]}),
    msgpack.packb({"type": "request", "request_id": "../../etc", "target": None}),
    msgpack.packb({1: 2}),
    msgpack.packb({"type": "decision", "request_id": "a", "status": "approved",
                   "value": msgpack.ExtType(99, b"")}),
    msgpack.packb({"type": "decision", "request_id": "a", "status": "approved",
                   "value": msgpack.ExtType(8, msgpack.packb(["numpy", "float32", [4], 0]))}),
])
def test_malformed_messages_raise_protocol_error(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.decode(header)


def test_buffer_size_must_match_declared_shape() -> None:
    header, buffers = p.encode(p.Decision(request_id="ab" * 4, status="approved",
                                          value=np.zeros(4, dtype=np.float32)))
    with pytest.raises(ProtocolError, match="size"):
        p.decode(header, [b"\x00" * 12])
    with pytest.raises(ProtocolError, match="buffers"):
        p.decode(header, [bytes(buffers[0]), b"extra"])


def test_object_dtype_is_refused_on_decode() -> None:
    header = msgpack.packb({"type": "decision", "request_id": "a", "status": "approved",
                            "value": msgpack.ExtType(8, msgpack.packb(["numpy", "O", [1], 0]))})
    with pytest.raises(ProtocolError):
        p.decode(header, [b"\x00" * 8])


def test_nested_extension_values_are_refused_not_recursed() -> None:
    import msgpack

    from duet.errors import ProtocolError

    value = msgpack.packb([1])
    for _ in range(500):  # 1.5 KB of tuples inside tuples: once a C stack overflow
        value = msgpack.packb(msgpack.ExtType(3, value))
    header = msgpack.packb({"type": "ops", "ops": [{"result": 1, "kind": "function",
                                                    "name": "numpy.mean",
                                                    "args": [msgpack.ExtType(3, value)]}]})
    assert len(header) < 4096
    with pytest.raises(ProtocolError, match="nested too deeply"):
        p.decode(header)


@pytest.mark.parametrize("shape", [[2**62, 4], [2**40, 2**40], [-1], [1] * 65, "x"])
def test_array_headers_are_checked_before_allocating(shape: object) -> None:
    import msgpack

    from duet.errors import ProtocolError

    array = msgpack.ExtType(8, msgpack.packb(["numpy", "float64", shape, 0]))
    header = msgpack.packb({"type": "decision", "request_id": "ab" * 8, "status": "approved",
                            "value": array})
    with pytest.raises(ProtocolError):
        p.decode(header, [memoryview(b"\0" * 8)])


@pytest.mark.parametrize("ext", [
    (4, [1, 2]), (6, [1.0]), (6, ["a", "b"]), (2, b"\xff\xfe"), (7, b"x" * 300),
])
def test_malformed_extension_values_are_protocol_errors(ext: tuple[int, object]) -> None:
    import msgpack

    from duet.errors import ProtocolError

    code, payload = ext
    data = payload if isinstance(payload, bytes) else msgpack.packb(payload)
    header = msgpack.packb({"type": "decision", "request_id": "ab" * 8, "status": "approved",
                            "value": msgpack.ExtType(code, data)})
    with pytest.raises(ProtocolError):
        p.decode(header)


# -- what one message from the researcher may hold (the owner's loop checks it in one go) --
OPS_OF_EVERY_SHAPE = [
    p.Op(result=1, kind="function", name="numpy.add", args=[1, 2.5, "a", None, True]),
    p.Op(result=2, kind="method", name="reshape", target=p.PointerRef(7),
         args=[(2, [3, 4])], kwargs={"order": "C"}),
    p.Op(result=3, kind="function", name="numpy.take",
         args=[[[1, 2], (3, {"k": [4, (5, 6)]})], slice(1, None, 2)],
         kwargs={"axis": {"a": (1, [2, slice(p.PointerRef(7), 3)])}}),
    p.Op(result=4, kind="function", name="numpy.add",
         args=[np.arange(3), p.DTypeRef("float64"), 1j, Ellipsis, p.StoreRef("x"),
               torch.ones(2, 2)]),
    p.Op(result=5, kind="getattr", name="shape", target=p.StoreRef("x")),
]


@pytest.mark.parametrize("op", OPS_OF_EVERY_SHAPE, ids=lambda op: str(op.result))
def test_op_values_counts_exactly_what_decode_counts(op: p.Op) -> None:
    """The researcher splits its batches by ``op_values``: it must be decode's own count,
    or a batch it thinks fits would be refused whole."""
    header, buffers = p.encode(p.Ops(ops=[op]))
    count = 2 + p.op_values(op)
    for _ in range(2):  # the count starts again at each message
        decoded = p.decode(header, buffers, max_values=count)
        assert isinstance(decoded, p.Ops) and [o.result for o in decoded.ops] == [op.result]
    with pytest.raises(ProtocolError, match=f"at most {count - 1} values"):
        p.decode(header, buffers, max_values=count - 1)


def test_values_are_bounded_only_when_asked_and_the_count_ends_with_the_message() -> None:
    nested = [[[[1]]]] * 60_000  # 180,000 lists in 0.24 MB: a walk of a second on the owner
    header = msgpack.packb({"type": "ops", "ops": [{"result": 1, "kind": "function",
                                                    "name": "builtins.len", "args": [nested]}]})
    with pytest.raises(ProtocolError, match=f"at most {p.MAX_VALUES} values"):
        p.decode(header, max_values=p.MAX_VALUES)
    # the researcher decodes what the owner approved: a result may hold any number of values
    assert isinstance(p.decode(header), p.Ops)


def test_an_ops_message_over_max_ops_is_refused_before_its_ops_are_validated() -> None:
    ops = [{"result": i + 1, "kind": "function", "name": "operator.add", "args": [i, 1]}
           for i in range(p.MAX_OPS)]
    full = p.decode(msgpack.packb({"type": "ops", "ops": ops}))
    assert isinstance(full, p.Ops) and len(full.ops) == p.MAX_OPS
    invalid = {"result": 0, "kind": "nonsense", "name": ""}  # would fail validation
    with pytest.raises(ProtocolError, match=f"at most {p.MAX_OPS} operations, not "
                                            f"{p.MAX_OPS + 1}"):
        p.decode(msgpack.packb({"type": "ops", "ops": [*ops, invalid]}))
    with pytest.raises(ProtocolError, match="invalid 'ops'"):  # the count first, then each op
        p.decode(msgpack.packb({"type": "ops", "ops": [*ops[1:], invalid]}))
