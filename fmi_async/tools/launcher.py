"""``fmi run``: start N peers of a script on this machine, like ``mpirun``.

A rendezvous server runs inside the launcher, every peer gets its identity
and a config in environment variables (with a random secret of this run,
which the server requires too), output is prefixed with ``[peer i]``, and the
run stops as a whole when one peer fails.  With ``--nat`` (default
``port-restricted``) every peer sits behind its own simulated NAT box, so the
run exercises real hole punching; the launcher prints how many pairs went
direct and how many through the relay.
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
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..channels import registry
from ..config import Config
from ..errors import ConfigError
from ..holepunch.server import RendezvousServer
from ..natsim import PRESETS, NATBox

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_TIMEOUT",
    "LaunchSession",
    "add_run_arguments",
    "cmd_run",
    "launch_session",
    "merge_config",
]

logger = logging.getLogger(__name__)

EXIT_TIMEOUT = 124  # as coreutils `timeout`
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
_LINE_LIMIT = 64 * 1024  # a "line" without newline is flushed at this size


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fmi run``."""
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
    are kept; only its address is replaced, and a TCP backend the user
    disabled (``"enabled": false``) stays disabled.  A UDP backend
    the user configured gets the same server's address (it registers and
    punches over the server's UDP port, the same number); a config that names
    UDP and not TCP runs over UDP alone.  Raises
    :class:`~fmi_async.errors.ConfigError` when ``backends``, a backend's
    section or ``security`` is not an object.
    """
    merged = copy.deepcopy(dict(user))
    backends = merged.setdefault("backends", {})
    if not isinstance(backends, dict):
        raise ConfigError("config: backends must be an object keyed by backend name")

    def named(channel: str) -> list[str]:
        return [k for k in backends if registry.canonical(k) == channel]

    tcp, udp = named("tcp"), named("udp")
    for key in tcp or ([] if udp else ["TCP"]):
        current = backends.get(key) or {}
        if not isinstance(current, dict):
            raise ConfigError(f"config: backends.{key} must be an object")
        # A backend the user disabled stays disabled: the run then uses the
        # channels the config enables (its address is filled in all the same).
        enabled = current.get("enabled", True)
        backends[key] = {**current, "enabled": enabled, "host": host, "port": port}
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


def cmd_run(args: argparse.Namespace) -> int:
    """Run the peers; the exit code is the first failing peer's, 124 on timeout.

    Raises :class:`~fmi_async.errors.ConfigError` for bad arguments, a missing
    script or a config that does not load.
    """
    if args.num_peers < 1:
        raise ConfigError(f"-n must be at least 1, got {args.num_peers}")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    if not Path(args.script).is_file():
        raise ConfigError(f"script {args.script} not found")
    user = _load_user_config(args.config)
    return asyncio.run(_launch(args, user))


async def _launch(args: argparse.Namespace, user: dict[str, Any]) -> int:
    nat = getattr(args, "nat", "none")
    async with launch_session(args.num_peers, nat, user) as session:
        config, run_id = session.config, session.run_id
        envs = _peer_envs(args.num_peers, args.name, run_id, json.dumps(config))
        for peer, env in enumerate(envs):
            env.update(session.nat_env(peer))
        launcher = _Launcher([sys.executable, args.script, *args.args], envs, grace=args.grace)
        code = await launcher.run(args.timeout)
        summary = session.nat_summary(nat)
        if summary:
            _note(summary)
        return code


@dataclass
class LaunchSession:
    """What the peers of one launch meet through: the rendezvous server, their NAT boxes,
    the run's id and secret, and the config every peer gets (:func:`merge_config`)."""

    server: RendezvousServer
    boxes: list[NATBox]
    run_id: str
    secret: str
    config: dict[str, Any]

    def nat_env(self, peer: int) -> dict[str, str]:
        """The variables that put ``peer`` behind its simulated NAT box (none without NAT)."""
        if not self.boxes:
            return {}
        options = self.boxes[peer].options()
        return {
            "FMI_NAT_GATEWAY": options["gateway"],
            "FMI_NAT_UDP_GATEWAY": options["udp_gateway"],
        }

    def nat_summary(self, nat: str) -> str | None:
        """How the pairs met (direct or relayed), once the peers are done; None without NAT.

        Each of the P(P-1)/2 pairs of peers counts once, by its latest
        outcome: a pair that paired again (a lost connection), once in each
        direction, or on several communicators is still one pair; pairs that
        never exchanged a message are counted as such.  One part per transport.
        """
        if not self.boxes:
            return None
        latest: dict[str, dict[tuple[int, int], str]] = {}
        for (transport, (_comm, _run, a, b)), outcome in self.server.pairings.outcomes.items():
            latest.setdefault(transport, {})[(a, b)] = outcome  # oldest first: the latest wins
        if not latest:
            return None
        peers = len(self.boxes)
        pairs = peers * (peers - 1) // 2
        parts = []
        for transport, by_pair in sorted(latest.items()):
            direct = sum(1 for o in by_pair.values() if o == "direct")
            relayed = sum(1 for o in by_pair.values() if o == "relay")
            parts.append(
                f"{transport}: {direct} direct, {relayed} relayed, "
                f"{pairs - direct - relayed} never connected"
            )
        dropped = sum(b.dropped for b in self.boxes)
        return (
            f"NAT {nat}: {pairs} pairs of {peers} peers; {'; '.join(parts)} "
            f"({dropped} packets filtered by the NATs)"
        )


@contextlib.asynccontextmanager
async def launch_session(
    num_peers: int, nat: str, user: Mapping[str, Any]
) -> AsyncIterator[LaunchSession]:
    """A rendezvous server on loopback with a fresh secret and run id, and with ``nat``
    other than ``"none"`` a simulated NAT box per peer; closed on exit.

    ``fmi run`` and ``fmi invoke`` start their peers inside one.  Raises
    :class:`~fmi_async.errors.ConfigError` when ``user`` does not merge into a
    valid config.
    """
    secret = secrets.token_urlsafe(32)
    run_id = secrets.token_hex(8)
    server = RendezvousServer(secret.encode())
    await server.start("127.0.0.1", 0)
    boxes = [NATBox(nat) for _ in range(num_peers)] if nat != "none" else []
    try:
        for box in boxes:
            await box.start()
        host, port = server.address
        config = merge_config(user, host, port, secret)
        Config.from_dict(config)
        yield LaunchSession(server, boxes, run_id, secret, config)
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
