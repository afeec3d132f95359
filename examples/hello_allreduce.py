"""Hello, allreduce: every peer contributes its rank; everyone learns the sum.

fmi run -n 4 examples/hello_allreduce.py
"""

from __future__ import annotations

import fmi_async as fmi


async def main(comm: fmi.Communicator) -> int:
    total = await comm.allreduce(comm.rank + 1)
    everyone = await comm.allgather(f"peer {comm.rank}")
    expected = comm.size * (comm.size + 1) // 2
    print(f"peer {comm.rank}/{comm.size}: sum of 1..{comm.size} = {total}", end=" ")
    print(f"(from {len(everyone)} peers)")
    if total != expected:
        raise SystemExit(f"wrong result {total}, expected {expected}")
    if comm.rank == 0:
        channels = comm.stats()["channels"]
        sent = {name: s["messages_sent"] for name, s in channels.items()}
        print(f"peer 0 sent {sent} messages per channel")
    return total


if __name__ == "__main__":
    fmi.run(main)
