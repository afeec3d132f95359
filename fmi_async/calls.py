"""What a user calls on a communicator to move data: point-to-point and collectives.

:class:`CommunicatorCalls` holds the public calls of
:class:`~fmi_async.communicator.Communicator` that move data -- ``send``,
``recv`` and every collective -- with their argument checks.  Each collective
checks its arguments into a :class:`Call` (the algorithm's arguments plus what
the planner and the plan signature need) and hands it to the communicator's
runner, ``_collective``, which numbers, plans, runs and settles it (DESIGN.md
section 8).  The communicator module keeps the life cycle and the runner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .collectives.results import expected_out, with_check, writing_into
from .config import Config, check_timeout
from .errors import ArgumentError, CommTimeout, RootError, SizeMismatchError
from .ops import Op, as_op
from .wire.serialize import dumps, loads

if TYPE_CHECKING:
    from .channels.base import Channel
    from .channels.mailbox import ReceiveGuard

__all__ = ["Call", "CommunicatorCalls", "OpLike"]

logger = logging.getLogger(__name__)

OpLike = Op | str | Callable[[Any, Any], Any]

# Values every serializer carries: no trial serialization needed to know it.
_ALWAYS_TRAVEL = frozenset({float, int, bool, type(None)})


class CommunicatorCalls:
    """The data-moving calls of a communicator (a mixin of
    :class:`~fmi_async.communicator.Communicator`, which provides the state
    declared here and runs the collectives)."""

    peer_id: int
    num_peers: int
    timeout: float
    config: Config
    _guard: ReceiveGuard

    def _channel(self, name: str | None = None) -> Channel:
        raise NotImplementedError  # the communicator's point-to-point channel

    async def _collective(self, op: str, timeout: float | None, prepare: Callable[[], Call]) -> Any:
        raise NotImplementedError  # the communicator's runner

    # ---------------------------------------------------------------- validation

    def _check_peer(self, peer: int, what: str) -> None:
        if isinstance(peer, bool) or not isinstance(peer, int):
            raise ArgumentError(f"{what} must be an int peer id, got {peer!r}")
        if not 0 <= peer < self.num_peers:
            raise ArgumentError(
                f"{what} {peer} is out of range: "
                f"this communicator has peers 0..{self.num_peers - 1}"
            )

    def _check_root(self, root: int, op: str) -> None:
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.num_peers:
            raise RootError(
                f"{op}: root {root!r} is not a peer of this communicator "
                f"(valid roots are 0..{self.num_peers - 1})"
            )

    def _check_list(self, values: Any, op: str) -> list[Any]:
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            raise SizeMismatchError(
                f"{op} needs a list of {self.num_peers} values (one per peer), "
                f"got {type(values).__name__}"
            )
        if len(values) != self.num_peers:
            raise SizeMismatchError(
                f"{op} needs exactly {self.num_peers} values (one per peer), got {len(values)}"
            )
        return list(values)

    @staticmethod
    def _check_tag(tag: int | str) -> None:
        if isinstance(tag, bool) or not isinstance(tag, (int, str)):
            raise ArgumentError(f"tag must be an int or str, got {tag!r}")

    # ---------------------------------------------------------------- point to point

    async def send(
        self, value: Any, dst: int, tag: int | str = 0, *, timeout: float | None = None
    ) -> None:
        """Send ``value`` to peer ``dst``; matched by ``(source, tag)`` on the other side."""
        self._check_peer(dst, "dst")
        self._check_tag(tag)
        if timeout is not None:
            timeout = check_timeout(timeout)
        chan = self._channel()
        payload = dumps(value, self.config.serializer, self.config.limits)
        if timeout is None:
            # No wrapper timer on the common path: a send only waits on flow
            # control or a backend request, and every channel bounds those
            # waits itself with the configured timeout.
            await chan.send(dst, ("u", tag), payload)
            return
        try:
            async with asyncio.timeout(timeout):
                await chan.send(dst, ("u", tag), payload)
        except TimeoutError:
            raise CommTimeout(
                f"send to peer {dst} (tag {tag}) on channel {chan.name} did not complete "
                f"in {timeout}s"
            ) from None

    async def recv(self, src: int, tag: int | str = 0, *, timeout: float | None = None) -> Any:
        """Receive the next value peer ``src`` sent with ``tag``."""
        self._check_peer(src, "src")
        self._check_tag(tag)
        t = self.timeout if timeout is None else check_timeout(timeout)
        chan = self._channel()
        if chan.kind == "direct":
            payload = await chan.recv(src, ("u", tag), t)
        else:
            payload = await self._guard.recv(chan, src, ("u", tag), t)
        return loads(payload)

    # ---------------------------------------------------------------- collectives

    def _serializable(self, value: Any) -> None:
        """Raise SerializationError now, before any message of the collective is sent."""
        if type(value) in _ALWAYS_TRAVEL:
            return
        if isinstance(value, np.ndarray) and not value.dtype.hasobject:
            return  # its raw buffer always travels
        dumps(value, self.config.serializer, self.config.limits)

    def _reduction(
        self,
        value: Any,
        op: OpLike,
        args: Callable[[Op], tuple[Any, ...]],
        *,
        nbytes: int | None,
        channel: str | None,
        algorithm: str | None,
        root: int = 0,
        rooted: bool = False,
        array: Any = None,
    ) -> Call:
        oper = as_op(op)
        return Call(
            args(oper),
            nbytes=nbytes,
            channel=channel,
            algorithm=algorithm,
            operator=oper,
            value=value if array is None else array,
            root=root,
            rooted=rooted,
        )

    async def bcast(
        self,
        value: Any = None,
        root: int = 0,
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
        out: np.ndarray | None = None,
    ) -> Any:
        """Peer ``root``'s value, on every peer.

        ``nbytes`` is the size every peer assumes when choosing the plan (only
        the root knows the real one); give the same value on every peer, or
        leave it to the default (``fmi_async.selection.plan.DEFAULT_NBYTES``).
        ``out``: a numpy array the value is written into and returned (a
        non-root checks its shape and dtype once the value arrived).
        """

        def prepare() -> Call:
            self._check_root(root, "bcast")
            if self.peer_id == root:
                self._serializable(value)
            return Call((value, root), nbytes, channel, algorithm, root=root, rooted=True)

        if out is not None:
            known = self.peer_id == root
            check = with_check(
                prepare,
                lambda: expected_out(
                    "bcast", value, out, self.num_peers, self.peer_id, known=known
                ),
            )
            return await writing_into("bcast", out, self._collective("bcast", timeout, check))
        return await self._collective("bcast", timeout, prepare)

    async def barrier(
        self,
        *,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
    ) -> None:
        """Return once every peer has entered the barrier."""
        await self._collective("barrier", timeout, lambda: Call((), 0, channel, algorithm))

    async def gather(
        self,
        value: Any,
        root: int = 0,
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
    ) -> list[Any] | None:
        """Every peer's value, in rank order, on ``root``; ``None`` elsewhere."""

        def prepare() -> Call:
            self._check_root(root, "gather")
            self._serializable(value)
            return Call((value, root), nbytes, channel, algorithm, root=root, rooted=True)

        result: list[Any] | None = await self._collective("gather", timeout, prepare)
        return result

    async def scatter(
        self,
        values: Sequence[Any] | None = None,
        root: int = 0,
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
    ) -> Any:
        """Item ``i`` of the root's list, on peer ``i``."""

        def prepare() -> Call:
            self._check_root(root, "scatter")
            items: list[Any] | None = None
            if self.peer_id == root:
                items = self._check_list(values, "scatter")
                self._serializable(items)
            return Call((items, root), nbytes, channel, algorithm, root=root, rooted=True)

        return await self._collective("scatter", timeout, prepare)

    async def reduce(
        self,
        value: Any,
        op: OpLike = "SUM",
        root: int = 0,
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
        out: np.ndarray | None = None,
    ) -> Any:
        """``op`` over every peer's value, in rank order, on ``root``; ``None`` elsewhere.

        ``out``: a numpy array of ``value``'s shape and dtype the root's result
        is written into and returned (checked on every peer that passes one).
        """

        def prepare() -> Call:
            self._check_root(root, "reduce")
            call = self._reduction(
                value,
                op,
                lambda oper: (value, oper, root),
                nbytes=nbytes,
                channel=channel,
                algorithm=algorithm,
                root=root,
                rooted=True,
            )
            self._serializable(value)
            return call

        if out is not None:
            check = with_check(
                prepare, lambda: expected_out("reduce", value, out, self.num_peers, self.peer_id)
            )
            if self.peer_id != root:
                return await self._collective("reduce", timeout, check)
            return await writing_into("reduce", out, self._collective("reduce", timeout, check))
        return await self._collective("reduce", timeout, prepare)

    async def allreduce(
        self,
        value: Any,
        op: OpLike = "SUM",
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
        out: np.ndarray | None = None,
    ) -> Any:
        """``op`` over every peer's value, in rank order, on every peer.

        ``out``: a numpy array of ``value``'s shape and dtype the result is
        written into and returned (no result array is allocated); it may be
        ``value`` itself.
        """
        prepare = self._simple_reduction(value, op, nbytes, channel, algorithm)
        if out is not None:
            check = with_check(
                prepare, lambda: expected_out("allreduce", value, out, self.num_peers, self.peer_id)
            )
            return await writing_into(
                "allreduce", out, self._collective("allreduce", timeout, check)
            )
        return await self._collective("allreduce", timeout, prepare)

    async def allgather(
        self,
        value: Any,
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
        out: np.ndarray | None = None,
    ) -> Any:
        """Every peer's value, in rank order, on every peer.

        ``out``: a numpy array of shape ``(num_peers, *value.shape)`` and
        ``value``'s dtype; row ``i`` receives peer ``i``'s value and ``out`` is
        returned instead of a list.
        """

        def prepare() -> Call:
            self._serializable(value)
            return Call((value,), nbytes, channel, algorithm)

        if out is not None:
            check = with_check(
                prepare, lambda: expected_out("allgather", value, out, self.num_peers, self.peer_id)
            )
            return await writing_into(
                "allgather", out, self._collective("allgather", timeout, check)
            )
        result: list[Any] = await self._collective("allgather", timeout, prepare)
        return result

    async def alltoall(
        self,
        values: Sequence[Any],
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
    ) -> list[Any]:
        """Item ``j`` of peer ``i``'s list becomes item ``i`` of peer ``j``'s result."""

        def prepare() -> Call:
            items = self._check_list(values, "alltoall")
            self._serializable(items)
            return Call((items,), nbytes, channel, algorithm)

        result: list[Any] = await self._collective("alltoall", timeout, prepare)
        return result

    async def reduce_scatter(
        self,
        value: Any,
        op: OpLike = "SUM",
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
        out: np.ndarray | None = None,
    ) -> Any:
        """Reduce element-wise across peers; peer ``i`` gets part ``i``.

        ``value`` is a numpy array, split along its first axis into
        ``num_peers`` parts (``numpy.array_split``: the first parts are one row
        longer when the length does not divide), or a list of ``num_peers`` values.
        ``out``: a numpy array of this peer's part's shape and ``value``'s dtype
        the part is written into and returned.
        """

        def prepare() -> Call:
            if isinstance(value, np.ndarray):
                if value.ndim == 0:
                    raise SizeMismatchError("reduce_scatter needs an array with at least one axis")
                parts = list(np.array_split(value, self.num_peers))
            else:
                parts = self._check_list(value, "reduce_scatter")
            call = self._reduction(
                None,
                op,
                lambda oper: (parts, oper),
                nbytes=nbytes,
                channel=channel,
                algorithm=algorithm,
                array=value if isinstance(value, np.ndarray) else None,
            )
            self._serializable(parts)
            return call

        if out is not None:
            check = with_check(
                prepare,
                lambda: expected_out("reduce_scatter", value, out, self.num_peers, self.peer_id),
            )
            work = self._collective("reduce_scatter", timeout, check)
            return await writing_into("reduce_scatter", out, work)
        return await self._collective("reduce_scatter", timeout, prepare)

    async def scan(
        self,
        value: Any,
        op: OpLike = "SUM",
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
    ) -> Any:
        """Inclusive prefix reduction: peer ``i`` gets ``op(v0, ..., vi)``."""
        return await self._collective(
            "scan", timeout, self._simple_reduction(value, op, nbytes, channel, algorithm)
        )

    async def exscan(
        self,
        value: Any,
        op: OpLike = "SUM",
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
    ) -> Any:
        """Exclusive prefix reduction: peer ``i`` gets ``op(v0, ..., v(i-1))``; peer 0 ``None``."""
        return await self._collective(
            "exscan", timeout, self._simple_reduction(value, op, nbytes, channel, algorithm)
        )

    def _simple_reduction(
        self,
        value: Any,
        op: OpLike,
        nbytes: int | None,
        channel: str | None,
        algorithm: str | None,
    ) -> Callable[[], Call]:
        def prepare() -> Call:
            oper = as_op(op)
            self._serializable(value)
            return Call((value, oper), nbytes, channel, algorithm, operator=oper, value=value)

        return prepare


class Call:
    """A checked collective call: the algorithm's arguments and what plan() needs.

    The signature every peer's plan identifier carries names everything the
    peers must agree on beyond the algorithm: dtype and shape of arrays, the
    root of rooted collectives, and the operator of reductions (its name and
    properties: two peers passing ``SUM`` and ``MAX`` run different plans).
    """

    __slots__ = (
        "_array",
        "algorithm",
        "args",
        "channel",
        "elements",
        "is_array",
        "nbytes",
        "operator",
        "root",
        "rooted",
        "traits",
    )

    def __init__(
        self,
        args: tuple[Any, ...],
        nbytes: int | None,
        channel: str | None,
        algorithm: str | None,
        *,
        operator: Op | None = None,
        value: Any = None,
        root: int = 0,
        rooted: bool = False,
    ) -> None:
        self.args = args
        self.nbytes = nbytes
        self.channel = channel
        self.algorithm = algorithm
        self.operator = operator
        self.root = root
        self.rooted = rooted
        self.is_array = False
        self.elements: int | None = None
        self._array: tuple[str, tuple[int, ...]] | None = None
        if isinstance(value, np.ndarray):
            self.is_array, self.elements = True, int(value.size)
            self.nbytes = int(value.nbytes)
            self._array = (value.dtype.str, value.shape)
        # Everything plan() and the signature depend on, as a key for the
        # runner's plan cache (the signature itself is only built on a miss).
        self.traits = (nbytes, channel, algorithm, operator, root, rooted, self._array)

    @property
    def signature(self) -> str:
        parts: list[str] = []
        if self._array is not None:
            dtype, shape = self._array
            parts.append(f"{dtype}{list(shape)}")
        if self.rooted:
            parts.append(f"root={self.root}")
        operator = self.operator
        if operator is not None:
            flags = ("c" if operator.commutative else "") + ("a" if operator.associative else "")
            parts.append(f"op={operator.name}:{flags}")
        return "/".join(parts)
