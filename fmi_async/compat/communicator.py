"""FMI's blocking ``Communicator`` over the asyncio core.

Each call checks its value against its ``types(...)`` declaration and its
operator ``func(...)`` *inside* the collective, after the collective's
sequence number is taken (the runner's ``prepare`` step of
:mod:`fmi_async.dispatch`): a bad declaration on one peer raises there and
is announced to the others, which raise
:class:`~fmi_async.errors.AbortedError` naming the peer and the cause at
once, and every peer stays in step for the next call.  The declaration also
gives every peer the size of the value (as in FMI), and the plan signature
carries its dtype and length: peers that declare different types or lengths
for one collective all raise.

FMI's results, where FMI defines them: ``gather`` returns the concatenation
of every peer's list on the root and ``[]`` elsewhere; ``reduce`` returns on
non-roots what FMI leaves in their receive buffer, ``n`` zeros for a list
type, and ``None`` for a scalar type (FMI's value there is uninitialised
memory, which no program can rely on).
"""

from __future__ import annotations

import atexit
import enum
import logging
import os
import sys
import weakref
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from ..calls import Call
from ..communicator import Communicator as AsyncCommunicator
from ..config import Config
from ..errors import ArgumentError
from ..selection.plan import Hint
from .config import load_config
from .errors import DatatypeError, LengthMismatchError
from .loop import LoopThread, check_blocking_allowed
from .operators import OperatorCache
from .values import Spec, resolve

__all__ = ["Communicator", "hints"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

ConfigSource = Config | Mapping[str, Any] | str | os.PathLike[str]


class hints(enum.Enum):  # FMI's spelling, which FMI programs import
    """FMI's optimisation objective: ``comm.hint(fmi.hints.fast)`` or ``cheap`` (FMI's default)."""

    fast = "fast"
    cheap = "cheap"


_HINTS = {hints.fast: Hint.FAST, hints.cheap: Hint.CHEAP}

_OPEN: weakref.WeakSet[Communicator] = weakref.WeakSet()


def _guard(timeout: float) -> float:
    """How long a blocking call may wait before it is taken for a hang: every call is
    bounded by the communicator's deadline, opening and closing by a few of them.  (A
    timeout the communicator will refuse counts as the default, 60 s.)"""
    valid = isinstance(timeout, (int, float)) and 0 < timeout < float("inf")
    return 4 * (timeout if valid else 60.0) + 30


class Communicator:
    """A peer of an FMI job: ``Communicator(node_id, num_nodes, config_path, comm_name,
    faas_memory)``, with FMI's blocking calls.

    ``config_path`` is FMI's JSON config file (a dict, JSON text or
    :class:`fmi_async.Config` work too); under ``fmi run`` the launcher's
    rendezvous server and secret are filled in (:mod:`.config`).  The
    communicator opens in the constructor and closes with :meth:`close`, at
    the end of a ``with`` block, when it is garbage collected, or at
    interpreter exit.  Extensions (keywords): ``timeout``, the deadline of
    every call in seconds (default the config's, 60); ``run_id``;
    ``use_uvloop``.  The default hint is FMI's, ``hints.cheap``.
    """

    def __init__(
        self,
        node_id: int,
        num_nodes: int,
        config_path: ConfigSource,
        comm_name: str = "FMI_WORLD",
        faas_memory: int = 128,
        *,
        timeout: float | None = None,
        run_id: str | None = None,
        use_uvloop: bool | None = None,
    ) -> None:
        self._state = "new"
        check_blocking_allowed("fmi_async.compat.Communicator()")
        config = load_config(config_path)
        self._ops = OperatorCache()
        self._limit = _guard(config.timeout if timeout is None else timeout)
        self._loop = LoopThread(f"fmi-compat-{comm_name}-{node_id}", use_uvloop=use_uvloop)

        async def create() -> AsyncCommunicator:
            comm = AsyncCommunicator(
                node_id,
                num_nodes,
                config,
                comm_name,
                faas_memory,
                Hint.CHEAP,
                run_id=run_id,
                timeout=timeout,
            )
            await comm.open()
            return comm

        try:
            self._comm = self._loop.call(create(), "opening the communicator", self._limit)
        except BaseException:
            self._state = "closed"
            self._loop.stop()
            raise
        self._limit = _guard(self._comm.timeout)
        self._state = "open"
        _OPEN.add(self)

    # ---------------------------------------------------------------- life cycle

    def __repr__(self) -> str:
        comm = getattr(self, "_comm", None)
        inner = repr(comm) if comm is not None else "-"
        return f"<fmi_async.compat.Communicator {self._state} {inner}>"

    @property
    def peer_id(self) -> int:
        return self._comm.peer_id

    @property
    def num_peers(self) -> int:
        return self._comm.num_peers

    @property
    def comm(self) -> AsyncCommunicator:
        """The asyncio communicator underneath (its loop runs in another thread)."""
        return self._comm

    def close(self) -> None:
        """Close the communicator: a final barrier when a storage channel is open (so
        no peer deletes what a slower one still reads), then every channel."""
        self._close(synchronize=True)

    def _close(self, *, synchronize: bool) -> None:
        if self._state != "open":
            return
        self._state = "closed"
        _OPEN.discard(self)
        try:
            self._loop.call(
                self._comm.close(synchronize=synchronize), "closing the communicator", self._limit
            )
        finally:
            self._loop.stop()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close(synchronize=exc_type is None)

    def __del__(self) -> None:
        if getattr(self, "_state", "closed") != "open":
            return
        try:
            check_blocking_allowed("closing")
            blocking = not self._loop.in_loop_thread()
        except Exception:
            blocking = False
        try:
            if blocking:
                self._close(synchronize=True)
            else:  # collected where it cannot wait: close in the background
                self._state = "closed"
                self._loop.submit(self._close_then_stop())
        except Exception as exc:  # a finalizer must not raise
            logger.warning("peer %d: closing at garbage collection failed: %s", self.peer_id, exc)

    async def _close_then_stop(self) -> None:
        try:
            await self._comm.close()
        finally:
            self._loop.stop(wait=False)

    # ---------------------------------------------------------------- calls

    def _run(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        return self._loop.call(coro, what, self._limit)

    def hint(self, hint: hints | Hint) -> None:
        """Set the optimisation objective of later calls: ``hints.fast`` or ``hints.cheap``."""
        chosen = _HINTS.get(hint) if isinstance(hint, hints) else hint
        if not isinstance(chosen, Hint):
            raise ArgumentError(f"hint must be fmi.hints.fast or fmi.hints.cheap, got {hint!r}")
        self._comm.hint(chosen)

    def stats(self) -> dict[str, Any]:
        """What each channel carried and cost (:meth:`fmi_async.Communicator.stats`)."""

        async def stats() -> dict[str, Any]:
            return self._comm.stats()

        return self._run(stats(), "stats")

    def send(self, value: Any, dst: int, datatype: Any) -> None:
        """Send ``value``, declared ``datatype`` (``types(...)``), to peer ``dst``."""
        data = resolve(datatype, "send").to_array(value, "send")
        self._run(self._comm.send(data, dst), "send")

    def recv(self, src: int, datatype: Any) -> Any:
        """The next value peer ``src`` sent, which must match ``datatype``."""
        spec = resolve(datatype, "recv")
        return spec.from_array(self._run(self._comm.recv(src), "recv"), f"recv from peer {src}")

    def barrier(self) -> None:
        """Return once every peer has entered the barrier."""
        self._run(self._comm.barrier(), "barrier")

    def _collective(self, op: str, prepare: Callable[[], Call]) -> Any:
        return self._run(self._comm._collective(op, None, prepare), op)

    def bcast(self, value: Any, root: int, datatype: Any) -> Any:
        """Peer ``root``'s ``value`` on every peer (the others pass anything, e.g. None)."""
        specs: list[Spec] = []

        def prepare() -> Call:
            self._comm._check_root(root, "bcast")
            spec = _declared(specs, datatype, "bcast")
            data = spec.to_array(value, "bcast") if self.peer_id == root else None
            return Call(
                (data, root), None, None, None, value=spec.template(), root=root, rooted=True
            )

        result = self._collective("bcast", prepare)
        return specs[0].from_array(result, "bcast")

    def gather(self, value: Any, root: int, datatype: Any) -> list[Any]:
        """Every peer's value (a list's elements) concatenated in rank order on ``root``;
        ``[]`` on the other peers."""
        specs: list[Spec] = []

        def prepare() -> Call:
            self._comm._check_root(root, "gather")
            data = _declared(specs, datatype, "gather").to_array(value, "gather")
            return Call((data, root), None, None, None, value=data, root=root, rooted=True)

        parts = self._collective("gather", prepare)
        if parts is None:
            return []
        spec = specs[0]
        whole = np.concatenate(parts)
        if whole.dtype != spec.dtype or whole.shape != (spec.length * self.num_peers,):
            raise DatatypeError(f"gather: the peers' values do not all match {spec}")
        out: list[Any] = whole.tolist()
        return out

    def scatter(self, value: Any, root: int, datatype: Any) -> list[Any]:
        """Part ``i`` of the root's list on peer ``i``: ``datatype`` declares the whole
        list (``n`` elements, divisible by the number of peers); each part has ``n / P``."""
        parts: list[Spec] = []

        def prepare() -> Call:
            self._comm._check_root(root, "scatter")
            spec = resolve(datatype, "scatter")
            if not spec.is_list:
                raise DatatypeError(
                    f"scatter: cannot scatter a single {spec.datatype.name}; declare the whole "
                    "list, types(datatypes.int_list or double_list, n)"
                )
            if spec.length % self.num_peers:
                raise LengthMismatchError(
                    f"scatter: a list of {spec.length} elements ({spec}) cannot be split into "
                    f"{self.num_peers} equal parts"
                )
            part = Spec(spec.datatype, spec.length // self.num_peers)
            parts.append(part)
            items = None
            if self.peer_id == root:
                items = np.split(spec.to_array(value, "scatter"), self.num_peers)
            return Call(
                (items, root), None, None, None, value=part.template(), root=root, rooted=True
            )

        result = self._collective("scatter", prepare)
        return list(parts[0].from_array(result, "scatter"))

    def reduce(self, value: Any, root: int, f: Any, datatype: Any) -> Any:
        """``f`` over every peer's value on ``root`` (lists element-wise); non-roots get
        ``n`` zeros for a list type and ``None`` for a scalar (see the module's notes)."""
        specs: list[Spec] = []

        def prepare() -> Call:
            self._comm._check_root(root, "reduce")
            spec = _declared(specs, datatype, "reduce")
            oper = self._ops.get(f, spec, "reduce")
            data = spec.to_array(value, "reduce")
            return Call(
                (data, oper, root), None, None, None,
                operator=oper, value=data, root=root, rooted=True,
            )  # fmt: skip

        result = self._collective("reduce", prepare)
        if self.peer_id != root:
            return specs[0].zeros()
        return specs[0].from_array(result, "reduce")

    def allreduce(self, value: Any, f: Any, datatype: Any) -> Any:
        """``f`` over every peer's value, on every peer (lists element-wise)."""
        return self._reduction("allreduce", value, f, datatype)

    def scan(self, value: Any, f: Any, datatype: Any) -> Any:
        """Inclusive prefix: peer ``i`` gets ``f`` over the values of peers ``0..i``."""
        return self._reduction("scan", value, f, datatype)

    def _reduction(self, op: str, value: Any, f: Any, datatype: Any) -> Any:
        specs: list[Spec] = []

        def prepare() -> Call:
            spec = _declared(specs, datatype, op)
            oper = self._ops.get(f, spec, op)
            data = spec.to_array(value, op)
            return Call((data, oper), None, None, None, operator=oper, value=data)

        result = self._collective(op, prepare)
        return specs[0].from_array(result, op)


def _declared(specs: list[Spec], datatype: Any, what: str) -> Spec:
    """The checked declaration, remembered in ``specs`` for reading the result."""
    spec = resolve(datatype, what)
    specs.append(spec)
    return spec


@atexit.register
def _close_at_exit() -> None:
    """Close what the program left open while the interpreter still runs (FMI programs
    never close); skip the final barrier when it ends with an uncaught exception."""
    failed = getattr(sys, "last_value", None) is not None
    for comm in list(_OPEN):
        try:
            comm._close(synchronize=not failed)
        except Exception as exc:
            logger.warning("closing %r at exit failed: %s", comm, exc)
