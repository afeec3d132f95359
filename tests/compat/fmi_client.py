"""FMI's Python test client (spcl/fmi, python/tests/client.py), for any number of peers.

The same calls in the same order, with FMI's declarations, operators and
values; where FMI's client has node 0 and node 1 pass different values, peer
``r`` passes a value that follows both (``test_client.py`` says which).  A
send/recv pair runs between every even peer and the next.  After FMI's cases
come a few of this project's: rank-dependent lists, an operator that is
neither commutative nor associative, and what non-roots get.

Run as FMI runs it, ``python fmi_client.py NUM_NODES NODE_ID CONFIG [COMM_NAME]``,
or under ``fmi run -n N fmi_client.py CONFIG`` (ids from ``FMI_PEER_ID`` and
``FMI_NUM_PEERS``).  Prints one JSON line, ``{"peer": i, "results": {case:
result}}``.  :func:`run_cases` runs the cases on an open communicator.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import fmi_async.compat as fmi


def custom(a: Any, b: Any) -> Any:
    """FMI's custom operator, ``lambda a, b: 2 * a + 2 * b`` (declared commutative and
    associative there; it is only commutative)."""
    return 2 * a + 2 * b


def run_cases(comm: fmi.Communicator, node_id: int, num_nodes: int) -> dict[str, Any]:
    """Every case, in FMI's order; the results by case name."""
    r, p = node_id, num_nodes
    t = fmi.types
    d = fmi.datatypes
    out: dict[str, Any] = {}
    comm.hint(fmi.hints.fast)
    comm.barrier()
    # send / recv: even peers send, the next one receives
    if r % 2 == 0 and r + 1 < p:
        comm.send(42 + r, r + 1, t(d.int))
        comm.send(14.2 + r, r + 1, t(d.double))
        comm.send([1 + r, 2 + r], r + 1, t(d.int_list, 2))
        comm.send([1.32 + r, 2.34], r + 1, t(d.double_list, 2))
    elif r % 2 == 1:
        out["recv_int"] = comm.recv(r - 1, t(d.int))
        out["recv_double"] = comm.recv(r - 1, t(d.double))
        out["recv_int_list"] = comm.recv(r - 1, t(d.int_list, 2))
        out["recv_double_list"] = comm.recv(r - 1, t(d.double_list, 2))
    # bcast from 0
    root = r == 0
    out["bcast_int"] = comm.bcast(42 if root else None, 0, t(d.int))
    out["bcast_double"] = comm.bcast(14.2 if root else None, 0, t(d.double))
    out["bcast_int_list"] = comm.bcast([1, 2] if root else None, 0, t(d.int_list, 2))
    out["bcast_double_list"] = comm.bcast([1.32, 2.34] if root else None, 0, t(d.double_list, 2))
    # gather to 0
    out["gather_int"] = comm.gather(r + 1, 0, t(d.int))
    out["gather_double"] = comm.gather(14.5 + 28 * r, 0, t(d.double))
    out["gather_int_list"] = comm.gather([2 * r + 1, 2 * r + 2], 0, t(d.int_list, 2))
    out["gather_double_list"] = comm.gather(
        [round(v + 2 * r, 2) for v in (1.32, 2.34)], 0, t(d.double_list, 2)
    )
    # scatter from 0: n = P ints and 2P doubles (FMI's [14, 42] and [1.3, .., 4.3] at P = 2)
    ints = [14 + 28 * k for k in range(p)] if root else None
    doubles = [round(k + 1.3, 1) for k in range(2 * p)] if root else None
    out["scatter_int_list"] = comm.scatter(ints, 0, t(d.int_list, p))
    out["scatter_double_list"] = comm.scatter(doubles, 0, t(d.double_list, 2 * p))
    # reduce to 0
    f = fmi.func
    o = fmi.op
    out["reduce_sum_int"] = comm.reduce(42, 0, f(o.sum), t(d.int))
    out["reduce_prod_double"] = comm.reduce(14.0, 0, f(o.prod), t(d.double))
    out["reduce_max_int"] = comm.reduce(42 + r, 0, f(o.max), t(d.int))
    out["reduce_min_double"] = comm.reduce(41.0, 0, f(o.min), t(d.double))
    out["reduce_custom_int"] = comm.reduce(42, 0, f(o.custom, custom, True, True), t(d.int))
    out["reduce_custom_double"] = comm.reduce(
        0.1 * (r + 1), 0, f(o.custom, custom, True, True), t(d.double)
    )
    out["reduce_sum_int_list"] = comm.reduce([42, 14], 0, f(o.sum), t(d.int_list, 2))
    out["reduce_prod_int_list"] = comm.reduce([42, 14], 0, f(o.prod), t(d.int_list, 2))
    out["reduce_max_double_list"] = comm.reduce([43.5, 13.5], 0, f(o.max), t(d.double_list, 2))
    out["reduce_min_double_list"] = comm.reduce([41.5, 15.5], 0, f(o.min), t(d.double_list, 2))
    out["reduce_custom_int_list"] = comm.reduce(
        [42, 14], 0, f(o.custom, custom, True, True), t(d.int_list, 2)
    )
    # allreduce and scan, the same cases
    for name in ("allreduce", "scan"):
        call = getattr(comm, name)
        out[f"{name}_sum_int"] = call(42, f(o.sum), t(d.int))
        out[f"{name}_prod_double"] = call(14.0, f(o.prod), t(d.double))
        out[f"{name}_max_int"] = call(42, f(o.max), t(d.int))
        out[f"{name}_min_double"] = call(41.0, f(o.min), t(d.double))
        out[f"{name}_custom_int"] = call(42, f(o.custom, custom, True, True), t(d.int))
        out[f"{name}_custom_double"] = call(0.1, f(o.custom, custom, True, True), t(d.double))
        out[f"{name}_sum_int_list"] = call([42, 14], f(o.sum), t(d.int_list, 2))
    # this project's cases: values that differ per peer, an operator that is
    # neither commutative nor associative (a strict left fold in rank order)
    digits = f(o.custom, lambda a, b: 10 * a + b, False, False)
    out["allreduce_sum_ranks"] = comm.allreduce([r, 10 * r, -r], f(o.sum), t(d.int_list, 3))
    out["allreduce_max_ranks"] = comm.allreduce([r * 0.5, -r * 0.5], f(o.max), t(d.double_list, 2))
    out["allreduce_digits"] = comm.allreduce(r + 1, digits, t(d.int))
    out["scan_digits"] = comm.scan(r + 1, digits, t(d.int))
    out["scan_sum_ranks"] = comm.scan([r, 1], f(o.sum), t(d.int_list, 2))
    out["reduce_sum_ranks_root_last"] = comm.reduce(r + 1, p - 1, f(o.sum), t(d.int))
    out["bcast_root_last"] = comm.bcast(
        [7.5, -1.0, 2.0] if r == p - 1 else None, p - 1, t(d.double_list, 3)
    )
    comm.barrier()
    return out


def main(argv: list[str]) -> int:
    if len(argv) >= 3:  # FMI's way: python client.py NUM_NODES NODE_ID CONFIG [NAME]
        num_nodes, node_id, config = int(argv[0]), int(argv[1]), argv[2]
        name = argv[3] if len(argv) > 3 else "Test"
    else:  # under `fmi run -n N fmi_client.py CONFIG`
        num_nodes, node_id = int(os.environ["FMI_NUM_PEERS"]), int(os.environ["FMI_PEER_ID"])
        config, name = argv[0], os.environ.get("FMI_COMM_NAME", "Test")
    comm = fmi.Communicator(node_id, num_nodes, config, name, 512)
    results = run_cases(comm, node_id, num_nodes)
    print(json.dumps({"peer": node_id, "results": results}), flush=True)
    return 0  # the communicator closes at exit, as FMI programs leave it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
