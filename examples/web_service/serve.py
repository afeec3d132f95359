"""Serve the statistics service (app.py) with N worker processes that are one group of peers.

    python examples/web_service/serve.py --workers 4 [--port 8080] [--shared-port]

What it does, in one process and with no external service:

1. starts a rendezvous server in its own event loop (a random secret and run
   id for this run), where the workers find each other;
2. binds the listening sockets itself: one per worker on ports PORT, PORT+1,
   ... (``--port 0``: a free port each), or, with ``--shared-port``, one socket
   on PORT that every worker accepts from (the kernel hands each connection to
   one of them, as in a pre-fork server);
3. starts ``app.py`` N times, each with its socket and the ``FMI_*``
   environment of one peer (the config points the TCP channel at the
   rendezvous server), and prints each worker's address;
4. on Ctrl-C or SIGTERM, passes SIGTERM to every worker, which stops its
   collective loop with the others and closes its communicator; SIGKILL
   after ``--grace`` seconds.  A worker that dies on its own is reported and
   the others keep serving (their aggregates answer 503: a collective needs
   every worker).  Exit code: 0 when every worker exited 0, else the first
   failing worker's (128+N for signal N).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
from pathlib import Path

from fmi_async.holepunch.server import RendezvousServer
from fmi_async.tools.launcher import merge_config

APP = Path(__file__).with_name("app.py")


def say(line: str) -> None:
    """One line to stdout in one write: the workers write to the same stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def bind(host: str, port: int, workers: int, shared: bool) -> list[socket.socket]:
    """The listening sockets: one shared, or one per worker on consecutive ports."""
    if shared:
        return [socket.create_server((host, port), backlog=1024)]
    return [
        socket.create_server((host, port + i if port else 0), backlog=1024) for i in range(workers)
    ]


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


async def supervise(args: argparse.Namespace, sockets: list[socket.socket]) -> int:
    secret = secrets.token_urlsafe(32)
    server = RendezvousServer(secret.encode())
    await server.start("127.0.0.1", 0)
    host, port = server.address
    config = merge_config({"timeout": args.timeout}, host, port, secret)
    run_id = secrets.token_hex(8)
    procs: list[asyncio.subprocess.Process] = []
    try:
        for i in range(args.workers):
            sock = sockets[0] if args.shared_port else sockets[i]
            env = {
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "FMI_PEER_ID": str(i),
                "FMI_NUM_PEERS": str(args.workers),
                "FMI_COMM_NAME": "web",
                "FMI_RUN_ID": run_id,
                "FMI_CONFIG": json.dumps(config),
            }
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(APP),
                "--fd",
                str(sock.fileno()),
                "--heartbeat",
                str(args.heartbeat),
                env=env,
                pass_fds=(sock.fileno(),),
                start_new_session=True,  # Ctrl-C reaches serve.py, which passes it on
            )
            procs.append(proc)
            addr, bound = sock.getsockname()[:2]
            say(f"[serve] worker {i}: pid {proc.pid}, http://{addr}:{bound}")
        for sock in sockets:
            sock.close()  # the workers hold them now
        return await _wait(procs, args.grace)
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await server.close()


async def _wait(procs: list[asyncio.subprocess.Process], grace: float) -> int:
    """Until every worker exited; SIGINT/SIGTERM stop them (SIGTERM, then SIGKILL)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(procs)}
    stopper = asyncio.ensure_future(stop.wait())
    codes: dict[int, int] = {}
    while waits:
        done, _ = await asyncio.wait({*waits, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            if fut is stopper:
                continue
            i = waits.pop(fut)
            codes[i] = exit_code(fut.result())
            note = "" if stop.is_set() else " on its own; the others answer 503 for aggregates"
            say(f"[serve] worker {i} exited with code {codes[i]}{note}")
        if stopper in done:
            stopper = asyncio.ensure_future(asyncio.Event().wait())  # stop once
            say(f"[serve] stopping {len(waits)} workers")
            await _stop([procs[i] for i in waits.values()], grace)
    stopper.cancel()
    failed = [codes[i] for i in sorted(codes) if codes[i] != 0]
    return failed[0] if failed else 0


async def _stop(procs: list[asyncio.subprocess.Process], grace: float) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=grace)
    for proc in procs:
        if proc.returncode is None:
            say(f"[serve] worker pid {proc.pid} still running after {grace}s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4, help="worker processes (peers)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve HTTP on")
    parser.add_argument("--port", type=int, default=8080, help="first port (0: free ports)")
    parser.add_argument(
        "--shared-port", action="store_true", help="one port for all workers (kernel balances)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="collective deadline (s)")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="idle batch every S s")
    parser.add_argument("--grace", type=float, default=10.0, help="SIGTERM to SIGKILL (s)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    sockets = bind(args.host, args.port, args.workers, args.shared_port)
    return asyncio.run(supervise(args, sockets))


if __name__ == "__main__":
    sys.exit(main())
