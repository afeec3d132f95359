"""The job lease: one job per communicator name and run id, on every backend.

The protocol is tested without I/O (every order of two jobs' claims), then
each backend is run for real: an in-process rendezvous server, the session's
redis-server and moto server.  Every scenario is checked from every peer's
side: the peers of the job that must fail, and those of the job that must
not be disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from fmi_async.channels.registry import channel_class
from fmi_async.channels.storage import storage_prefix
from fmi_async.config import Config
from fmi_async.errors import (
    AuthenticationError,
    BackendError,
    CommTimeout,
    ConfigError,
    FMIError,
    JobConflictError,
    JobConflictTimeout,
    JobMismatchError,
    LeaseLostError,
    ProtocolError,
)
from fmi_async.holepunch import protocol as p
from fmi_async.holepunch.client import RendezvousClient
from fmi_async.holepunch.leases import LeaseTable
from fmi_async.holepunch.server import RendezvousServer
from fmi_async.jobs.lease import (
    JobLease,
    RendezvousLease,
    StoreLease,
    lease_for,
    settle_for,
)
from fmi_async.jobs.record import (
    POISON_LINGER,
    LeaseRecord,
    Step,
    claim,
    observe,
    refresh,
    release,
)
from fmi_async.jobs.stores import DynamoDBStore, RedisStore, S3Store, record_name

SECRET = "lease-secret"
BACKENDS = ("rendezvous", "redis", "s3", "dynamodb")
ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- the protocol, sans-IO


def _claim(
    rec: LeaseRecord | None, peer: int, nonce: str, num_peers: int, now: float, **kw: Any
) -> Step:
    args: dict[str, Any] = {
        "hold_until": now + 10,
        "ttl": 30.0,
        "settle": 0.0,
        "new_epoch": f"e{nonce}",
    }
    args.update(kw)
    return claim(rec, peer=peer, nonce=nonce, num_peers=num_peers, now=now, **args)


def test_record_forms_then_is_granted_and_released() -> None:
    s0 = _claim(None, 0, "a", 2, 0.0)
    assert s0.outcome == "joined" and s0.write and s0.record is not None
    assert s0.record.epoch == "ea" and s0.record.missing() == [1]
    s1 = _claim(s0.record, 1, "b", 2, 0.1)
    assert s1.outcome == "granted" and s1.record is not None
    rec = s1.record
    assert rec.state == "complete" and rec.epoch == "ea" and rec.expires == pytest.approx(30.1)
    assert observe(rec, peer=0, nonce="a", epoch="ea", now=0.2).outcome == "granted"
    # a retried claim of the same instance is the same slot, not a conflict
    assert _claim(rec, 0, "a", 2, 0.3).outcome == "granted"
    r0 = release(rec, peer=0, nonce="a", epoch="ea", now=1.0)
    assert r0.outcome == "released" and r0.record is not None and r0.record.released == {0}
    r1 = release(r0.record, peer=1, nonce="b", epoch="ea", now=1.1)
    assert r1.outcome == "released" and r1.write and r1.record is None  # the last one deletes


def test_conflicts_poison_a_forming_record_and_leave_a_settled_one_alone() -> None:
    forming = _claim(None, 0, "a", 3, 0.0).record
    poisoned = _claim(forming, 0, "x", 3, 0.1)
    assert poisoned.outcome == "poisoned" and poisoned.write and poisoned.record is not None
    assert poisoned.record.expires == pytest.approx(0.1 + POISON_LINGER)
    assert observe(poisoned.record, peer=0, nonce="a", epoch="ea", now=0.2).outcome == "poisoned"
    assert _claim(poisoned.record, 1, "b", 3, 0.3).outcome == "poisoned"
    # once the poison lingered out, a new job starts afresh
    fresh = _claim(poisoned.record, 1, "b", 3, 0.1 + POISON_LINGER + 0.01)
    assert fresh.outcome == "joined" and fresh.record is not None and fresh.record.epoch == "eb"

    rec = _claim(_claim(None, 0, "a", 2, 0.0).record, 1, "b", 2, 0.0).record
    busy = _claim(rec, 1, "y", 2, 1.0)
    assert busy.outcome == "busy" and not busy.write
    assert _claim(rec, 1, "y", 3, 1.0).outcome == "mismatch"


def test_settle_window_poisons_a_complete_group() -> None:
    rec = _claim(None, 0, "a", 2, 0.0, settle=1.0).record
    done = _claim(rec, 1, "b", 2, 0.1, settle=1.0)
    assert done.outcome == "settling"
    late = _claim(done.record, 0, "x", 2, 0.5, settle=1.0)
    assert late.outcome == "poisoned"
    assert _claim(done.record, 0, "x", 2, 1.2, settle=1.0).outcome == "busy"
    assert observe(done.record, peer=1, nonce="b", epoch="ea", now=1.2).outcome == "granted"


def test_mismatch_while_forming_poisons_for_everyone() -> None:
    rec = _claim(None, 0, "a", 3, 0.0).record
    step = _claim(rec, 1, "b", 2, 0.1)
    assert step.outcome == "poisoned" and step.record is not None
    assert step.record.poison == "mismatch"
    assert "num_peers=2" in step.record.reason and "num_peers=3" in step.record.reason


def test_refresh_restores_extends_and_detects_loss() -> None:
    restored = refresh(None, peer=1, nonce="b", epoch="ea", num_peers=2, now=5.0, ttl=3.0)
    assert restored.outcome == "granted" and restored.write and restored.record is not None
    assert restored.record.slots == {1: "b"} and restored.record.state == "complete"
    again = refresh(restored.record, peer=0, nonce="a", epoch="ea", num_peers=2, now=5.1, ttl=3.0)
    assert again.write and again.record is not None and again.record.slots == {0: "a", 1: "b"}
    quiet = refresh(again.record, peer=0, nonce="a", epoch="ea", num_peers=2, now=5.2, ttl=3.0)
    assert quiet.outcome == "granted" and not quiet.write  # refreshed lately by another peer
    later = refresh(again.record, peer=0, nonce="a", epoch="ea", num_peers=2, now=6.5, ttl=3.0)
    assert later.write and later.record is not None and later.record.expires == 9.5
    other = refresh(again.record, peer=0, nonce="a", epoch="eZ", num_peers=2, now=5.2, ttl=3.0)
    assert other.outcome == "lost"


def test_a_forming_peer_that_gives_up_frees_its_slot() -> None:
    rec = _claim(_claim(None, 0, "a", 3, 0.0).record, 1, "b", 3, 0.0).record
    freed = release(rec, peer=0, nonce="a", epoch="", now=0.5)
    assert freed.record is not None and freed.record.slots == {1: "b"}
    assert _claim(freed.record, 0, "c", 3, 0.6).outcome == "joined"  # a new instance, no poison
    gone = release(freed.record, peer=1, nonce="b", epoch="ea", now=0.7)
    assert gone.write and gone.record is None


def _run_orders(num_peers: int, settle: float) -> list[dict[tuple[str, int], str]]:
    """Two jobs' claims in every order, then one observation after any settle window."""
    claimants = [(job, peer) for job in "AB" for peer in range(num_peers)]
    results = []
    for order in itertools.permutations(claimants):
        rec: LeaseRecord | None = None
        held: dict[tuple[str, int], str] = {}
        final: dict[tuple[str, int], str] = {}
        for i, (job, peer) in enumerate(order):
            step = _claim(rec, peer, f"{job}{peer}", num_peers, i * 0.01, settle=settle)
            if step.write:
                rec = step.record
            if step.outcome in ("joined", "settling", "granted"):
                assert step.record is not None
                held[(job, peer)] = step.record.epoch
            else:
                final[(job, peer)] = step.outcome
        for (job, peer), epoch in held.items():
            seen = observe(rec, peer=peer, nonce=f"{job}{peer}", epoch=epoch, now=settle + 1)
            final[(job, peer)] = f"granted:{epoch}" if seen.outcome == "granted" else seen.outcome
        results.append(final)
    return results


@pytest.mark.parametrize("num_peers", [2, 3])
def test_every_order_of_two_jobs(num_peers: int) -> None:
    for final in _run_orders(num_peers, settle=0.0):
        groups: dict[str, list[tuple[str, int]]] = {}
        for who, outcome in final.items():
            if outcome.startswith("granted:"):
                groups.setdefault(outcome, []).append(who)
            else:
                assert outcome in ("poisoned", "busy"), outcome
        # without a settle window a mixed group may form (the documented limit), but
        # always a whole one: exactly num_peers peers, one per peer id
        assert len(groups) <= 1
        for members in groups.values():
            assert sorted(peer for _, peer in members) == list(range(num_peers))
    for final in _run_orders(num_peers, settle=1.0):
        # every straggler arrived inside the window: nobody runs with a stranger
        assert set(final.values()) == {"poisoned"}, final


def test_record_encoding_and_garbage() -> None:
    rec = _claim(_claim(None, 0, "a", 2, 0.0).record, 1, "b", 2, 0.0).record
    assert rec is not None
    rec = replace(rec, released=frozenset({1}))
    assert LeaseRecord.decode(rec.encode()) == rec
    for garbage in (b"", b"[]", b'{"v": 2}', b'{"v": 1, "epoch": "e"}', b"\xff"):
        with pytest.raises(BackendError, match="malformed"):
            LeaseRecord.decode(garbage)


def test_lease_table_is_bounded_and_expires() -> None:
    table = LeaseTable(max_records=2)
    kw: dict[str, Any] = {"num_peers": 2, "hold_until": 1.0, "ttl": 5.0, "settle": 0.0}
    assert table.claim(("c", "1"), peer=0, nonce="a", now=0.0, **kw) is not None
    assert table.claim(("c", "2"), peer=0, nonce="a", now=0.0, **kw) is not None
    assert table.claim(("c", "3"), peer=0, nonce="a", now=0.5, **kw) is None  # full
    step = table.claim(("c", "3"), peer=0, nonce="a", now=1.5, **kw)  # the others expired
    assert step is not None and step.outcome == "joined" and len(table) == 1


def test_settle_for() -> None:
    job = Config().job
    assert settle_for(job, "default", 4) == 0.5  # no run id given: collisions are likely
    assert settle_for(job, "3f2a", 4) == 0.0
    assert settle_for(job, "default", 1) == 0.0  # a group of one cannot mix
    assert settle_for(replace(job, settle=0.2), "3f2a", 4) == 0.2


# ---------------------------------------------------------------- configuration and protocol


def test_job_config_section() -> None:
    assert Config().job.on_conflict == "wait" and Config().job.lease_ttl == 30.0
    cfg = Config.from_dict({"job": {"on_conflict": "error", "lease_ttl": 2, "settle": 0}})
    assert (cfg.job.on_conflict, cfg.job.lease_ttl, cfg.job.settle) == ("error", 2.0, 0.0)
    assert Config.from_dict(cfg.to_dict()).job == cfg.job
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['ttl'\] in job"):
        Config.from_dict({"job": {"ttl": 3}})
    for bad in (
        {"on_conflict": "retry"},
        {"lease_ttl": 0},
        {"lease_ttl": float("nan")},
        {"lease_ttl": "5"},
        {"settle": -1},
    ):
        with pytest.raises(ConfigError, match="job"):
            Config.from_dict({"job": bad})


def test_lease_for_picks_one_backend() -> None:
    tcp = {"host": "127.0.0.1", "port": 4000}
    s3 = {"bucket_name": "b"}
    ddb = {"table_name": "t"}

    def pick(backends: dict[str, Any]) -> JobLease | None:
        config = {"backends": backends, "security": {"secret": "s"}}
        return lease_for(Config.from_dict(config), "c", "r", 0, 2)

    assert isinstance(pick({"TCP": tcp, "Redis": {}}), RendezvousLease)
    with pytest.raises(ConfigError, match=r"security\.secret"):  # refused before any claim
        lease_for(Config.from_dict({"backends": {"TCP": tcp}}), "c", "r", 0, 2)
    assert isinstance(pick({"UDP": tcp, "S3": s3}), RendezvousLease)
    redis_first = pick({"Redis": {}, "S3": s3, "DynamoDB": ddb})
    assert isinstance(redis_first, StoreLease) and redis_first.backend == "redis"
    ddb_first = pick({"S3": s3, "DynamoDB": ddb})
    assert isinstance(ddb_first, StoreLease) and ddb_first.backend == "dynamodb"
    only_s3 = pick({"S3": s3})
    assert isinstance(only_s3, StoreLease) and only_s3.backend == "s3"
    assert pick({"Memory": {}}) is None
    assert pick({"TCP": {**tcp, "enabled": False}, "Memory": {}}) is None
    with pytest.raises(ConfigError, match="host and port"):
        pick({"TCP": {"host": "127.0.0.1"}})
    with pytest.raises(ConfigError, match="bucket_name"):
        pick({"S3": {}})


def test_epoch_qualified_run_ids_fit_every_name() -> None:
    run = "default.0123456789ab"
    assert storage_prefix("FMI_WORLD", run) == "fmi/FMI_WORLD/default.0123456789ab"
    assert record_name("FMI_WORLD", "default") == "fmi/FMI_WORLD/default/lease"
    signed = p.sign(p.Register("FMI_WORLD", run, 0, ("127.0.0.1", 1)), b"k")
    assert p.verify(p.Decoder().feed(p.encode(signed))[0], b"k")


def test_claim_messages_are_checked_and_signed() -> None:
    claim_msg = p.Claim("c", "r", 1, 2, b"n" * 16, True, 30.0, 0.0, 5.0)
    signed = p.sign(claim_msg, b"k")
    assert isinstance(signed, p.Claim)
    assert p.verify(signed, b"k") and not p.verify(signed, b"other")
    assert not p.verify(replace(signed, num_peers=3), b"k")
    assert p.verify(replace(signed, timeout=9.0), b"k")  # the timeout is not covered
    body = {"type": "claim", "comm": "c", "run_id": "r", "peer": 2, "num_peers": 2}
    with pytest.raises(ProtocolError, match="out of range"):
        p.decode_body(json_to_msgpack(body | {"nonce": b"n" * 16, "wait": False}))
    with pytest.raises(ProtocolError, match="nonce"):
        p.decode_body(json_to_msgpack(body | {"peer": 0, "nonce": b"n", "wait": False}))


def json_to_msgpack(body: dict[str, Any]) -> bytes:
    import msgpack

    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


# ---------------------------------------------------------------- every backend, for real


@dataclass
class Env:
    """One backend under test: configs for jobs, and direct access to the stored record."""

    name: str
    base: dict[str, Any]
    server: RendezvousServer | None = None

    def config(self, **job: Any) -> Config:
        return Config.from_dict({**self.base, "job": {"lease_ttl": 5.0, "settle": 0.0, **job}})

    def store(self, comm: str, run: str) -> Any:
        key = record_name(comm, run)
        opts: Any = channel_class(self.name).parse_options(self.config())
        if self.name == "redis":
            return RedisStore(opts, key)
        if self.name == "s3":
            return S3Store(opts, key)
        return DynamoDBStore(opts, key)

    async def record(self, comm: str, run: str = "default") -> LeaseRecord | None:
        if self.server is not None:
            return self.server.leases.table.get((comm, run), time.monotonic())
        store = self.store(comm, run)
        await store.open()
        try:
            data, _ = await store.read()
        finally:
            await store.close()
        if data is None:
            return None
        rec = LeaseRecord.decode(data)
        return rec if rec.live(time.time()) else None

    async def overwrite(self, comm: str, rec: LeaseRecord | None, run: str = "default") -> None:
        """Replace (or delete) the stored record behind the peers' backs, atomically."""
        if self.server is not None:
            table = self.server.leases.table
            if rec is None:
                table.records.pop((comm, run), None)
            else:
                table.records[(comm, run)] = replace(rec, expires=time.monotonic() + 60)
            return
        store = self.store(comm, run)
        await store.open()
        try:
            for _attempt in range(20):  # the peers' refreshes may write in between
                _, token = await store.read()
                assert token is not None
                if rec is None:
                    if await store.delete(token):
                        return
                else:
                    rec = replace(rec, expires=time.time() + 60)
                    if await store.replace(rec.encode(), token, rec.expires) is not None:
                        return
            raise AssertionError("could not overwrite the record")
        finally:
            await store.close()


_made: list[JobLease] = []  # every lease a test made; released when it ends


@pytest.fixture(autouse=True)
async def _release_leftovers() -> AsyncIterator[None]:
    yield
    await _release_made()


async def _release_made() -> None:
    made = list(_made)
    _made.clear()
    await asyncio.gather(*(lease.release() for lease in made))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def storage_base(backend: str, request: pytest.FixtureRequest) -> dict[str, Any] | None:
    if backend == "rendezvous":
        return None
    config: Config = request.getfixturevalue(f"{backend}_config")
    return config.to_dict()


async def _start_server(port: int = 0) -> RendezvousServer:
    server = RendezvousServer(secret=SECRET.encode())
    await server.start("127.0.0.1", port)
    return server


@pytest.fixture
async def env(backend: str, storage_base: dict[str, Any] | None) -> AsyncIterator[Env]:
    if storage_base is not None:
        yield Env(backend, storage_base)
        return
    server = await _start_server()
    host, port = server.address
    base = {
        "backends": {"TCP": {"enabled": True, "host": host, "port": port}},
        "security": {"secret": SECRET},
    }
    try:
        yield Env("tcp", base, server)
    finally:
        await _release_made()  # while the server still runs
        await server.close()


def job(
    config: Config, comm: str, num_peers: int, peers: Sequence[int] | None = None
) -> list[JobLease]:
    leases = []
    for peer in range(num_peers) if peers is None else peers:
        lease = lease_for(config, comm, "default", peer, num_peers)
        assert lease is not None
        leases.append(lease)
    _made.extend(leases)
    return leases


async def acquire(leases: Sequence[JobLease], timeout: float = 10.0) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    return await asyncio.gather(
        *(lease.acquire(deadline) for lease in leases), return_exceptions=True
    )


async def release_all(leases: Sequence[JobLease]) -> None:
    await asyncio.gather(*(lease.release() for lease in leases))


class Lost:
    """Collects on_lost errors; ``await lost.wait(n, seconds)`` until n arrived."""

    def __init__(self) -> None:
        self.errors: list[FMIError] = []
        self._event = asyncio.Event()

    def __call__(self, error: FMIError) -> None:
        self.errors.append(error)
        self._event.set()

    async def wait(self, count: int, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while len(self.errors) < count:
                    self._event.clear()
                    await self._event.wait()


def name() -> str:
    return f"lease-{uuid.uuid4().hex[:8]}"


async def test_peers_share_one_epoch(env: Env) -> None:
    comm = name()
    leases = job(env.config(), comm, 3)
    epochs = await acquire(leases)
    assert len(set(epochs)) == 1 and all(isinstance(e, str) for e in epochs), epochs
    epoch = epochs[0]
    assert len(epoch) == 12 and int(epoch, 16) >= 0
    assert [lease.epoch for lease in leases] == epochs
    rec = await env.record(comm)
    assert rec is not None and rec.state == "complete" and rec.epoch == epoch
    assert sorted(rec.slots) == [0, 1, 2] and len(set(rec.slots.values())) == 3
    await leases[0].release()
    rec = await env.record(comm)
    assert rec is not None and rec.released == {0}
    await release_all(leases[1:])
    assert await env.record(comm) is None  # the last release deleted it


async def test_second_job_with_on_conflict_error_fails_fast(env: Env) -> None:
    comm = name()
    first = job(env.config(), comm, 2)
    epochs = await acquire(first)
    lost: list[FMIError] = []
    for lease in first:
        lease.on_lost(lost.append)
    start = time.monotonic()
    second = await acquire(job(env.config(on_conflict="error"), comm, 2))
    elapsed = time.monotonic() - start
    assert all(type(e) is JobConflictError for e in second), second
    assert all("another live job holds" in str(e) and "run_id" in str(e) for e in second)
    assert elapsed < 2.0
    rec = await env.record(comm)
    assert rec is not None and rec.epoch == epochs[0] and rec.state == "complete"
    assert not lost
    await release_all(first)


async def test_second_job_waits_for_the_first_to_close(env: Env) -> None:
    comm = name()
    first = job(env.config(), comm, 2)
    first_epochs = await acquire(first)
    second = job(env.config(), comm, 2)
    waiting = asyncio.ensure_future(acquire(second, timeout=15.0))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    await first[0].release()
    await asyncio.sleep(0.3)
    assert not waiting.done()  # one peer of the first job is still open
    released = time.monotonic()
    await first[1].release()
    epochs = await asyncio.wait_for(waiting, 5.0)
    waited = time.monotonic() - released
    assert len(set(epochs)) == 1 and isinstance(epochs[0], str), epochs
    assert epochs[0] != first_epochs[0]
    assert waited < 1.5, f"the second job got the lease {waited:.2f}s after the first closed"
    await release_all(second)


async def test_waiting_past_the_deadline_is_a_timeout_and_a_conflict(env: Env) -> None:
    comm = name()
    first = job(env.config(), comm, 1)
    await acquire(first)
    start = time.monotonic()
    [error] = await acquire(job(env.config(), comm, 1), timeout=0.6)
    assert isinstance(error, JobConflictTimeout), error
    assert isinstance(error, TimeoutError) and isinstance(error, JobConflictError)
    assert 0.5 < time.monotonic() - start < 2.0
    await release_all(first)


@pytest.mark.aws_split("settle")  # S3 and DynamoDB take one each
@pytest.mark.parametrize("settle", [0.0, 0.5])
async def test_two_jobs_started_at_the_same_time(env: Env, settle: float) -> None:
    num_peers = 3
    for _round in range(2):
        comm = name()
        config = env.config(on_conflict="error", settle=settle)
        jobs = {"A": job(config, comm, num_peers), "B": job(config, comm, num_peers)}
        everyone = [(tag, lease) for tag, leases in jobs.items() for lease in leases]
        results = await acquire([lease for _, lease in everyone], timeout=5.0)
        groups: dict[str, set[tuple[str, int]]] = {}
        for (tag, lease), result in zip(everyone, results, strict=True):
            if isinstance(result, str):
                groups.setdefault(result, set()).add((tag, lease.peer_id))
            else:
                assert isinstance(result, JobConflictError), result
        for members in groups.values():
            assert sorted(peer for _, peer in members) == list(range(num_peers)), groups
            if settle:  # stragglers arrived inside the window: no group mixes two jobs
                assert len({tag for tag, _ in members}) == 1, groups
        if any("at the same time" in str(r) for r in results):
            assert not groups, f"a poisoned formation let a group run: {groups}"
        await release_all([lease for _, lease in everyone])


async def test_num_peers_mismatch_fails_every_peer_fast(env: Env) -> None:
    comm = name()
    config = env.config()
    # the disagreeing peer last: the others have formed part of the group already
    good = job(config, comm, 3, peers=[0, 2])
    early = asyncio.ensure_future(acquire(good))
    await asyncio.sleep(0.3)
    start = time.monotonic()
    [late] = await acquire(job(config, comm, 2, peers=[1]))
    results = [*await asyncio.wait_for(early, 5.0), late]
    assert time.monotonic() - start < 2.0  # nobody waited out the 10 s deadline
    assert all(isinstance(r, JobMismatchError) for r in results), results
    assert all("num_peers=2" in str(r) and "num_peers=3" in str(r) for r in results)
    # the disagreeing peer first
    comm = name()
    results = await acquire([*job(config, comm, 2, peers=[1]), *job(config, comm, 3, peers=[0, 2])])
    assert all(isinstance(r, JobMismatchError) for r in results), results
    # the poisoned record lingers (so every late peer of the failed formation fails too),
    # then goes away: a consistent job opens the name afterwards
    [error] = await acquire(job(config, comm, 2, peers=[0]))
    assert isinstance(error, JobMismatchError)
    if env.name in ("s3", "dynamodb"):
        return  # the same driver as Redis; spare the moto server the linger
    await asyncio.sleep(POISON_LINGER)
    epochs = await acquire(job(config, comm, 2))
    assert len(set(epochs)) == 1 and isinstance(epochs[0], str), epochs


async def test_num_peers_mismatch_against_a_running_job(env: Env) -> None:
    comm = name()
    running = job(env.config(), comm, 2)
    epochs = await acquire(running)
    [error] = await acquire(job(env.config(), comm, 3, peers=[2]))
    assert isinstance(error, JobMismatchError) and "num_peers=3" in str(error)
    rec = await env.record(comm)
    assert rec is not None and rec.epoch == epochs[0] and rec.state == "complete"
    await release_all(running)


async def test_peers_that_never_open_are_a_timeout_and_free_their_slots(env: Env) -> None:
    comm = name()
    start = time.monotonic()
    # (a first AWS client of an event loop takes some tenths of a second to make)
    results = await acquire(job(env.config(), comm, 3, peers=[0, 1]), timeout=1.5)
    assert all(type(r) is CommTimeout for r in results), results
    assert all("peers [2]" in str(r) and "peers [0, 1] did" in str(r) for r in results), results
    assert time.monotonic() - start < 3.0
    assert await env.record(comm) is None
    epochs = await acquire(job(env.config(on_conflict="error"), comm, 2))
    assert len(set(epochs)) == 1 and isinstance(epochs[0], str), epochs


async def test_a_cancelled_open_gives_its_slot_back(env: Env) -> None:
    comm = name()
    [stale] = job(env.config(), comm, 2, peers=[0])
    task = asyncio.ensure_future(stale.acquire(asyncio.get_running_loop().time() + 10))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the slot is given back in the background (the record, which held only it, goes)
    for _ in range(50):
        if await env.record(comm) is None:
            break
        await asyncio.sleep(0.1)
    assert await env.record(comm) is None, "the cancelled open kept its slot"
    epochs = await acquire(job(env.config(), comm, 2))  # a new instance of peer 0: no poison
    assert len(set(epochs)) == 1 and isinstance(epochs[0], str), epochs


async def test_a_stolen_lease_calls_on_lost(env: Env) -> None:
    comm = name()
    leases = job(env.config(lease_ttl=0.6), comm, 2)
    epochs = await acquire(leases)
    collector = Lost()
    for lease in leases:
        lease.on_lost(collector)
    rec = await env.record(comm)
    assert rec is not None
    await env.overwrite(comm, replace(rec, epoch="feedfacecafe", slots={0: "x", 1: "y"}))
    await collector.wait(2, 3.0)
    lost = collector.errors
    assert len(lost) == 2 and all(isinstance(e, LeaseLostError) for e in lost), lost
    assert all("feedfacecafe" in str(e) and epochs[0] in str(e) for e in lost)
    late: list[FMIError] = []
    leases[0].on_lost(late.append)  # registered after the loss: called at once
    assert late == [lost[0]] or (len(late) == 1 and isinstance(late[0], LeaseLostError))
    await release_all(leases)
    stolen = await env.record(comm)
    assert stolen is not None and stolen.epoch == "feedfacecafe"  # not ours to delete


async def test_a_vanished_record_is_restored(env: Env) -> None:
    comm = name()
    leases = job(env.config(lease_ttl=0.6), comm, 2)
    epochs = await acquire(leases)
    lost: list[FMIError] = []
    for lease in leases:
        lease.on_lost(lost.append)
    await env.overwrite(comm, None)
    start = time.monotonic()
    rec = None
    while time.monotonic() - start < 3.0:
        rec = await env.record(comm)
        if rec is not None and sorted(rec.slots) == [0, 1]:
            break
        await asyncio.sleep(0.05)
    assert rec is not None and rec.epoch == epochs[0] and sorted(rec.slots) == [0, 1], rec
    assert not lost
    await release_all(leases)
    assert await env.record(comm) is None


_HOLDER = textwrap.dedent(
    """
    import asyncio, json, sys
    from fmi_async.config import Config
    from fmi_async.jobs.lease import lease_for

    async def main() -> None:
        config = Config.from_dict(json.loads(sys.argv[1]))
        lease = lease_for(config, sys.argv[2], "default", 0, 1)
        epoch = await lease.acquire(asyncio.get_running_loop().time() + 20)
        print(epoch, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_a_crashed_holder_expires_after_lease_ttl(env: Env) -> None:
    comm = name()
    ttl = 1.0
    config = env.config(lease_ttl=ttl)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLDER,
        json.dumps(config.to_dict()),
        comm,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30.0)
        crashed_epoch = line.decode().strip()
        assert len(crashed_epoch) == 12, line
        await asyncio.sleep(ttl)  # it renewed its lease meanwhile
        rec = await env.record(comm)
        assert rec is not None and rec.epoch == crashed_epoch
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
    killed = time.monotonic()
    [epoch] = await acquire(job(config, comm, 1), timeout=10.0)
    waited = time.monotonic() - killed
    assert isinstance(epoch, str) and epoch != crashed_epoch, epoch
    assert waited <= ttl + 1.0, f"the lease of a killed job lasted {waited:.2f}s (ttl {ttl}s)"


# ---------------------------------------------------------------- the rendezvous server


async def _lease_server() -> tuple[RendezvousServer, Config]:
    server = await _start_server()
    host, port = server.address
    config = Config.from_dict(
        {
            "backends": {"TCP": {"enabled": True, "host": host, "port": port}},
            "security": {"secret": SECRET},
            "job": {"lease_ttl": 0.9, "settle": 0},
        }
    )
    return server, config


async def test_rendezvous_restart_restores_the_lease() -> None:
    server, config = await _lease_server()
    port = server.address[1]
    comm = name()
    leases = job(config, comm, 2)
    lost: list[FMIError] = []
    try:
        epochs = await acquire(leases)
        for lease in leases:
            lease.on_lost(lost.append)
        await server.close()
        await asyncio.sleep(0.4)  # down for less than the ttl
        server = await _start_server(port)
        start = time.monotonic()
        rec = None
        while time.monotonic() - start < 3.0:
            rec = server.leases.table.get((comm, "default"), time.monotonic())
            if rec is not None and sorted(rec.slots) == [0, 1]:
                break
            await asyncio.sleep(0.05)
        assert rec is not None and rec.epoch == epochs[0] and sorted(rec.slots) == [0, 1], rec
        assert not lost
        # the restored lease still keeps another job out
        host, port = server.address
        strict = Config.from_dict(
            {
                "backends": {"TCP": {"enabled": True, "host": host, "port": port}},
                "security": {"secret": SECRET},
                "job": {"on_conflict": "error"},
            }
        )
        errors = await acquire(job(strict, comm, 2))
        assert all(type(e) is JobConflictError for e in errors), errors
    finally:
        await release_all(leases)
        await server.close()


async def test_rendezvous_down_longer_than_the_ttl_loses_the_lease() -> None:
    server, config = await _lease_server()
    comm = name()
    leases = job(config, comm, 1)
    collector = Lost()
    lost = collector.errors
    try:
        await acquire(leases)
        leases[0].on_lost(collector)
        await server.close()
        start = time.monotonic()
        await collector.wait(1, 5.0)
        assert len(lost) == 1 and isinstance(lost[0], LeaseLostError), lost
        assert "could not be renewed" in str(lost[0])
        assert time.monotonic() - start < 0.9 + 1.0
    finally:
        await release_all(leases)


async def test_rendezvous_lease_needs_the_secret() -> None:
    server, _ = await _lease_server()
    host, port = server.address
    try:
        wrong = RendezvousClient(host, port, b"not-the-secret", timeout=5.0)
        with pytest.raises(AuthenticationError):
            await wrong.claim(
                "c", "r", 0, 1, b"n" * 16, wait=False, ttl=5.0, settle=0.0, timeout=1.0
            )
        assert len(server.leases.table) == 0
    finally:
        await server.close()
