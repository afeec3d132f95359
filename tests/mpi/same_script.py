"""One script, two launchers: ``fmi run -n 3`` and ``mpiexec -n 3`` print the same lines.

Every peer prints one deterministic line (results of a few collectives) on
stdout, and the channels it used on stderr (which differ: tcp under ``fmi run``,
mpi under ``mpiexec``).
"""

from __future__ import annotations

import sys

import numpy as np

import fmi_async as fmi


async def main(comm: fmi.Communicator) -> None:
    total = await comm.allreduce(np.arange(4) * (comm.rank + 1))
    names = await comm.allgather(f"p{comm.rank}")
    prefix = await comm.scan(comm.rank + 1)
    word = await comm.bcast("hello" if comm.rank == 0 else None, root=0)
    order = await comm.allreduce([comm.rank], op=fmi.Op(lambda a, b: a + b, commutative=False))
    line = (
        f"peer {comm.rank}/{comm.size}: allreduce={total.tolist()} allgather={names} "
        f"scan={prefix} bcast={word} ordered={order}"
    )
    sys.stdout.write(line + "\n")  # one write: lines of several ranks never mix
    sys.stdout.flush()
    channels = sorted(name for name, s in comm.stats()["channels"].items() if s["messages_sent"])
    sys.stderr.write(f"peer {comm.rank} channels {channels}\n")


if __name__ == "__main__":
    fmi.run(main)
