"""Start one fmi-async job on AWS Lambda: N asynchronous invocations of one function.

Every invocation gets the same event with the job merged in (peer id, number
of peers, communicator name, a fresh run id, the config), built by
``fmi_async.tools.invoke_events.job_events``, the function ``fmi invoke``
builds its local invocations with::

    python examples/lambda/invoke.py --function fmi-job -n 8 --config lambda.json \\
        --event '{"rows": 100000}'

The config must not hold the secret (the functions read it from their
environment, ``FMI_SECRET``).  Invocations are asynchronous
(``InvocationType="Event"``): Lambda answers 202 at once, and each function's
result goes where the function's destinations say (docs/deploy-lambda.md).
Needs boto3 and AWS credentials allowed ``lambda:InvokeFunction``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fmi_async.tools.invoke_events import job_events, new_run_id


def invoke_job(
    client: Any,
    function: str,
    num_peers: int,
    event: Mapping[str, Any],
    config: Mapping[str, Any],
    comm_name: str = "FMI_WORLD",
    run_id: str | None = None,
) -> str:
    """Invoke ``function`` ``num_peers`` times, asynchronously; returns the job's run id.

    ``client`` is a boto3 Lambda client (``boto3.client("lambda")``).  The
    invocations are sent concurrently, so that the peers start close together
    (they wait for each other within their deadline anyway).  Raises
    :class:`RuntimeError` when Lambda does not accept one of them.
    """
    run_id = run_id or new_run_id()
    events = job_events(event, num_peers, comm_name, run_id, config)

    def start(payload: dict[str, Any]) -> int:
        reply = client.invoke(
            FunctionName=function,
            InvocationType="Event",
            Payload=json.dumps(payload).encode(),
        )
        status: int = reply["StatusCode"]
        return status

    with ThreadPoolExecutor(max_workers=min(16, num_peers)) as pool:
        statuses = list(pool.map(start, events))
    refused = [peer for peer, status in enumerate(statuses) if status != 202]
    if refused:
        raise RuntimeError(f"Lambda did not accept the invocations of peers {refused}")
    return run_id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="start an fmi-async job on AWS Lambda")
    parser.add_argument("--function", required=True, help="function name or ARN")
    parser.add_argument("-n", "--num-peers", type=int, required=True)
    parser.add_argument("--config", type=Path, required=True, help="the peers' config (JSON)")
    parser.add_argument("--event", default="{}", help="the job's event (JSON object)")
    parser.add_argument("--name", default="FMI_WORLD", help="communicator name")
    parser.add_argument("--region", help="AWS region (default: the usual AWS chain)")
    args = parser.parse_args(argv)

    import boto3  # only here: the functions themselves do not need it

    client = boto3.client("lambda", region_name=args.region)
    config = json.loads(args.config.read_text())
    run_id = invoke_job(
        client, args.function, args.num_peers, json.loads(args.event), config, args.name
    )
    print(f"started {args.num_peers} invocations of {args.function}, run id {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
