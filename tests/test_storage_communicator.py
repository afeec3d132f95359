"""Communicators over storage: the plan layer picks storage-native or direct
algorithms; a normal close leaves nothing of the run behind, with no peer
losing an object a slower peer still had to read."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np

import fmi_async as fmi
from fmi_async.config import Config
from tests.channels.test_storage_channels import Backend, stored


async def test_normal_close_leaves_no_key_and_loses_nothing(mediated_backend: Backend) -> None:
    name, config = mediated_backend
    run = uuid.uuid4().hex[:12]
    comms = [
        fmi.Communicator(i, 3, config, comm_name="cleanup", run_id=run, timeout=30)
        for i in range(3)
    ]
    prefix = ""

    async def peer(c: fmi.Communicator) -> list[object]:
        nonlocal prefix
        async with c:
            prefix = c._channel(name).prefix + "/"  # type: ignore[attr-defined]
            out: list[object] = [
                await c.bcast(
                    "hello" if c.rank == 2 else None, root=2, algorithm="mediated:put_get"
                ),
                await c.allgather(c.rank, algorithm="mediated:put_get"),
                await c.allreduce(np.full(4, c.rank), algorithm="mediated:root"),
                await c.allreduce(
                    np.full(6, c.rank + 1.0), op=fmi.PROD, algorithm="mediated:split"
                ),
                await c.allreduce(c.rank),  # whatever plan() picks
            ]
            await c.send(f"from {c.rank}", (c.rank + 1) % 3, tag=5)
            out.append(await c.recv((c.rank - 1) % 3, tag=5))
            if c.rank == 0:
                await asyncio.sleep(0.2)  # a slow reader: the others close first
            # The last bcast value is read by the slow peer after the others left the
            # collective; the final barrier of close must keep it until then.
            out.append(
                await c.bcast(
                    [c.rank] * 3 if c.rank == 1 else None, root=1, algorithm="mediated:put_get"
                )
            )
            return out

    results = await asyncio.gather(*(peer(c) for c in comms))
    for r, res in enumerate(results):
        assert res[0] == "hello" and res[1] == [0, 1, 2]
        assert np.array_equal(res[2], np.full(4, 3))
        assert np.array_equal(res[3], np.full(6, 6.0))
        assert res[4] == 3 and res[5] == f"from {(r - 1) % 3}" and res[6] == [1, 1, 1]
    assert prefix and await stored(mediated_backend, prefix) == {}


async def test_fast_prefers_tcp_and_cheap_may_prefer_storage(redis_config: Config) -> None:
    from fmi_async.holepunch.server import RendezvousServer

    async with RendezvousServer(secret=b"s") as server:
        host, port = server.address
        config = redis_config.with_backend("tcp", host=host, port=port)
        config = Config.from_dict({**config.to_dict(), "security": {"secret": "s"}})
        run = uuid.uuid4().hex[:12]
        comms = [fmi.Communicator(i, 4, config, run_id=run, timeout=20) for i in range(4)]
        await asyncio.gather(*(c.open() for c in comms))
        try:
            got = await asyncio.gather(*(c.allreduce(np.arange(100_000.0)) for c in comms))
            assert all(np.array_equal(g, np.arange(100_000.0) * 4) for g in got)
            fast = comms[0].stats()["collectives"]
            assert all("/tcp/" in k for k in fast), fast
            for c in comms:
                c.hint(fmi.Hint.CHEAP)
            got = await asyncio.gather(*(c.bcast("x" if c.rank == 0 else None) for c in comms))
            assert got == ["x"] * 4
            stats = comms[0].stats()
            assert stats["hint"] == "cheap" and stats["predicted"]["usd"] > 0
            assert stats["channels"]["tcp"]["usd"] >= 0 and stats["cost"]["total_usd"] > 0
        finally:
            await asyncio.gather(*(c.close() for c in comms))
