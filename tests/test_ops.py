"""Reduction operators: scalars, numpy element-wise, user operators, errors."""

from __future__ import annotations

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.ops import BUILTIN_OPS, as_op, fold


@pytest.mark.parametrize(
    ("op", "a", "b", "want"),
    [
        (fmi.SUM, 2, 3, 5),
        (fmi.PROD, 2, 3, 6),
        (fmi.MIN, 2, 3, 2),
        (fmi.MAX, 2.5, 3, 3),
        (fmi.LAND, 1, 0, False),
        (fmi.LOR, 0, 2, True),
        (fmi.BAND, 0b1100, 0b1010, 0b1000),
        (fmi.BOR, 0b1100, 0b1010, 0b1110),
        (fmi.BXOR, 0b1100, 0b1010, 0b0110),
        (fmi.SUM, "ab", "cd", "abcd"),
    ],
)
def test_builtin_scalars(op: fmi.Op, a: object, b: object, want: object) -> None:
    assert op(a, b) == want


@pytest.mark.parametrize("name", sorted(BUILTIN_OPS))
def test_builtins_are_elementwise_on_arrays(name: str) -> None:
    op = BUILTIN_OPS[name]
    a = np.array([0, 1, 6, 7], dtype=np.int32)
    b = np.array([3, 1, 0, 9], dtype=np.int32)
    got = op(a, b)
    want = np.array([op.func(int(x), int(y)) for x, y in zip(a, b, strict=True)])
    assert isinstance(got, np.ndarray) and got.shape == a.shape
    assert np.array_equal(got.astype(np.int64), want.astype(np.int64))
    assert op.commutative and op.associative


def test_as_op_accepts_names_callables_and_rejects_the_rest() -> None:
    assert as_op("sum") is fmi.SUM and as_op("MAX") is fmi.MAX
    user = as_op(lambda a, b: a + b)
    assert not user.commutative and user.associative  # the safe assumption
    with pytest.raises(fmi.OperatorError, match="unknown operator"):
        as_op("avg")
    with pytest.raises(fmi.OperatorError):
        as_op(42)  # type: ignore[arg-type]
    with pytest.raises(fmi.OperatorError, match="callable"):
        fmi.Op(3)  # type: ignore[arg-type]


def test_user_operator_errors_are_fmi_errors() -> None:
    op = fmi.Op(lambda a, b: a + b, commutative=True, name="plus")
    with pytest.raises(fmi.OperatorError, match="plus"):
        op(1, "x")
    with pytest.raises(fmi.OperatorError, match="empty"):
        fold(op, [])
    assert "plus" in repr(op)
