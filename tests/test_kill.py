"""Peers as real processes: kill -9 of one in the middle of a job, and a rendezvous restart.

Each job is ``PEERS`` processes of ``tests/peer_script.py`` looping collectives
(an allreduce of a float64 array and a bcast from a rotating root, each
checked against a reference the script computes by formula).  After a few
rounds one peer gets SIGKILL: no close, no abort message, its sockets closed
by the kernel.  For every surviving peer the test asserts:

* it never printed a wrong result;
* it raised an :class:`~fmi_async.errors.FMIError` (the kill leaves no
  collective able to finish) within the bound of its channel, measured from
  the kill on the machine's monotonic clock, which every process shares;
* its process exits by itself (no hang);
* what the run left in storage expires: every Redis key of the run carries a
  TTL; on S3 the leftovers are listed (in the test's output) and the bucket
  has the lifecycle rule that expires them.

The rendezvous server restarted mid-job: pairs that connected before keep
exchanging over their TCP connections while it is down; a pair that connects
for the first time afterwards succeeds once the server is back (the peers
register again by themselves), or fails with an FMIError within its bound
while it stays down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from fmi_async.channels.storage import default_ttl, storage_prefix
from fmi_async.holepunch.server import RendezvousServer

PEERS = 4
VICTIM = 1
SECRET = "kill-test-secret"
SCRIPT = Path(__file__).with_name("peer_script.py")
ROOT = Path(__file__).resolve().parent.parent
ROUNDS_BEFORE_KILL = 3
STORAGE_TIMEOUT = 4.0
"""The communicator timeout of the storage jobs, small so the test is quick."""
DIRECT_TIMEOUT = 10.0
"""The direct jobs' timeout: long, so a failure within DIRECT_BOUND cannot be the deadline."""
DIRECT_BOUND = {"tcp": 2.0, "udp": 3.5}
"""Seconds from the kill until every survivor of a tcp or udp job raised.  TCP:
the kernel closes the dead peer's connections at once (measured: under 0.2 s).
UDP has no connection to close: the first survivor that sends to the dead
peer gives up after its retransmission timeouts (UDP_OPTIONS: about 1 s),
then aborts the others.  Where no survivor has anything to send to it (it
was a bcast's root), the first one to wait 1 s sends it a plan probe, and
gives up on that one: about 2 s (measured 1.7-2.1 s either way)."""
STORAGE_BOUND = STORAGE_TIMEOUT + 4.0
"""Storage cannot see a dead peer: nothing tells Redis or S3 that a process
died, so a survivor waiting for the dead peer's message waits out the
collective's deadline (the communicator timeout; one more collective may
have started just before the kill), then aborts the others.  Plus slack for
a loaded host."""
EXIT_BOUND = 15.0
"""Seconds a survivor may take to close and exit after it raised."""
START_BOUND = 60.0
"""Seconds for the peers to start (import numpy, open) and finish their first rounds."""
UDP_OPTIONS = {"rto_max": 0.2, "retries": 4}
"""Retransmission settings that give up on a silent peer in about a second of
timeouts.  With the defaults (rto_max 2 s, 8 retries) that takes over 10 s,
so a survivor would raise only at its deadline."""

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="kills processes and compares their clocks"
)


# ---------------------------------------------------------------- peer processes


class Peer:
    """One peer process and the JSON events it printed."""

    def __init__(self, rank: int, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.rank = rank
        self.proc = proc
        self.stderr = stderr
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    def __repr__(self) -> str:
        return f"<Peer {self.rank} pid={self.proc.pid} rc={self.proc.returncode}>"

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        for _line in range(100_000):  # bounded: a peer prints a few hundred lines at most
            line = await self.proc.stdout.readline()
            if not line:
                return
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "noise", "line": line.decode(errors="replace")})

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def rounds(self) -> int:
        return len(self.of("round"))

    def log(self) -> str:
        """What the peer printed, for assertion messages."""
        tail = self.stderr.read_text(errors="replace")[-3000:] if self.stderr.exists() else ""
        return f"peer {self.rank} events {self.events[-6:]}\nstderr tail:\n{tail}"


def log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the child keeps its own descriptor


class Job:
    """``PEERS`` processes of the peer script; killed, whatever is left, on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.marker = tmp / "killed-at"
        self.peers: list[Peer] = []
        self.killed_at: float | None = None

    async def start(
        self, mode: str, config: dict[str, Any], comm: str, run_id: str, *extra: str
    ) -> None:
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path}
        for rank in range(PEERS):
            stderr = self.tmp / f"peer{rank}.err"
            with log_file(stderr) as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(SCRIPT),
                    mode,
                    "--config", json.dumps(config),
                    "--peer", str(rank),
                    "--peers", str(PEERS),
                    "--comm", comm,
                    "--run-id", run_id,
                    "--kill-marker", str(self.marker),
                    *extra,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    env=env,
                )  # fmt: skip
            self.peers.append(Peer(rank, proc, stderr))

    async def until(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        """Poll ``done`` (bounded by ``timeout``); fail with every peer's log if it stays false."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout}s\n" + self.logs())
            if any(p.proc.returncode not in (None, 0) for p in self.peers if p.rank != VICTIM):
                if not done():
                    pytest.fail(f"{what}: a peer exited early\n" + self.logs())
            await asyncio.sleep(0.02)

    def kill(self, rank: int) -> None:
        """SIGKILL peer ``rank``; the time goes to the marker file the peers read."""
        self.killed_at = time.monotonic()
        os.kill(self.peers[rank].proc.pid, signal.SIGKILL)
        self.marker.write_text(repr(self.killed_at))

    async def send_all(self, command: str) -> None:
        for peer in self.peers:
            assert peer.proc.stdin is not None
            peer.proc.stdin.write(command.encode() + b"\n")
            await peer.proc.stdin.drain()

    async def exited(self, peers: list[Peer], timeout: float) -> None:
        """Every one of ``peers`` exits within ``timeout`` and its output is read."""
        try:
            async with asyncio.timeout(timeout):
                for peer in peers:
                    await peer.proc.wait()
                    await peer.reader
        except TimeoutError:
            pytest.fail(f"peers still running {timeout}s after they should exit\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(p.log() for p in self.peers)

    async def stop(self) -> None:
        """Kill what still runs; never raises, so a failed assertion stays the one reported."""
        for peer in self.peers:
            if peer.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    peer.proc.kill()
        for peer in self.peers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(peer.proc.wait(), 10)
            peer.reader.cancel()
            with contextlib.suppress(BaseException):
                await peer.reader


@contextlib.asynccontextmanager
async def job(tmp: Path) -> AsyncIterator[Job]:
    j = Job(tmp)
    try:
        yield j
    finally:
        await j.stop()


@contextlib.asynccontextmanager
async def rendezvous(port: int = 0) -> AsyncIterator[RendezvousServer]:
    server = RendezvousServer(secret=SECRET.encode())
    await server.start("127.0.0.1", port)
    try:
        yield server
    finally:
        await server.close()


# ---------------------------------------------------------------- configurations


def direct_config(channel: str, server: RendezvousServer) -> dict[str, Any]:
    host, port = server.address
    options: dict[str, Any] = {"enabled": True, "host": host, "port": port}
    if channel == "udp":
        options.update(UDP_OPTIONS)
    return {
        "backends": {channel.upper(): options},
        "security": {"secret": SECRET},
        "timeout": DIRECT_TIMEOUT,
    }


def redis_config(address: tuple[str, int]) -> dict[str, Any]:
    host, port = address
    return {
        "backends": {"Redis": {"enabled": True, "host": host, "port": port}},
        "timeout": STORAGE_TIMEOUT,
    }


def s3_config(endpoint: str, bucket: str) -> dict[str, Any]:
    return {
        "backends": {
            "S3": {
                "enabled": True,
                "bucket_name": bucket,
                "s3_region": "us-east-1",
                "endpoint_url": endpoint,
                "create_bucket": True,
                "timeout": 5,  # polling interval, ms
                "backoff_max": 0.05,
            }
        },
        "timeout": STORAGE_TIMEOUT,
    }


# ---------------------------------------------------------------- kill -9


DIRECT_ERRORS = {"BrokenChannelError", "EndOfStream", "AbortedError"}
"""What a survivor of a direct job may raise: its connection from the dead peer
broke or ended, or another survivor aborted the collective."""
STORAGE_ERRORS = {"CommTimeout", "AbortedError"}
"""What a survivor of a storage job may raise: its deadline, or another's abort."""


def survivors_raised(j: Job, bound: float, allowed: set[str]) -> list[tuple[int, str, float]]:
    """Assert what every survivor printed; return (peer, error type, seconds after the kill).

    Every collective needs every peer, so no survivor can finish its rounds:
    each must raise an FMIError of an ``allowed`` family within ``bound``.
    """
    assert j.killed_at is not None
    seen: list[tuple[int, str, float]] = []
    for peer in j.peers:
        if peer.rank == VICTIM:
            continue
        assert not peer.of("wrong"), f"peer {peer.rank} got a wrong result\n{peer.log()}"
        errors = peer.of("error")
        assert len(errors) == 1, f"peer {peer.rank} did not report one error\n{peer.log()}"
        error = errors[0]
        assert error["fmi"], f"peer {peer.rank} raised a non-FMIError\n{peer.log()}"
        assert peer.proc.returncode == 3, peer.log()
        assert allowed & set(error["mro"]), f"peer {peer.rank}: unexpected {error}"
        after = error["t"] - j.killed_at
        assert after <= bound, (
            f"peer {peer.rank} raised {error['type']} {after:.2f}s after the kill "
            f"(bound {bound}s): {error['message']}"
        )
        closed = peer.of("closed")
        assert closed, f"peer {peer.rank} did not close its communicator\n{peer.log()}"
        seen.append((peer.rank, error["type"], round(after, 3)))
    assert len(seen) == PEERS - 1, f"not every survivor raised: {seen}\n{j.logs()}"
    return seen


async def run_and_kill(j: Job, config: dict[str, Any], comm: str, run_id: str, size: int) -> None:
    await j.start("loop", config, comm, run_id, "--size", str(size), "--seconds", "90")
    await j.until(
        "first rounds",
        lambda: all(p.rounds() >= ROUNDS_BEFORE_KILL for p in j.peers),
        START_BOUND,
    )
    j.kill(VICTIM)


@pytest.mark.parametrize("channel", ["tcp", "udp"])
async def test_kill_9_direct(channel: str, tmp_path: Path) -> None:
    """A peer of a tcp or udp job killed mid-collective: every survivor raises within 2-3 s."""
    comm, run_id = f"kill-{channel}", uuid.uuid4().hex[:12]
    async with rendezvous() as server, job(tmp_path) as j:
        # 64 Ki float64 (512 KiB): big enough that the kill often lands mid-message
        await run_and_kill(j, direct_config(channel, server), comm, run_id, 65536)
        survivors = [p for p in j.peers if p.rank != VICTIM]
        await j.exited(survivors, DIRECT_BOUND[channel] + EXIT_BOUND)
        seen = survivors_raised(j, DIRECT_BOUND[channel], DIRECT_ERRORS)
        print(f"{channel}: survivors raised (peer, type, seconds after the kill): {seen}")


async def test_kill_9_redis(redis_server: tuple[str, int], tmp_path: Path) -> None:
    """A peer of a Redis job killed mid-collective: survivors raise within the deadline
    plus slack, and every key the run left behind carries a TTL of about the deadline."""
    import redis

    comm, run_id = "kill-redis", uuid.uuid4().hex[:12]
    async with job(tmp_path) as j:
        await run_and_kill(j, redis_config(redis_server), comm, run_id, 65536)
        survivors = [p for p in j.peers if p.rank != VICTIM]
        await j.exited(survivors, STORAGE_BOUND + EXIT_BOUND)
        seen = survivors_raised(j, STORAGE_BOUND, STORAGE_ERRORS)
    prefix = storage_prefix(comm, run_id)
    client = redis.Redis(*redis_server)
    try:
        left = {key.decode(): client.ttl(key) for key in client.scan_iter(match=prefix + "*")}
    finally:
        client.close()
    ceiling = default_ttl(STORAGE_TIMEOUT)
    assert all(0 < ttl <= ceiling for ttl in left.values()), (
        f"keys without a TTL of at most {ceiling}s: "
        f"{ {k: t for k, t in left.items() if not 0 < t <= ceiling} }"
    )
    # names relative to fmi/<comm>/: the run id, with the job's epoch if the job has one
    kinds = sorted({key[len(f"fmi/{comm}/") :].rsplit("/", 1)[0] for key in left})
    print(
        f"redis: survivors raised {seen}; {len(left)} keys left {kinds}, TTLs {set(left.values())}"
    )


async def test_kill_9_s3(moto_server: str, tmp_path: Path) -> None:
    """A peer of an S3 job killed mid-collective: survivors raise within the deadline plus
    slack; the objects left under the run's prefix are listed, and the bucket the channel
    created has the lifecycle rule that expires them."""
    import boto3

    comm, run_id = "kill-s3", uuid.uuid4().hex[:12]
    bucket = f"fmi-kill-{uuid.uuid4().hex[:10]}"
    async with job(tmp_path) as j:
        await run_and_kill(j, s3_config(moto_server, bucket), comm, run_id, 4096)
        survivors = [p for p in j.peers if p.rank != VICTIM]
        await j.exited(survivors, STORAGE_BOUND + EXIT_BOUND)
        seen = survivors_raised(j, STORAGE_BOUND, STORAGE_ERRORS)
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    # fmi/<comm>/<run>/... and, where the job has an epoch, fmi/<comm>/<run>.<epoch>/...
    prefix = storage_prefix(comm, run_id)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    left = [obj["Key"][len(prefix) :] for page in pages for obj in page.get("Contents", [])]
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert any(
        r["Status"] == "Enabled" and r["Filter"].get("Prefix") == "fmi/" and "Expiration" in r
        for r in rules
    ), rules
    print(f"s3: survivors raised {seen}; {len(left)} objects left under {prefix}*: {left[:20]}")


# ---------------------------------------------------------------- rendezvous restart


def round_of(peer: Peer, step: int) -> dict[str, Any] | None:
    return next((e for e in peer.events if e.get("round") == step), None)


async def swap(j: Job, step: int, distance: int, bound: float) -> list[dict[str, Any]]:
    """Every peer exchanges with ``peer ^ distance``; each outcome within ``bound``."""
    await j.send_all(f"swap {distance}")
    await j.until(
        f"swap {distance} (step {step})",
        lambda: all(round_of(p, step) is not None for p in j.peers),
        bound,
    )
    outcomes = [round_of(p, step) for p in j.peers]
    for peer, outcome in zip(j.peers, outcomes, strict=True):
        assert outcome is not None
        assert outcome["event"] in ("round", "error"), peer.log()
        if outcome["event"] == "error":
            assert outcome["fmi"], f"peer {peer.rank}: not an FMIError\n{peer.log()}"
    return [o for o in outcomes if o is not None]


@pytest.mark.parametrize("server", ["back", "back-during-pairing", "gone"])
async def test_rendezvous_restart(server: str, tmp_path: Path) -> None:
    """The rendezvous server goes away mid-job (and comes back on the same port, or not).

    Pairs that connected before keep exchanging over their connections.  A
    pair that connects afterwards finds the restarted server (the peers'
    control connections register again by themselves, backing off at most
    about 2 s) and succeeds, also when the server comes back while the pair is
    already trying; with no server it raises an FMIError within the
    communicator's timeout plus slack, and the established pairs still work.
    """
    timeout = 5.0
    comm, run_id = "restart", uuid.uuid4().hex[:12]
    async with job(tmp_path) as j:
        async with rendezvous() as first_server:
            host, port = first_server.address
            config = {
                "backends": {"TCP": {"enabled": True, "host": host, "port": port}},
                "security": {"secret": SECRET},
                "timeout": timeout,
            }
            await j.start("pairs", config, comm, run_id, "--rounds", "10", "--seconds", "60")
            await j.until("ready", lambda: all(p.of("ready") for p in j.peers), START_BOUND)
            first = await swap(j, 0, 1, START_BOUND)  # pairs 0-1 and 2-3 connect
            assert all(o["event"] == "round" for o in first), j.logs()
        # the server is gone: every control connection was closed
        established = await swap(j, 1, 1, 2.0)
        assert all(o["event"] == "round" for o in established), j.logs()
        assert max(o["seconds"] for o in established) < 1.0, established
        if server == "back":
            async with rendezvous(port):  # the same port, no state: a restarted server
                fresh = await swap(j, 2, 2, timeout + 4.0)  # pairs 0-2 and 1-3: new
                again = await swap(j, 3, 3, timeout + 4.0)  # pairs 0-3 and 1-2: new too
        elif server == "back-during-pairing":
            # The pairs start looking each other up while no server runs; it is back 1 s later.
            await j.send_all("swap 2")
            await asyncio.sleep(1.0)
            async with rendezvous(port):
                await j.until(
                    "pairing while the server came back",
                    lambda: all(round_of(p, 2) is not None for p in j.peers),
                    timeout + 4.0,
                )
                fresh = [e for p in j.peers if (e := round_of(p, 2)) is not None]
                # Lookups that found no server are asked again (with backoff, within
                # the lookup timeout), so the pairs that began while it was down succeed.
                for outcome in fresh:
                    assert outcome["event"] == "round", j.logs()
                    assert outcome["seconds"] <= timeout + 3.0, outcome
                seen = [(o.get("type", "ok"), o.get("failed"), o["seconds"]) for o in fresh]
                print(f"pairing while the server was down: {seen}")
                again = await swap(j, 3, 3, timeout + 4.0)  # pairs 0-3 and 1-2: new
                retried = await swap(j, 4, 2, timeout + 4.0)  # the pairs of step 2 again
                assert all(o["event"] == "round" for o in again + retried), j.logs()
            print(f"{server}: new pairs took {[round(o['seconds'], 3) for o in again + retried]} s")
        else:
            fresh = await swap(j, 2, 2, timeout + 6.0)
            assert all(o["event"] == "error" for o in fresh), j.logs()
            assert max(o["seconds"] for o in fresh) <= timeout + 3.0, fresh
            print(
                "no server: new pairs raised "
                f"{[(o['op'], o['type'], round(o['seconds'], 3), o['failed']) for o in fresh]}"
            )
            still = await swap(j, 3, 1, 2.0)  # the established pairs are unharmed
            assert all(o["event"] == "round" for o in still), j.logs()
        if server == "back":
            assert all(o["event"] == "round" for o in fresh + again), j.logs()
            print(f"{server}: new pairs took {[round(o['seconds'], 3) for o in fresh + again]} s")
        await j.send_all("quit")
        await j.exited(j.peers, EXIT_BOUND)
        assert all(p.proc.returncode == 0 and p.of("done") for p in j.peers), j.logs()
