"""The MPI channel under a real ``mpiexec``: scripts run by the launcher
(``suite.py``, ``scenarios.py``, ``same_script.py``) and the pytest module that
launches them (``test_mpi.py``).  What the scripts share is here."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from tests.reference import assert_same

__all__ = ["Checks"]


class Checks:
    """One rank's tally: results checked, failures (strings naming the rank)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.checked = 0
        self.failures: list[str] = []
        self.seconds: dict[str, float] = {}

    def fail(self, what: str) -> None:
        self.failures.append(f"rank {self.rank}: {what}")

    def same(self, got: Any, want: Any, where: str) -> None:
        try:
            assert_same(got, want, where)
        except AssertionError as exc:
            self.fail(str(exc)[:500])
        else:
            self.checked += 1

    def true(self, ok: bool, where: str) -> None:
        if ok:
            self.checked += 1
        else:
            self.fail(where)

    async def expect(self, call: Awaitable[Any], want: Any, where: str) -> None:
        """Await one collective and check its result; an error is a failure too."""
        try:
            got = await call
        except Exception as exc:
            self.fail(f"{where}: {type(exc).__name__}: {exc}"[:500])
        else:
            self.same(got, want, where)
