"""The user's object: a group of peers, point-to-point messages and collectives."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from .channels import channel_class
from .channels.base import Channel, Mailbox
from .channels.memory import MemoryHub
from .collectives import direct
from .collectives.base import CollectiveContext
from .config import Config
from .errors import (
    ArgumentError,
    ClosedError,
    CommTimeout,
    ConfigError,
    FMIError,
    RootError,
    SizeMismatchError,
)
from .ops import Op, as_op
from .selection.cost import channel_cost
from .selection.model import load_cost_model
from .selection.plan import Hint, Plan, plan
from .wire import dumps, loads

__all__ = ["Communicator", "P2P_PREFERENCE"]

logger = logging.getLogger(__name__)

# Which enabled channel carries point-to-point traffic when the config does
# not name one: fastest kinds first.
P2P_PREFERENCE = ("memory", "mpi", "tcp", "udp", "redis", "dynamodb", "s3")
OpLike = Op | str | Callable[[Any, Any], Any]


class Communicator:
    """A peer's view of a group of ``num_peers`` peers named ``comm_name``.

    Use it as an async context manager; it opens the configured channels on
    entry and closes them, with everything this peer stored, on exit.
    """

    def __init__(
        self,
        peer_id: int,
        num_peers: int,
        config: Config | dict[str, Any] | str | os.PathLike[str] | None = None,
        comm_name: str = "FMI_WORLD",
        faas_memory: int = 2048,
        hint: Hint = Hint.FAST,
        *,
        run_id: str | None = None,
        timeout: float | None = None,
        hub: MemoryHub | None = None,
    ) -> None:
        if isinstance(num_peers, bool) or not isinstance(num_peers, int) or num_peers < 1:
            raise ArgumentError(f"num_peers must be a positive int, got {num_peers!r}")
        if isinstance(peer_id, bool) or not isinstance(peer_id, int):
            raise ArgumentError(f"peer_id must be an int, got {peer_id!r}")
        if not 0 <= peer_id < num_peers:
            raise ArgumentError(f"peer_id {peer_id} is out of range for {num_peers} peers")
        if not isinstance(comm_name, str) or not comm_name:
            raise ArgumentError("comm_name must be a non-empty string")
        if not isinstance(hint, Hint):
            raise ArgumentError(f"hint must be fmi.Hint.FAST or fmi.Hint.CHEAP, got {hint!r}")
        self.peer_id = peer_id
        self.num_peers = num_peers
        self.comm_name = comm_name
        self.faas_memory = faas_memory
        self.config = Config.load(config)
        if hub is not None and "memory" not in self.config.backends:
            self.config = self.config.with_backend("memory")
        self.run_id = run_id or os.environ.get("FMI_RUN_ID", "default")
        self.timeout = float(timeout) if timeout is not None else self.config.timeout
        self._hint = hint
        self._hub = hub
        self._mailbox = Mailbox(peer_id)
        self._channels: dict[str, Channel] = {}
        self._p2p: Channel | None = None
        self._seq = 0
        self._state = "new"
        self._collectives: Counter[str] = Counter()
        self._predicted_seconds = 0.0
        self._predicted_usd = 0.0
        self._models = load_cost_model(self.config.model, faas_memory)
        self._opened_at: float | None = None

    # ---------------------------------------------------------------- life cycle

    def __repr__(self) -> str:
        chans = ",".join(self._channels) or "-"
        return (
            f"<Communicator {self.comm_name!r} peer={self.peer_id}/{self.num_peers} "
            f"run={self.run_id} channels={chans} {self._state}>"
        )

    @property
    def rank(self) -> int:
        return self.peer_id

    @property
    def size(self) -> int:
        return self.num_peers

    async def open(self) -> None:
        if self._state == "open":
            return
        if self._state == "closed":
            raise ClosedError(f"{self!r} was closed; create a new Communicator")
        names = self.config.enabled()
        if not names:
            raise ConfigError(
                "no channel is enabled: enable a backend in the config (Direct/TCP, Redis, S3, "
                "DynamoDB) or create in-process peers with fmi.local_peers(n)"
            )
        try:
            for name in names:
                cls = channel_class(name)
                extra: dict[str, Any] = {"hub": self._hub} if name == "memory" else {}
                chan = cls(
                    self.peer_id,
                    self.num_peers,
                    self.comm_name,
                    self.run_id,
                    self.config,
                    self._mailbox,
                    **extra,
                )
                self._channels[name] = chan
                await chan.open()
        except BaseException:
            await self._close_channels()
            self._state = "closed"
            raise
        preferred = self.config.channel
        if preferred is not None:
            if preferred not in self._channels:
                raise ConfigError(f"config names channel {preferred!r} but it is not enabled")
            self._p2p = self._channels[preferred]
        else:
            self._p2p = next(self._channels[n] for n in P2P_PREFERENCE if n in self._channels)
        self._state = "open"
        self._opened_at = time.perf_counter()
        logger.debug("%r opened", self)

    async def close(self, *, synchronize: bool | None = None) -> None:
        """Close every channel, deleting whatever this peer stored.

        With a storage channel open, peers first meet in a barrier (bounded
        by the communicator's timeout): otherwise a peer that finishes early
        would delete an object, a broadcast value say, that a slower peer has
        yet to read.  ``async with`` synchronizes on a normal exit and skips
        it when leaving with an exception; ``synchronize`` forces either way.
        """
        if self._state == "closed":
            return
        if synchronize is None:
            synchronize = True
        if (
            synchronize
            and self._state == "open"
            and self.num_peers > 1
            and any(c.kind == "mediated" for c in self._channels.values())
        ):
            storage = next(n for n, c in self._channels.items() if c.kind == "mediated")
            try:
                # Messages only (each consumed, so deleted, by its reader): an
                # object stored for this barrier would be deleted by its owner's
                # close before every peer had read it.
                await self.barrier(channel=storage, algorithm="direct:dissemination")
                for chan in self._channels.values():
                    if hasattr(chan, "keep_sent_messages"):
                        chan.keep_sent_messages = True
            except FMIError as exc:
                logger.warning(
                    "peer %d: closing without the final barrier (%s); objects this peer "
                    "stored are deleted now and peers still reading them will time out",
                    self.peer_id,
                    exc,
                )
        self._state = "closed"
        await self._close_channels()
        logger.debug("%r closed", self)

    async def _close_channels(self) -> None:
        for chan in list(self._channels.values()):
            try:
                await chan.close()
            except Exception:  # closing must go on for the other channels
                logger.exception("closing %r failed", chan)

    async def __aenter__(self) -> Communicator:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(synchronize=exc_type is None)

    def _channel(self, name: str | None = None) -> Channel:
        if self._state != "open":
            raise ClosedError(f"{self!r} is not open; use `async with comm:` or await comm.open()")
        if name is None:
            assert self._p2p is not None
            return self._p2p
        try:
            return self._channels[name]
        except KeyError:
            raise ArgumentError(
                f"channel {name!r} is not enabled; enabled: {sorted(self._channels)}"
            ) from None

    # ---------------------------------------------------------------- hints and stats

    def hint(self, hint: Hint | None = None) -> Hint:
        """Set (and return) the optimisation hint for later operations."""
        if hint is not None:
            if not isinstance(hint, Hint):
                raise ArgumentError(f"hint must be fmi.Hint.FAST or fmi.Hint.CHEAP, got {hint!r}")
            self._hint = hint
        return self._hint

    def stats(self) -> dict[str, Any]:
        """What each channel carried and cost, which plans ran, and the model's predictions.

        ``channels[name]["usd"]`` prices the channel's counted requests, bytes
        and infrastructure share with the cost model; ``cost["faas_usd"]`` is
        this function's own GB-seconds since the communicator opened.
        """
        channels: dict[str, Any] = {}
        total = 0.0
        for name, chan in self._channels.items():
            entry = chan.stats.as_dict()
            entry["usd"] = channel_cost(chan.kind, chan.stats, self._models.channel(name))
            total += entry["usd"]
            channels[name] = entry
        elapsed = 0.0 if self._opened_at is None else time.perf_counter() - self._opened_at
        faas = self._models.faas_cost(elapsed, 1)
        return {
            "peer": self.peer_id,
            "num_peers": self.num_peers,
            "comm_name": self.comm_name,
            "hint": self._hint.value,
            "channels": channels,
            "collectives": dict(self._collectives),
            "predicted": {"seconds": self._predicted_seconds, "usd": self._predicted_usd},
            "cost": {
                "channels_usd": total,
                "faas_usd": faas,
                "total_usd": total + faas,
                "faas_memory_mb": self.faas_memory,
                "seconds_open": elapsed,
            },
        }

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

    def _deadline(self, timeout: float | None) -> float:
        t = self.timeout if timeout is None else timeout
        if t <= 0:
            raise ArgumentError(f"timeout must be positive, got {t}")
        return asyncio.get_running_loop().time() + t

    # ---------------------------------------------------------------- point to point

    async def send(
        self, value: Any, dst: int, tag: int | str = 0, *, timeout: float | None = None
    ) -> None:
        """Send ``value`` to peer ``dst``; matched by ``(source, tag)`` on the other side."""
        self._check_peer(dst, "dst")
        self._check_tag(tag)
        chan = self._channel()
        payload = dumps(value, self.config.serializer)
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
        chan = self._channel()
        t = self.timeout if timeout is None else timeout
        payload = await chan.recv(src, ("u", tag), t)
        return loads(payload)

    # ---------------------------------------------------------------- collectives

    def _begin(
        self,
        op: str,
        timeout: float | None,
        *,
        nbytes: int | None = None,
        operator: Op | None = None,
        value: Any = None,
        root: int = 0,
        algorithm: str | None = None,
        channel: str | None = None,
    ) -> tuple[CollectiveContext, Plan]:
        """Everything synchronous before the first await: the plan is chosen and the
        sequence number taken here, so collectives started together
        (``asyncio.gather``) are numbered in call order on every peer."""
        if self._state != "open":
            raise ClosedError(f"{self!r} is not open; use `async with comm:` or await comm.open()")
        is_array, elements, signature = False, None, ""
        if isinstance(value, np.ndarray):
            is_array, elements = True, int(value.size)
            nbytes = int(value.nbytes)
            signature = f"{value.dtype.str}{list(value.shape)}"
        chosen = plan(
            op,
            nbytes=nbytes,
            num_peers=self.num_peers,
            channels=[(name, chan.kind) for name, chan in self._channels.items()],
            models=self._models,
            operator=operator,
            is_array=is_array,
            elements=elements,
            root=root,
            signature=signature,
            hint=self._hint,
            channel=channel,
            algorithm=algorithm,
        )
        self._seq += 1
        self._collectives[f"{op}/{chosen.channel}/{chosen.family}:{chosen.algorithm}"] += 1
        self._predicted_seconds += chosen.seconds
        self._predicted_usd += chosen.usd
        logger.debug(
            "peer %d: %s #%d plan %s (predicted %.3gs, $%.3g)",
            self.peer_id,
            op,
            self._seq,
            chosen.ident,
            chosen.seconds,
            chosen.usd,
        )
        ctx = CollectiveContext(
            rank=self.peer_id,
            size=self.num_peers,
            seq=self._seq,
            op=op,
            plan=chosen.ident,
            channel=self._channels[chosen.channel],
            deadline=self._deadline(timeout),
            serializer=self.config.serializer,
        )
        return ctx, chosen

    async def _run(self, ctx: CollectiveContext, chosen: Plan, *args: Any) -> Any:
        """Run the chosen algorithm of the chosen family."""
        if chosen.family == "direct":
            module: Any = direct
        else:
            from .collectives import mediated

            module = mediated
        fn = getattr(module, chosen.op)
        if chosen.op == "allreduce" or (
            chosen.family == "direct" and chosen.op in ("reduce", "scan", "exscan")
        ):
            return await fn(ctx, *args, chosen.algorithm)
        return await fn(ctx, *args)

    def _serializable(self, value: Any) -> None:
        """Raise SerializationError now, before any message of the collective is sent."""
        dumps(value, self.config.serializer)

    async def bcast(
        self,
        value: Any = None,
        root: int = 0,
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
    ) -> Any:
        """Peer ``root``'s value, on every peer.

        ``nbytes`` is the size every peer assumes when choosing the plan (only
        the root knows the real one); give the same value on every peer, or
        leave it to the default (``fmi_async.selection.plan.DEFAULT_NBYTES``).
        """
        self._check_root(root, "bcast")
        if self.peer_id == root:
            self._serializable(value)
        ctx, chosen = self._begin(
            "bcast", timeout, nbytes=nbytes, root=root, channel=channel, algorithm=algorithm
        )
        return await self._run(ctx, chosen, value, root)

    async def barrier(
        self,
        *,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
    ) -> None:
        """Return once every peer has entered the barrier."""
        ctx, chosen = self._begin(
            "barrier", timeout, nbytes=0, channel=channel, algorithm=algorithm
        )
        await self._run(ctx, chosen)

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
        self._check_root(root, "gather")
        self._serializable(value)
        ctx, chosen = self._begin(
            "gather", timeout, nbytes=nbytes, root=root, channel=channel, algorithm=algorithm
        )
        result: list[Any] | None = await self._run(ctx, chosen, value, root)
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
        self._check_root(root, "scatter")
        items: list[Any] | None = None
        if self.peer_id == root:
            items = self._check_list(values, "scatter")
            self._serializable(items)
        ctx, chosen = self._begin(
            "scatter", timeout, nbytes=nbytes, root=root, channel=channel, algorithm=algorithm
        )
        return await self._run(ctx, chosen, items, root)

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
    ) -> Any:
        """``op`` over every peer's value, in rank order, on ``root``; ``None`` elsewhere."""
        self._check_root(root, "reduce")
        oper = as_op(op)
        self._serializable(value)
        ctx, chosen = self._begin(
            "reduce",
            timeout,
            nbytes=nbytes,
            operator=oper,
            value=value,
            root=root,
            channel=channel,
            algorithm=algorithm,
        )
        return await self._run(ctx, chosen, value, oper, root)

    async def allreduce(
        self,
        value: Any,
        op: OpLike = "SUM",
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
    ) -> Any:
        """``op`` over every peer's value, in rank order, on every peer."""
        oper = as_op(op)
        self._serializable(value)
        ctx, chosen = self._begin(
            "allreduce",
            timeout,
            nbytes=nbytes,
            operator=oper,
            value=value,
            channel=channel,
            algorithm=algorithm,
        )
        return await self._run(ctx, chosen, value, oper)

    async def allgather(
        self,
        value: Any,
        *,
        nbytes: int | None = None,
        timeout: float | None = None,
        channel: str | None = None,
        algorithm: str | None = None,
    ) -> list[Any]:
        """Every peer's value, in rank order, on every peer."""
        self._serializable(value)
        ctx, chosen = self._begin(
            "allgather", timeout, nbytes=nbytes, channel=channel, algorithm=algorithm
        )
        result: list[Any] = await self._run(ctx, chosen, value)
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
        items = self._check_list(values, "alltoall")
        self._serializable(items)
        ctx, chosen = self._begin(
            "alltoall", timeout, nbytes=nbytes, channel=channel, algorithm=algorithm
        )
        result: list[Any] = await self._run(ctx, chosen, items)
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
    ) -> Any:
        """Reduce element-wise across peers; peer ``i`` gets part ``i``.

        ``value`` is a numpy array, split along its first axis into
        ``num_peers`` parts (``numpy.array_split``: the first parts are one row
        longer when the length does not divide), or a list of ``num_peers`` values.
        """
        oper = as_op(op)
        if isinstance(value, np.ndarray):
            if value.ndim == 0:
                raise SizeMismatchError("reduce_scatter needs an array with at least one axis")
            parts = list(np.array_split(value, self.num_peers))
        else:
            parts = self._check_list(value, "reduce_scatter")
        self._serializable(parts)
        ctx, chosen = self._begin(
            "reduce_scatter",
            timeout,
            nbytes=nbytes,
            operator=oper,
            value=value if isinstance(value, np.ndarray) else None,
            channel=channel,
            algorithm=algorithm,
        )
        return await self._run(ctx, chosen, parts, oper)

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
        oper = as_op(op)
        self._serializable(value)
        ctx, chosen = self._begin(
            "scan",
            timeout,
            nbytes=nbytes,
            operator=oper,
            value=value,
            channel=channel,
            algorithm=algorithm,
        )
        return await self._run(ctx, chosen, value, oper)

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
        oper = as_op(op)
        self._serializable(value)
        ctx, chosen = self._begin(
            "exscan",
            timeout,
            nbytes=nbytes,
            operator=oper,
            value=value,
            channel=channel,
            algorithm=algorithm,
        )
        return await self._run(ctx, chosen, value, oper)
