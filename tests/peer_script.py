"""One peer of a multi-process job, for the tests that kill or restart its parts.

Run as ``python tests/peer_script.py MODE --config JSON --peer I --peers N
--comm NAME --run-id RUN [options]``.  Every line it prints on stdout is one
JSON object with an ``event`` and the peer's ``CLOCK_MONOTONIC`` time ``t``
(shared by every process of the machine, so the test compares it with the
moment it killed a peer):

``ready``   the communicator is open;
``round``   one round finished with results that match the reference;
``wrong``   a result differs from the reference (a test failure, always);
``error``   a call raised: ``type``, ``fmi`` (an ``FMIError``?), ``mro``,
            ``message``, ``since_kill`` (seconds since the time in the
            ``--kill-marker`` file, when it exists);
``done``    every round finished;
``closed``  the communicator closed (after ``done`` or an error); then the
            process exits.

Modes:

``loop``   ``--rounds`` rounds (bounded by ``--seconds`` too) of an allreduce
           of a float64 array and a bcast from a rotating root, each checked
           against a reference computed here from the formula every peer
           uses for its value, not by the library.
``pairs``  point-to-point exchanges driven by commands on stdin, for the
           rendezvous restart: ``swap D`` exchanges one array with peer
           ``peer XOR D`` (the pair connects on first use, looking the other
           peer up at the rendezvous server); ``quit`` ends.  Each swap prints
           ``round`` (with ``seconds``) or ``error``.

Exit codes: 0 done, 3 an ``FMIError``, 4 a wrong result, 5 any other exception.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import numpy as np

import fmi_async as fmi

EXIT_DONE, EXIT_FMI, EXIT_WRONG, EXIT_OTHER = 0, 3, 4, 5


def emit(event: str, peer: int, **fields: Any) -> None:
    print(json.dumps({"event": event, "peer": peer, "t": time.monotonic(), **fields}), flush=True)


def contribution(peer: int, rnd: int, size: int) -> np.ndarray:
    """What ``peer`` puts into round ``rnd``'s allreduce."""
    return np.arange(size, dtype=np.float64) * (peer + 1) + rnd


def allreduce_reference(peers: int, rnd: int, size: int) -> np.ndarray:
    """The sum of every peer's contribution, by a formula (not by adding them up in turn)."""
    weight = peers * (peers + 1) / 2  # sum of (peer + 1)
    return np.arange(size, dtype=np.float64) * weight + peers * rnd


def bcast_value(root: int, rnd: int, size: int) -> dict[str, Any]:
    return {"round": rnd, "root": root, "data": np.full(size, float(root * 1000 + rnd))}


def same_bcast(got: Any, want: dict[str, Any]) -> bool:
    return (
        isinstance(got, dict)
        and got.get("round") == want["round"]
        and got.get("root") == want["root"]
        and isinstance(got.get("data"), np.ndarray)
        and np.array_equal(got["data"], want["data"])
    )


def since_kill(marker: str | None) -> float | None:
    if not marker:
        return None
    try:
        return time.monotonic() - float(Path(marker).read_text())
    except (OSError, ValueError):
        return None


def report_error(peer: int, exc: BaseException, marker: str | None, **fields: Any) -> int:
    emit(
        "error",
        peer,
        type=type(exc).__name__,
        fmi=isinstance(exc, fmi.FMIError),
        mro=[c.__name__ for c in type(exc).__mro__],
        message=str(exc)[:500],
        since_kill=since_kill(marker),
        **fields,
    )
    return EXIT_FMI if isinstance(exc, fmi.FMIError) else EXIT_OTHER


async def loop_mode(comm: fmi.Communicator, args: argparse.Namespace) -> int:
    n, me = comm.size, comm.rank
    stop_at = time.monotonic() + args.seconds
    for rnd in range(args.rounds):
        if time.monotonic() > stop_at:
            break
        root = rnd % n
        try:
            total = await comm.allreduce(contribution(me, rnd, args.size))
            got = await comm.bcast(bcast_value(root, rnd, args.size) if me == root else None, root)
        except Exception as exc:  # reported when raised; closing may take a while after
            return report_error(me, exc, args.kill_marker, round=rnd)
        if not (
            isinstance(total, np.ndarray)
            and np.array_equal(total, allreduce_reference(n, rnd, args.size))
        ):
            emit("wrong", me, round=rnd, op="allreduce", got=repr(total)[:200])
            return EXIT_WRONG
        if not same_bcast(got, bcast_value(root, rnd, args.size)):
            emit("wrong", me, round=rnd, op="bcast", got=repr(got)[:200])
            return EXIT_WRONG
        emit("round", me, round=rnd)
    emit("done", me)
    return EXIT_DONE


async def timed(step: Awaitable[Any]) -> tuple[Any, float]:
    """``(result or the Exception it raised, seconds it took)``."""
    start = time.monotonic()
    try:
        return await step, time.monotonic() - start
    except Exception as exc:
        return exc, time.monotonic() - start


async def pairs_mode(comm: fmi.Communicator, args: argparse.Namespace) -> int:
    me = comm.rank
    for step in range(args.rounds):
        line = await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), args.seconds)
        words = line.split()
        if not words or words[0] == "quit":
            break
        other = me ^ int(words[1])
        mine = np.full(args.size, float(me * 100 + step))
        (sent, send_s), (got, recv_s) = await asyncio.gather(
            timed(comm.send(mine, other, tag=step)), timed(comm.recv(other, tag=step))
        )
        failures = [(s, r, op) for r, s, op in ((sent, send_s, "send"), (got, recv_s, "recv"))]
        failures = [f for f in failures if isinstance(f[1], Exception)]
        if failures:  # the first to fail; the next command may work again
            seconds, exc, op = min(failures, key=lambda f: f[0])
            report_error(
                me, exc, args.kill_marker, round=step, other=other, op=op, seconds=seconds,
                failed=[(o, type(e).__name__, round(s, 3)) for s, e, o in failures],
            )  # fmt: skip
            continue
        want = np.full(args.size, float(other * 100 + step))
        if not (isinstance(got, np.ndarray) and np.array_equal(got, want)):
            emit("wrong", me, round=step, op="swap", got=repr(got)[:200])
            return EXIT_WRONG
        emit("round", me, round=step, other=other, seconds=max(send_s, recv_s))
    emit("done", me)
    return EXIT_DONE


async def main(args: argparse.Namespace) -> int:
    comm = fmi.Communicator(
        args.peer, args.peers, json.loads(args.config), comm_name=args.comm, run_id=args.run_id
    )
    try:
        await comm.open()
    except Exception as exc:
        return report_error(args.peer, exc, args.kill_marker, during="open")
    emit("ready", args.peer)
    code = EXIT_OTHER
    try:
        if args.mode == "loop":
            code = await loop_mode(comm, args)
        else:
            code = await pairs_mode(comm, args)
    finally:
        # After a failure the final barrier (storage channels) is skipped: a peer is gone.
        try:
            await comm.close(synchronize=code == EXIT_DONE)
        except Exception as exc:
            code = report_error(args.peer, exc, args.kill_marker, during="close")
        else:
            emit("closed", args.peer)
    return code


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("loop", "pairs"))
    parser.add_argument("--config", required=True, help="the Config as a JSON document")
    parser.add_argument("--peer", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--comm", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="bound on the whole loop")
    parser.add_argument("--size", type=int, default=1024, help="float64 elements per array")
    parser.add_argument("--kill-marker", default=None, help="file holding the kill's time")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
