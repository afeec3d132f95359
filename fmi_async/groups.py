"""Sub-communicators: ``split``, ``dup`` and ``create_group``, as MPI users expect.

A sub-communicator is a :class:`~fmi_async.communicator.Communicator` of its
own -- its rank and size, sequence numbers, plans, hint and stats -- over
its parent's channels: each is a *view* (:mod:`fmi_async.channels.view`)
that maps its ranks to the parent's and puts every key under its *scope*,
so no message of one ever matches another's.  Nothing is connected or
claimed anew: no rendezvous, no pool, no punch.  The exception is MPI,
whose native collectives need an MPI communicator of the group: there the
sub-communicator gets a new MPI channel on ``MPI_Comm_split``,
``MPI_Comm_dup`` or ``MPI_Comm_create_group`` of the parent's.

Forming one is a collective: the peers first *agree* (each tells every
other its arguments, a collective of the parent -- of the members only for
``create_group``), so a peer that never calls it is named on every peer
that did, and arguments that disagree fail on every peer before anything
else is exchanged.  Scopes are derived from what the peers agree on (the
agreement's sequence number and the color; for ``create_group`` the member
set and how many groups of that set this peer formed before), so they are
the same on every member without another message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .calls import Call
from .channels.base import Channel, ChannelContext
from .channels.mailbox import Mailbox
from .channels.view import view
from .collectives.base import CollectiveContext
from .config import Config
from .errors import ArgumentError, CommTimeout, PlanMismatchError, ProtocolError
from .selection.plan import Hint, Plan

if TYPE_CHECKING:
    from .communicator import Communicator

__all__ = ["EXCHANGE_MAX", "CommunicatorGroups"]

logger = logging.getLogger(__name__)

EXCHANGE_MAX = 64
"""Largest group whose agreement is an all-to-all exchange (every peer can then
name every missing peer); larger groups agree with the planned allgather."""

_MPI = "mpi"


class CommunicatorGroups:
    """``split``, ``dup`` and ``create_group`` (a mixin of
    :class:`~fmi_async.communicator.Communicator`, which provides the state
    declared here)."""

    peer_id: int
    num_peers: int
    comm_name: str
    run_id: str
    faas_memory: int
    config: Config
    epoch: str | None
    _hint: Hint
    _seq: int
    _mailbox: Mailbox
    _channels: dict[str, Channel]
    _p2p: Channel | None
    _models: Any
    _mpi_comm: Any
    _state: str
    _opened_at: float | None
    _parent: Communicator | None
    _scope: str | None
    _children: list[Communicator]
    _group_calls: Counter[tuple[int, ...]]
    _group_lock: asyncio.Lock
    _own_mpi_comm: Any

    def _channel(self, name: str | None = None) -> Channel:
        raise NotImplementedError  # the communicator's point-to-point channel

    def _usable(self) -> None:
        raise NotImplementedError  # the communicator's open-and-not-broken check

    async def _collective(
        self,
        op: str,
        timeout: float | None,
        prepare: Any,
        *,
        fixed: tuple[Plan, Any] | None = None,
    ) -> Any:
        raise NotImplementedError  # the communicator's runner

    async def allgather(self, value: Any, *, timeout: float | None = None) -> list[Any]:
        raise NotImplementedError  # the communicator's collective

    # ---------------------------------------------------------------- public

    @property
    def parent(self) -> Communicator | None:
        """The communicator this one was split, duplicated or created from (None: a root)."""
        return self._parent

    async def split(
        self, color: int | None, key: int = 0, *, timeout: float | None = None
    ) -> Communicator | None:
        """Split into groups by ``color``, a collective over this communicator.

        Peers that pass the same ``color`` (an int >= 0) form one new
        communicator, ranked by ``(key, rank here)``; ``color=None`` (MPI's
        ``MPI_UNDEFINED``) takes part and gets None.  Raises
        :class:`~fmi_async.errors.ArgumentError` for a bad color or key, and
        :class:`~fmi_async.errors.CommTimeout` naming the peers that never
        called it.
        """

        def check() -> None:
            if color is not None and (
                isinstance(color, bool) or not isinstance(color, int) or color < 0
            ):
                raise ArgumentError(
                    f"split: color must be an int >= 0 or None (MPI_UNDEFINED), got {color!r}"
                )
            if isinstance(key, bool) or not isinstance(key, int):
                raise ArgumentError(f"split: key must be an int, got {key!r}")

        async with self._group_lock:
            seq = self._seq + 1  # the agreement's number, the same on every peer
            scope = f"s{seq}.{color}"
            try:
                entries = await self._agree("split", [color, key], timeout, check)
            except BaseException:
                self._mailbox.disown(scope)  # peers that formed it anyway send in vain
                raise
            pairs = [_color_key(entry, rank) for rank, entry in enumerate(entries)]
            if color is None:
                self._mpi_derive(lambda base, mpi: base.Split(mpi.UNDEFINED, key))
                return None
            ranked = sorted((k, rank) for rank, (c, k) in enumerate(pairs) if c == color)
            members = [rank for _, rank in ranked]
            mpi_comm = self._mpi_derive(lambda base, mpi: base.Split(color, key))
            return await self._derive(scope, members, mpi_comm)

    async def dup(self, *, timeout: float | None = None) -> Communicator:
        """The same group in a message space of its own (a collective, as ``MPI_Comm_dup``)."""
        async with self._group_lock:
            scope = f"d{self._seq + 1}"
            try:
                await self._agree("dup", [], timeout, None)
            except BaseException:
                self._mailbox.disown(scope)
                raise
            mpi_comm = self._mpi_derive(lambda base, mpi: base.Dup())
            return await self._derive(scope, list(range(self.num_peers)), mpi_comm)

    async def create_group(
        self, ranks: Sequence[int], *, timeout: float | None = None
    ) -> Communicator:
        """A communicator of ``ranks`` (ranks here), ranked in the order given.

        A collective over those peers only (``MPI_Comm_create_group``): the
        others do not call it.  Every member must pass the same list in the
        same order.  Raises :class:`~fmi_async.errors.ArgumentError` for a
        list that is not distinct ranks of this communicator including this
        peer's, :class:`~fmi_async.errors.PlanMismatchError` (on every
        member) when members passed different orders, and
        :class:`~fmi_async.errors.CommTimeout` naming members that never called it.
        """
        self._usable()  # a closed or broken communicator forms no group, not even of itself
        members = self._check_members(ranks)
        async with self._group_lock:
            span = tuple(sorted(members))
            self._group_calls[span] += 1
            scope = f"g{self._group_calls[span]}.{_crc(span):08x}"
            child = await self._derive(scope, members, None, agreeing=True)
            try:
                entries = await child._agree(
                    "create_group", [self.peer_id, members], timeout, None, names=members
                )
                for entry in entries:
                    theirs = _members_of(entry)
                    if theirs[1] != members:
                        raise PlanMismatchError(
                            f"create_group on peer {self.peer_id}: this peer passed ranks "
                            f"{members} but peer {theirs[0]} passed {theirs[1]}; every member "
                            "must pass the same ranks in the same order"
                        )
                mpi_comm = self._mpi_derive(
                    lambda base, mpi: base.Create_group(
                        base.Get_group().Incl(members), _crc(span) & 0x7FFF
                    )
                )
                await child._adopt_mpi(mpi_comm)
            except BaseException:
                await child.close()
                raise
            return child

    # ---------------------------------------------------------------- agreement

    def _check_members(self, ranks: Sequence[int]) -> list[int]:
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
            raise ArgumentError(f"create_group: ranks must be a list of ints, got {ranks!r}")
        members = list(ranks)
        for rank in members:
            if isinstance(rank, bool) or not isinstance(rank, int):
                raise ArgumentError(f"create_group: ranks must be ints, got {rank!r}")
            if not 0 <= rank < self.num_peers:
                raise ArgumentError(
                    f"create_group: rank {rank} is not a peer of this communicator "
                    f"(peers 0..{self.num_peers - 1})"
                )
        if len(set(members)) != len(members):
            raise ArgumentError(f"create_group: ranks {members} name a peer twice")
        if self.peer_id not in members:
            raise ArgumentError(
                f"create_group: peer {self.peer_id} is not in ranks {members}; only the "
                "members call create_group"
            )
        return members

    async def _agree(
        self,
        what: str,
        value: list[Any],
        timeout: float | None,
        check: Any,
        *,
        names: Sequence[int] | None = None,
    ) -> list[Any]:
        """Every peer's ``value``, a collective of this communicator named ``what``.

        ``check`` (run before anything is sent) raises the caller's argument
        errors, which are announced to the other peers like any collective's.
        """

        def prepare() -> Call:
            if check is not None:
                check()
            return Call((value, list(names or range(self.num_peers))), None, None, None)

        if self.num_peers > EXCHANGE_MAX:
            # P * (P - 1) messages would cost more than knowing every missing
            # peer is worth: the planned allgather, which names the awaited one.
            def planned() -> Call:
                if check is not None:
                    check()
                return Call((value,), None, None, None)

            gathered: list[Any] = await self._collective("allgather", timeout, planned)
            return gathered
        chan = self._channel()
        chosen = Plan(what, chan.name, "direct", "exchange")
        result: list[Any] = await self._collective(what, timeout, prepare, fixed=(chosen, exchange))
        return result

    # ---------------------------------------------------------------- forming

    def _mpi_derive(self, make: Any) -> Any:
        """``make(base, MPI)`` on the parent's MPI communicator, if this one runs MPI."""
        chan = self._channels.get(_MPI)
        if chan is None:
            return None
        base: Any = getattr(chan, "base")  # noqa: B009 - the MPI channel's communicator
        comm = make(base, getattr(chan, "MPI"))  # noqa: B009
        return None if comm is None or comm == getattr(chan, "MPI").COMM_NULL else comm  # noqa: B009

    async def _derive(
        self,
        scope: str,
        members: list[int],
        mpi_comm: Any,
        *,
        agreeing: bool = False,
    ) -> Communicator:
        """The sub-communicator ``scope`` of ``members`` (ranks here), open.

        ``agreeing``: its members have not agreed yet (create_group); its
        MPI channel, if any, is a view until :meth:`_adopt_mpi`.
        """
        cls: Any = type(self)
        rank = members.index(self.peer_id)
        child: Communicator = cls(
            rank,
            len(members),
            self.config,
            f"{self.comm_name}/{scope}",
            self.faas_memory,
            self._hint,
            run_id=self.run_id,
        )
        child._models = self._models
        child._parent = self  # type: ignore[assignment]
        child._scope = scope
        child.epoch = self.epoch
        for name, chan in self._channels.items():
            if name == _MPI and not agreeing:
                continue  # its own MPI channel, below
            child._channels[name] = view(chan, scope, members, rank, child._mailbox)
        self._mailbox.adopt(scope, child._mailbox, members)
        child._state = "open"
        child._opened_at = time.perf_counter()
        self._children.append(child)
        try:
            if not agreeing:
                await child._adopt_mpi(mpi_comm)
            else:
                child._pick_p2p()
        except BaseException:
            await child.close()
            raise
        logger.debug("peer %d: formed %r", self.peer_id, child)
        return child

    async def _adopt_mpi(self, mpi_comm: Any) -> None:
        """Run MPI's part on ``mpi_comm`` (a new MPI channel), then pick the p2p channel."""
        if mpi_comm is not None:
            from .channels import registry

            self._own_mpi_comm = mpi_comm
            ctx = ChannelContext(
                self.peer_id,
                self.num_peers,
                self.comm_name,
                self.run_id,
                self.config,
                self._mailbox,
                mpi_comm=mpi_comm,
            )
            chan = registry.channel_class(_MPI)(ctx)
            await chan.open()
            old = self._channels.get(_MPI)
            assert self._parent is not None
            self._channels = {  # the parent's order, which is the p2p preference
                name: chan if name == _MPI else self._channels[name]
                for name in self._parent._channels
            }
            if old is not None:
                await old.close()
        self._pick_p2p()

    def _pick_p2p(self) -> None:
        assert self._parent is not None and self._parent._p2p is not None
        self._p2p = self._channels[self._parent._p2p.name]

    async def _close_as_child(self) -> None:
        """Close this sub-communicator: its children, its views (failing its own
        waits only), its MPI channel; the parent's channels stay open."""
        for child in list(self._children):
            await child.close()
        for chan in self._channels.values():
            try:
                await chan.close()
            except Exception:  # closing must go on for the other channels
                logger.exception("closing %r failed", chan)
        parent = self._parent
        if parent is not None and self._scope is not None:
            parent._mailbox.disown(self._scope)
            with contextlib.suppress(ValueError):
                parent._children.remove(self)  # type: ignore[arg-type]
        comm, self._own_mpi_comm = self._own_mpi_comm, None
        if comm is not None:
            comm.Free()


def _color_key(entry: Any, rank: int) -> tuple[int | None, int]:
    """A peer's ``[color, key]`` as it came (checked: the peer's own check ran first)."""
    if (
        isinstance(entry, (list, tuple))
        and len(entry) == 2
        and (entry[0] is None or isinstance(entry[0], int))
        and isinstance(entry[1], int)
    ):
        return entry[0], entry[1]
    raise ProtocolError(f"split: peer {rank} sent a malformed color and key: {entry!r}")


def _members_of(entry: Any) -> tuple[int, list[int]]:
    if (
        isinstance(entry, (list, tuple))
        and len(entry) == 2
        and isinstance(entry[0], int)
        and isinstance(entry[1], (list, tuple))
        and all(isinstance(r, int) for r in entry[1])
    ):
        return entry[0], list(entry[1])
    raise ProtocolError(f"create_group: a member sent a malformed rank list: {entry!r}")


def _crc(ranks: tuple[int, ...]) -> int:
    return zlib.crc32(",".join(map(str, ranks)).encode())


async def exchange(ctx: CollectiveContext, value: Any, names: list[int]) -> list[Any]:
    """Every peer sends ``value`` to every other: each learns all values, or exactly
    which peers never came (``names[r]`` is how rank ``r`` is named in errors)."""
    got: list[Any] = [None] * ctx.size
    got[ctx.rank] = value
    others = [p for p in range(ctx.size) if p != ctx.rank]
    receives: dict[asyncio.Future[Any], int] = {
        asyncio.ensure_future(ctx.recv(p, "x")): p for p in others
    }
    work = dict(receives)
    work.update({asyncio.ensure_future(ctx.send(p, "x", value)): p for p in others})
    missing: set[int] = set()
    pending: set[asyncio.Future[Any]] = set(work)
    start = asyncio.get_running_loop().time()
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = task.exception()
                if exc is None:
                    if task in receives:
                        got[receives[task]] = task.result()
                elif isinstance(exc, CommTimeout):
                    missing.add(work[task])
                else:
                    raise exc
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    if missing:
        named = sorted(names[p] for p in missing)
        waited = asyncio.get_running_loop().time() - start
        # create_group agrees inside the new group: name peers as the caller
        # knows them, by their ranks in the parent
        whose = " of the parent" if names != list(range(ctx.size)) else ""
        raise CommTimeout(
            f"{ctx.op} (collective #{ctx.seq}) on peer {names[ctx.rank]}{whose}: peer(s) "
            f"{named}{whose} did not take part within {waited:.3g}s; every peer of the group "
            f"must call {ctx.op} (they never called it, or called another collective first)"
        )
    if not ctx.direct:
        # On storage a peer that comes after the others gave up still finds all
        # their values stored: it must see the abort they left, not form a group.
        await ctx._look_for_abort(None, 0.0)
    return got
