"""What tests share besides fixtures: groups of communicators per channel.

``tcp_group``, ``udp_group`` and ``storage_group`` open ``n`` communicators on
one channel (a rendezvous server or a storage backend started for the test);
``nat_tcp_group`` and ``nat_udp_group`` put each peer behind its own simulated
NAT box; ``GROUPS`` and ``STORAGE_SIZES`` are what the ``group`` fixture of
``conftest.py`` runs the channel-generic suites over.  Tests import these from
here, never from ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

import fmi_async as fmi
from fmi_async.channels.base import Channel
from fmi_async.natsim import NATBehavior
from fmi_async.wire import dumps, loads

REPO = Path(__file__).resolve().parent.parent
"""The repository's root (docs, examples, config live there)."""


# ---------------------------------------------------------------- values over one channel


async def send(chan: Channel, dst: int, value: Any, tag: int = 0) -> None:
    """``value`` to ``dst`` as a user message with ``tag``, straight on a channel."""
    await chan.send(dst, ("u", tag), dumps(value))


async def recv(chan: Channel, src: int, tag: int = 0, timeout: float = 5.0) -> Any:
    """The next value ``src`` sent with ``tag`` on ``chan``."""
    return loads(await chan.recv(src, ("u", tag), timeout))


def same(a: Any, b: Any) -> bool:
    """Exact structural equality: types, numpy dtypes and values, nested containers."""
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


GroupFactory = Callable[..., AbstractAsyncContextManager[list[fmi.Communicator]]]


async def close_all(parts: Sequence[Any], ok: bool) -> None:
    """Close every communicator (or NAT box) of a group, all of them even if some fail.

    After a clean test body a failed close fails the test: teardown does not
    swallow errors.  After a failing body (peers may be mid-collective) the
    final barrier is skipped and the body's own error is the one reported.
    """
    if parts and isinstance(parts[0], fmi.Communicator):
        closing = [c.close(synchronize=ok) for c in parts]
    else:
        closing = [p.close() for p in parts]
    results = await asyncio.gather(*closing, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if ok and errors:
        raise errors[0]


# Every test peer connects from 127.0.0.1: at 16 peers on a loaded machine the
# connections still proving themselves outnumber a public server's per-source
# limit (32), which then evicts them; a test server allows one address more.
TEST_PER_SOURCE = 1024


@asynccontextmanager
async def _rendezvous_group(
    backend: str, n: int, loop_errors: tuple[str, ...] | None, **kwargs: Any
) -> AsyncIterator[list[fmi.Communicator]]:
    """n communicators over ``backend``, found through a rendezvous server."""
    from fmi_async.holepunch.server import RendezvousServer

    server = RendezvousServer(secret=b"test-secret", max_unproven_per_source=TEST_PER_SOURCE)
    await server.start("127.0.0.1", 0)
    host, port = server.address[:2]
    config = fmi.Config.from_dict(
        {
            "backends": {backend: {"enabled": True, "host": host, "port": port}},
            "security": {"secret": "test-secret"},
        }
    )
    run_id = uuid.uuid4().hex[:12]
    comms = [fmi.Communicator(i, n, config, run_id=run_id, **kwargs) for i in range(n)]
    watch = _loop_errors_fail(loop_errors) if loop_errors else contextlib.nullcontext()
    async with watch:
        ok = False
        try:
            await asyncio.gather(*(c.open() for c in comms))
            yield comms
            ok = True
        finally:
            try:
                await close_all(comms, ok)
            finally:
                await server.close()


def tcp_group(n: int, **kwargs: Any) -> AbstractAsyncContextManager[list[fmi.Communicator]]:
    """n communicators over the TCP channel, found through a rendezvous server."""
    return _rendezvous_group("TCP", n, None, **kwargs)


def udp_group(n: int, **kwargs: Any) -> AbstractAsyncContextManager[list[fmi.Communicator]]:
    """n communicators over the UDP channel, found through a rendezvous server."""
    return _rendezvous_group("UDP", n, _UDP_MODULES, **kwargs)


@asynccontextmanager
async def _loop_errors_fail(modules: tuple[str, ...]) -> AsyncIterator[None]:
    """Datagrams are handled in loop callbacks, where an exception is only logged:
    collect those raised in ``modules`` and fail the test with them."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    errors: list[BaseException] = []

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        tb = exc.__traceback__ if exc is not None else None
        while tb is not None and exc is not None:
            if tb.tb_frame.f_code.co_filename.endswith(modules):
                errors.append(exc)
                return
            tb = tb.tb_next
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
    assert not errors, f"exceptions in udp loop callbacks: {errors!r}"


_UDP_MODULES = (
    "channels/udp/channel.py",
    "channels/udp/reliable.py",
    "channels/udp/sender.py",
    "channels/udp/receiver.py",
    "channels/udp/datagram.py",
)


GROUPS: dict[str, GroupFactory] = {
    "memory": fmi.local_peers,
    "tcp": tcp_group,
    "udp": udp_group,
}

# Storage groups run the same suites through Communicators whose only channel
# is the storage backend, so plan() chooses between the direct family over
# storage and the storage-native family.  The moto server answers a few hundred
# requests a second and every AWS-backed group pays for its clients and its job
# lease, so S3 and DynamoDB run one size by default: three (a group that is not
# a power of two, which folds).  One peer and the power-of-two shapes run on
# redis and the direct channels (P = 1 and 2 on moto with --slow).
STORAGE_SIZES: dict[str, set[int]] = {
    "redis": {1, 2, 3, 4, 5, 8},
    "s3": {3},
    "dynamodb": {3},
}

# A suite marked both_loops runs every size on asyncio.  On uvloop it runs the
# sizes below (the rest with --slow): the event loop matters to the channels'
# transports and callbacks, which a group that folds (3) and the largest group
# exercise; the algorithms' shapes at every size do not depend on the loop.
# UDP's 16 peers run on asyncio only; the AWS-backed groups never run on uvloop
# by default (aiobotocore's code, not ours, talks to the loop there).
UVLOOP_SIZES: dict[str, set[int]] = {
    "memory": {3, 16},
    "tcp": {3, 16},
    "udp": {3, 8},
    "redis": {3},
    "s3": set(),
    "dynamodb": set(),
}


def storage_group(config: fmi.Config) -> GroupFactory:
    @asynccontextmanager
    async def group(n: int, **kwargs: Any) -> AsyncIterator[list[fmi.Communicator]]:
        run_id = uuid.uuid4().hex[:12]
        comms = [fmi.Communicator(i, n, config, run_id=run_id, **kwargs) for i in range(n)]
        ok = False
        try:
            await asyncio.gather(*(c.open() for c in comms))
            yield comms
            ok = True
        finally:
            await close_all(comms, ok)

    return group


NATKind = str | NATBehavior


@asynccontextmanager
async def _behind_nats(
    backend: str,
    kinds: Sequence[NATKind],
    n: int,
    options: dict[str, Any],
    loop_errors: tuple[str, ...] | None,
    **kwargs: Any,
) -> AsyncIterator[list[fmi.Communicator]]:
    """``n`` communicators on ``backend``, each behind its own simulated NAT box
    (``kinds`` in turn), pairing through one rendezvous server."""
    from fmi_async.holepunch.server import RendezvousServer
    from fmi_async.natsim import NATBox

    server = RendezvousServer(secret=b"test-secret", max_unproven_per_source=TEST_PER_SOURCE)
    await server.start("127.0.0.1", 0)
    host, port = server.address[:2]
    boxes = [NATBox(kinds[i % len(kinds)]) for i in range(n)]
    run_id = uuid.uuid4().hex[:12]
    comms: list[fmi.Communicator] = []
    watch = _loop_errors_fail(loop_errors) if loop_errors else contextlib.nullcontext()
    ok = False
    async with watch:
        try:
            for box in boxes:
                await box.start()
            for i, box in enumerate(boxes):
                backend_options = {"host": host, "port": port, "nat": box.options(), **options}
                config = fmi.Config.from_dict(
                    {
                        "backends": {backend: backend_options},
                        "security": {"secret": "test-secret"},
                    }
                )
                comms.append(fmi.Communicator(i, n, config, run_id=run_id, **kwargs))
            await asyncio.gather(*(c.open() for c in comms))
            yield comms
            ok = True
        finally:
            try:
                await close_all(comms, ok)
            finally:
                await close_all(boxes, ok)
                await server.close()


def _default_punch_timeout(kinds: Sequence[NATKind]) -> float:
    """How long a pair tries to punch before it goes through the relay.

    Where every box maps endpoint-independently every pair can be punched and
    the tests expect direct pairs, so the bound is generous (a loaded CI host
    must not turn a slow punch into a relay).  Where every box is symmetric
    no pair can be punched and each waits this long for nothing, so it is
    short; a mix gets a bound in between.
    """
    from fmi_async.natsim import PRESETS

    behaviors = [PRESETS[k] if isinstance(k, str) else k for k in kinds]
    independent = [b.mapping == "endpoint-independent" for b in behaviors]
    if all(independent):
        return 5.0
    return 1.0 if any(independent) else 0.3


def nat_tcp_group(kind: str, punch_timeout: float | None = None) -> GroupFactory:
    """A factory like ``tcp_group`` with every peer behind its own simulated NAT box.

    ``kind`` is a :data:`fmi_async.natsim.PRESETS` name; pairs that
    cannot be punched within ``punch_timeout`` go through the server's relay.
    """
    if punch_timeout is None:
        punch_timeout = _default_punch_timeout([kind])
    options = {"punch_timeout": punch_timeout}

    def group(n: int, **kwargs: Any) -> AbstractAsyncContextManager[list[fmi.Communicator]]:
        return _behind_nats("TCP", [kind], n, options, None, **kwargs)

    return group


def nat_udp_group(
    kind: NATKind | Sequence[NATKind], punch_timeout: float | None = None, **udp: Any
) -> GroupFactory:
    """A factory like ``udp_group`` with every peer behind its own simulated NAT box.

    ``kind`` is a :data:`fmi_async.natsim.PRESETS` name or a
    :class:`~fmi_async.natsim.NATBehavior` (say with seeded loss),
    or a list of them, one per peer in turn.  The channel runs with its
    default ``traversal: auto``, so every pair punches (every peer is behind
    NAT); pairs that cannot be punched within ``punch_timeout`` go through the
    server's UDP relay.  ``udp`` adds options of ``backends.UDP``.
    """
    kinds = [kind] if isinstance(kind, str | NATBehavior) else list(kind)
    if punch_timeout is None:
        punch_timeout = _default_punch_timeout(kinds)
    options = {"punch_timeout": punch_timeout, **udp}

    def group(n: int, **kwargs: Any) -> AbstractAsyncContextManager[list[fmi.Communicator]]:
        return _behind_nats("UDP", kinds, n, options, _NAT_UDP_MODULES, **kwargs)

    return group


_NAT_UDP_MODULES = (
    *_UDP_MODULES,
    "channels/udp/discovery.py",
    "holepunch/udp.py",
    "natsim/box.py",
    "natsim/client.py",
    "holepunch/server.py",
)
