"""The ``fmi`` command.

``fmi rendezvous``  run a rendezvous server until Ctrl-C (or SIGTERM); it
                    needs ``--secret-file`` (or ``--insecure`` to run
                    without a secret, which it warns about).
``fmi run``         start N peers of a script on this machine, like ``mpirun``:
                    a rendezvous server runs inside the launcher, every peer
                    gets its identity and a config in environment variables
                    (with a random secret of this run, which the server
                    requires too),
                    output is prefixed with ``[peer i]``, and the run stops as
                    a whole when one peer fails.  With ``--nat`` (default
                    ``port-restricted``) every peer sits behind its own
                    simulated NAT box, so the run exercises real hole
                    punching; the launcher prints how many pairs went direct
                    and how many through the relay.

Subcommands are entries of :data:`COMMANDS`; ``bench``, ``calibrate``, ``plan``
and ``cost`` are added there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .clean import add_clean_arguments, cmd_clean
from .config import BACKEND_ALIASES, Config
from .errors import ConfigError, FMIError
from .holepunch.natsim import PRESETS, NATBox
from .holepunch.server import RendezvousServer
from .selection.calibrate import add_calibrate_arguments, cmd_calibrate
from .selection.report import add_cost_arguments, add_plan_arguments, cmd_cost, cmd_plan

__all__ = ["main", "build_parser", "merge_config", "COMMANDS", "Command"]

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_TIMEOUT = 124  # as coreutils `timeout`
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
_LINE_LIMIT = 64 * 1024  # a "line" without newline is flushed at this size


@dataclass(frozen=True)
class Command:
    """One subcommand: how to declare its arguments and how to run it."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- fmi rendezvous


def _rendezvous_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=10000, help="port (0: any free port)")
    parser.add_argument(
        "--secret-file",
        type=Path,
        help="file holding the shared secret; peers must use it as security.secret",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="run without a secret: anyone who can reach the server may register, look up "
        "and join (refused unless given; see docs/security.md)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=5.0,
        help="seconds a new connection has to send its first complete request (default 5)",
    )
    parser.add_argument("--ttl", type=float, default=3600.0, help="registration lifetime (s)")


def _read_secret(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from exc
    if not secret:
        raise ConfigError(f"the secret file {path} is empty")
    return secret.encode()


async def _until_signalled() -> None:
    """Wait for SIGINT or SIGTERM (where signal handlers can be installed)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _cmd_rendezvous(args: argparse.Namespace) -> int:
    secret = _read_secret(args.secret_file)
    if secret is None and not args.insecure:
        raise ConfigError(
            "refusing to run a rendezvous server without a secret: give --secret-file FILE "
            "(the peers set the same text as security.secret), or --insecure to run without "
            "one, where anyone who can reach the server may register, look up and join"
        )
    if secret is not None and args.insecure:
        raise ConfigError("--insecure and --secret-file contradict each other; give one")
    if not 0 < args.handshake_timeout < float("inf"):
        raise ConfigError("--handshake-timeout must be a positive number of seconds")

    async def serve() -> None:
        server = RendezvousServer(
            secret,
            insecure=secret is None,
            ttl=args.ttl,
            handshake_timeout=args.handshake_timeout,
        )
        try:
            await server.start(args.host, args.port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
            ) from exc
        try:
            host, port = server.address
            auth = "with a secret" if secret else "WITHOUT a secret (anyone may join)"
            print(f"rendezvous server listening on {host}:{port} {auth}", flush=True)
            await _until_signalled()
        finally:
            await server.close()
        print("rendezvous server stopped", flush=True)

    asyncio.run(serve())
    return 0


# ---------------------------------------------------------------- fmi run


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--num-peers", type=int, required=True, help="number of peers")
    parser.add_argument("--config", type=Path, help="JSON config file (FMI's format)")
    parser.add_argument(
        "--timeout", type=float, help="stop the whole run after this many seconds (exit 124)"
    )
    parser.add_argument("--name", default="FMI_WORLD", help="communicator name")
    parser.add_argument(
        "--grace", type=float, default=3.0, help="seconds between SIGTERM and SIGKILL"
    )
    parser.add_argument(
        "--nat",
        choices=["none", *PRESETS],
        default="port-restricted",
        help="put every peer behind its own simulated NAT of this type (default: "
        "port-restricted, which hole punching crosses; symmetric forces the relay)",
    )
    parser.add_argument("script", help="Python script every peer runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")


def merge_config(user: Mapping[str, Any], host: str, port: int, secret: str) -> dict[str, Any]:
    """The user's config with the launcher's rendezvous server and secret filled in.

    Options the user gave the TCP backend (under ``TCP`` or FMI's ``Direct``)
    are kept; only its address and ``enabled`` are replaced.  A UDP backend
    the user configured gets the same server's address (it registers and
    punches over the server's UDP port, the same number); a config that names
    UDP and not TCP runs over UDP alone.
    """
    merged = copy.deepcopy(dict(user))
    backends = merged.setdefault("backends", {})
    if not isinstance(backends, dict):
        raise ConfigError("config: backends must be an object keyed by backend name")

    def named(channel: str) -> list[str]:
        aliases = BACKEND_ALIASES
        return [k for k in backends if isinstance(k, str) and aliases.get(k.lower()) == channel]

    tcp, udp = named("tcp"), named("udp")
    for key in tcp or ([] if udp else ["TCP"]):
        current = backends.get(key) or {}
        if not isinstance(current, dict):
            raise ConfigError(f"config: backends.{key} must be an object")
        backends[key] = {**current, "enabled": True, "host": host, "port": port}
    for key in udp:
        current = backends.get(key) or {}
        if not isinstance(current, dict):
            raise ConfigError(f"config: backends.{key} must be an object")
        backends[key] = {**current, "host": host, "port": port}
    security = merged.setdefault("security", {})
    if not isinstance(security, dict):
        raise ConfigError("config: security must be an object")
    security["secret"] = secret
    return merged


def _load_user_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    Config.from_dict(data, origin=str(path))  # fail here, not in N peers
    return dict(data)


def _cmd_run(args: argparse.Namespace) -> int:
    if args.num_peers < 1:
        raise ConfigError(f"-n must be at least 1, got {args.num_peers}")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    if not Path(args.script).is_file():
        raise ConfigError(f"script {args.script} not found")
    user = _load_user_config(args.config)
    return asyncio.run(_launch(args, user))


async def _launch(args: argparse.Namespace, user: dict[str, Any]) -> int:
    secret = secrets.token_urlsafe(32)
    run_id = secrets.token_hex(8)
    server = RendezvousServer(secret.encode())
    await server.start("127.0.0.1", 0)
    nat = getattr(args, "nat", "none")
    boxes = [NATBox(nat) for _ in range(args.num_peers)] if nat != "none" else []
    try:
        for box in boxes:
            await box.start()
        host, port = server.address
        config = merge_config(user, host, port, secret)
        Config.from_dict(config)
        envs = _peer_envs(args.num_peers, args.name, run_id, json.dumps(config))
        for env, box in zip(envs, boxes, strict=False):
            options = box.options()
            env["FMI_NAT_GATEWAY"] = options["gateway"]
            env["FMI_NAT_UDP_GATEWAY"] = options["udp_gateway"]
        launcher = _Launcher([sys.executable, args.script, *args.args], envs, grace=args.grace)
        code = await launcher.run(args.timeout)
        decided = server.pairings.decided
        if boxes and decided:
            _note(
                f"NAT {nat}: {decided['direct']} pairs direct, {decided['relay']} relayed "
                f"({sum(b.dropped for b in boxes)} packets filtered by the NATs)"
            )
        return code
    finally:
        await asyncio.gather(*(b.close() for b in boxes), return_exceptions=True)
        await server.close()


def _peer_envs(n: int, name: str, run_id: str, config: str) -> list[dict[str, str]]:
    base = dict(os.environ)
    base.setdefault("PYTHONUNBUFFERED", "1")  # so "[peer i]" lines stream as printed
    return [
        {
            **base,
            "FMI_PEER_ID": str(i),
            "FMI_NUM_PEERS": str(n),
            "FMI_COMM_NAME": name,
            "FMI_RUN_ID": run_id,
            "FMI_CONFIG": config,
        }
        for i in range(n)
    ]


class _Launcher:
    """Starts the peers, relays their output and stops them all together.

    Each peer leads its own process group, so stopping it also stops whatever
    it started; the launcher alone decides when peers stop (Ctrl-C reaches it,
    not them, and it passes SIGTERM on).
    """

    def __init__(self, argv: list[str], envs: list[dict[str, str]], grace: float) -> None:
        self.argv = argv
        self.envs = envs
        self.grace = grace
        self.procs: list[asyncio.subprocess.Process] = []
        self._pumps: list[asyncio.Task[None]] = []

    async def run(self, timeout: float | None) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        try:
            await self._start()
            return await self._supervise(stop, timeout)
        finally:
            await self._stop_all()
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def _start(self) -> None:
        for i, env in enumerate(self.envs):
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            self.procs.append(proc)
            assert proc.stdout is not None and proc.stderr is not None
            prefix = f"[peer {i}] "
            self._pumps.append(asyncio.create_task(_pump(proc.stdout, lambda: sys.stdout, prefix)))
            self._pumps.append(asyncio.create_task(_pump(proc.stderr, lambda: sys.stderr, prefix)))
        logger.debug("started %d peers: %s", len(self.procs), [p.pid for p in self.procs])

    async def _supervise(self, stop: asyncio.Event, timeout: float | None) -> int:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        waits = {asyncio.create_task(p.wait()): i for i, p in enumerate(self.procs)}
        stopper = asyncio.create_task(stop.wait())
        try:
            pending = set(waits)
            while pending:  # at most one round per peer, and bounded by the deadline
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(
                    pending | {stopper}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if stopper in done:
                    _note("interrupted; stopping every peer")
                    return EXIT_INTERRUPTED
                if not done:
                    _note(f"the run exceeded --timeout {timeout:g}s; stopping every peer")
                    return EXIT_TIMEOUT
                for task in done:
                    pending.discard(task)
                    code = _exit_code(task.result())
                    if code != 0:
                        _note(f"peer {waits[task]} exited with code {code}; stopping the others")
                        return code
            return 0
        finally:
            stopper.cancel()
            for task in waits:
                task.cancel()

    async def _stop_all(self) -> None:
        """SIGTERM every peer's group, SIGKILL what is left after the grace period."""
        running = [p for p in self.procs if p.returncode is None]
        for proc in running:
            _signal_group(proc, signal.SIGTERM)
        if running:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in running], timeout=self.grace)
        for proc in self.procs:
            # Also groups whose leader is gone: what a peer started must not outlive the run.
            _signal_group(proc, signal.SIGKILL)
        left = [p for p in self.procs if p.returncode is None]
        if left:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in left], timeout=5.0)
        if self._pumps:
            _, unfinished = await asyncio.wait(self._pumps, timeout=2.0)
            for task in unfinished:
                task.cancel()


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N


def _note(message: str) -> None:
    print(f"[fmi] {message}", file=sys.stderr, flush=True)


async def _pump(stream: asyncio.StreamReader, sink: Callable[[], TextIO], prefix: str) -> None:
    """Copy a child's output line by line, each line prefixed; ends at EOF."""
    pending = b""
    while chunk := await stream.read(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) >= _LINE_LIMIT:
            lines.append(pending)
            pending = b""
        out = sink()
        for line in lines:
            out.write(prefix + line.rstrip(b"\r").decode(errors="replace") + "\n")
        out.flush()
    if pending:
        out = sink()
        out.write(prefix + pending.decode(errors="replace") + "\n")
        out.flush()


# ---------------------------------------------------------------- main

COMMANDS: list[Command] = [
    Command("run", "run N peers of a script on this machine", _run_args, _cmd_run),
    Command("rendezvous", "run a rendezvous server", _rendezvous_args, _cmd_rendezvous),
    Command(
        "calibrate",
        "measure the channels and write their models into the config",
        add_calibrate_arguments,
        cmd_calibrate,
    ),
    Command(
        "plan",
        "predicted time and cost of every plan of every collective",
        add_plan_arguments,
        cmd_plan,
    ),
    Command(
        "cost",
        "what a run's channels carried and cost, from saved comm.stats()",
        add_cost_arguments,
        cmd_cost,
    ),
    Command(
        "clean",
        "remove what a run (or every run of a communicator) left on the storage backends",
        add_clean_arguments,
        cmd_clean,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmi", description="fmi-async: message passing and collectives between processes"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sp = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sp)
        sp.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result: int = args.handler(args)
    except FMIError as exc:
        print(f"fmi {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return result


if __name__ == "__main__":
    sys.exit(main())
