"""``fmi rendezvous``: run a rendezvous server until Ctrl-C (or SIGTERM).

It needs ``--secret-file`` (or ``--insecure`` to run without a secret, which
it warns about); the peers set the same text as ``security.secret``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from ..errors import ConfigError
from ..holepunch.server import RendezvousServer

__all__ = ["add_rendezvous_arguments", "cmd_rendezvous"]

logger = logging.getLogger(__name__)


def add_rendezvous_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fmi rendezvous``."""
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


def cmd_rendezvous(args: argparse.Namespace) -> int:
    """Serve until signalled.

    Raises :class:`~fmi_async.errors.ConfigError` for a missing or empty secret
    file, contradicting options, or an address it cannot listen on.
    """
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
