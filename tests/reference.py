"""Sequential reference semantics and test values for the collective suite."""

from __future__ import annotations

from typing import Any

import numpy as np

import fmi_async as fmi

MOD = 1_000_003


def _affine(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    # (a1, a0) then (b1, b0): x -> b1*(a1*x + a0) + b0; associative, not commutative.
    return ((a[0] * b[0]) % MOD, (b[0] * a[1] + b[1]) % MOD)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b) % MOD


def _concat(a: Any, b: Any) -> Any:
    return {"names": a["names"] + b["names"], "n": a["n"] + b["n"]}


def _merge(a: Any, b: Any) -> Any:
    return {"names": sorted(a["names"] + b["names"]), "n": a["n"] + b["n"]}


AFFINE = fmi.Op(_affine, commutative=False, name="affine")
MATMUL = fmi.Op(_matmul, commutative=False, name="matmul")
CONCAT = fmi.Op(_concat, commutative=False, name="concat")
MERGE = fmi.Op(_merge, commutative=True, name="merge")
# Not associative: only a strict left fold in rank order gives the reference.
MINUS = fmi.Op(lambda a, b: a - b, commutative=False, associative=False, name="minus")
ARR_MINUS = fmi.Op(lambda a, b: a * 3 - b, commutative=False, associative=False, name="arr_minus")


def value(kind: str, rank: int) -> Any:
    if kind == "scalar":
        return rank * 7 + 3
    if kind == "affine":
        return (rank + 2, rank * 5 + 1)
    if kind == "object":
        return {"names": [f"p{rank}"], "n": rank + 1}
    if kind == "array":
        return np.arange(6, dtype=np.int64).reshape(2, 3) * (rank + 1) + rank
    if kind == "matrix":
        rng = np.random.default_rng(rank)
        return rng.integers(0, 5, size=(3, 3), dtype=np.int64)
    raise ValueError(kind)


# (value kind, operator) per kind of reduction case.
REDUCTIONS: dict[str, tuple[str, fmi.Op]] = {
    "scalar-sum": ("scalar", fmi.SUM),
    "scalar-max": ("scalar", fmi.MAX),
    "scalar-affine": ("affine", AFFINE),
    "scalar-minus": ("scalar", MINUS),
    "object-merge": ("object", MERGE),
    "object-concat": ("object", CONCAT),
    "array-sum": ("array", fmi.SUM),
    "array-bxor": ("array", fmi.BXOR),
    "array-matmul": ("matrix", MATMUL),
    "array-minus": ("array", ARR_MINUS),
}


def _either(on_arrays: Any, on_scalars: Any) -> Any:
    def f(a: Any, b: Any) -> Any:
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return on_arrays(a, b)
        return on_scalars(a, b)

    return f


# The built-in operators written out again, independently of fmi_async.ops, so
# that the reference never runs the code it checks.
_BUILTINS: dict[str, Any] = {
    "SUM": lambda a, b: a + b,
    "PROD": lambda a, b: a * b,
    "MIN": _either(np.minimum, min),
    "MAX": _either(np.maximum, max),
    "LAND": _either(np.logical_and, lambda a, b: bool(a) and bool(b)),
    "LOR": _either(np.logical_or, lambda a, b: bool(a) or bool(b)),
    "BAND": lambda a, b: a & b,
    "BOR": lambda a, b: a | b,
    "BXOR": lambda a, b: a ^ b,
}


def reference_fold(op: fmi.Op, values: list[Any]) -> Any:
    """Strict left fold in rank order, with the built-ins' own reference functions
    and a user operator's plain function (never ``Op.__call__`` or ``ops.fold``)."""
    builtin = fmi.ops.BUILTIN_OPS.get(op.name)
    f = _BUILTINS[op.name] if builtin is op else op.func
    acc = values[0]
    for v in values[1:]:
        acc = f(acc, v)
    return acc


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Exact structural equality, numpy arrays included (same dtype and values)."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{where}: expected array, got {type(got)}"
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
        assert np.array_equal(got, want), f"{where}: {got} != {want}"
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: {got} != {want}"
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"
