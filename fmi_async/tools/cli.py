"""The ``fmi`` command: its entry point and the table of its subcommands.

``fmi run``         N peers of a script on this machine (:mod:`.launcher`)
``fmi rendezvous``  a rendezvous server until Ctrl-C (:mod:`.rendezvous`)
``fmi calibrate``   measure the channels, write their models (:mod:`.calibrate`)
``fmi plan``        predicted time and cost of every plan (:mod:`.plan_report`)
``fmi cost``        price saved ``comm.stats()`` (:mod:`.cost_report`)
``fmi clean``       remove what runs left on storage (:mod:`.clean`)
``fmi invoke``      N invocations of a Lambda-style handler on this machine (:mod:`.invoke`)

A subcommand is an entry of :data:`COMMANDS`.  ``python -m fmi_async`` runs
the same :func:`main` as the ``fmi`` console script.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import FMIError
from .calibrate import add_calibrate_arguments, cmd_calibrate
from .clean import add_clean_arguments, cmd_clean
from .cost_report import add_cost_arguments, cmd_cost
from .invoke import add_invoke_arguments, cmd_invoke
from .launcher import EXIT_INTERRUPTED, add_run_arguments, cmd_run
from .plan_report import add_plan_arguments, cmd_plan
from .rendezvous import add_rendezvous_arguments, cmd_rendezvous

__all__ = ["COMMANDS", "EXIT_USAGE", "Command", "build_parser", "main"]

logger = logging.getLogger(__name__)

EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    """One subcommand: how to declare its arguments and how to run it."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("run", "run N peers of a script on this machine", add_run_arguments, cmd_run),
    Command("rendezvous", "run a rendezvous server", add_rendezvous_arguments, cmd_rendezvous),
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
    Command(
        "invoke",
        "run N invocations of a Lambda-style handler, each in its own process",
        add_invoke_arguments,
        cmd_invoke,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``fmi`` parser with a subparser per entry of :data:`COMMANDS`."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fmi`` with ``argv`` (default: the process's arguments); returns the exit code.

    An :class:`~fmi_async.errors.FMIError` of a command is printed as
    ``fmi COMMAND: message`` and gives exit code 2; Ctrl-C gives 130.  Raises
    :class:`SystemExit` for arguments argparse rejects (as every argparse
    program does), and nothing else of its own.
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
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
