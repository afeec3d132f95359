"""``fmi clean``: the command over :func:`fmi_async.clean.clean`.

``fmi clean --config fmi.json --comm NAME [--run RUN]`` deletes what runs of
communicator ``NAME`` left on every storage backend the config enables, and
prints what it removed (see :mod:`fmi_async.clean` for what is selected).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from ..clean import clean
from ..config import Config

__all__ = ["add_clean_arguments", "cmd_clean"]

logger = logging.getLogger(__name__)


def add_clean_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fmi clean``."""
    parser.add_argument("--config", type=Path, required=True, help="JSON config of the job")
    parser.add_argument("--comm", required=True, help="communicator name (comm_name)")
    parser.add_argument(
        "--run", help="run id: removes runs RUN and RUN.<epoch> (default: every run)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list, do not delete")
    parser.add_argument("--summary", action="store_true", help="counts per run, not every name")


def cmd_clean(args: argparse.Namespace) -> int:
    """Run ``fmi clean``; exit status 1 when a backend could not be cleaned.

    Raises :class:`~fmi_async.errors.ConfigError` for a config that does not
    load and :class:`~fmi_async.errors.ArgumentError` for an empty name.
    """
    config = Config.load(args.config)
    results = asyncio.run(clean(config, args.comm, args.run, dry_run=args.dry_run))
    verb = "would remove" if args.dry_run else "removed"
    failed = False
    if not results:
        print("no storage backend is enabled in the config: nothing to clean")
    for entry in results:
        if entry.error is not None:
            failed = True
            print(f"{entry.location}: not cleaned: {entry.error}", file=sys.stderr)
            continue
        print(f"{entry.location}: {verb} {len(entry.names)}")
        for run, names in sorted(entry.by_run(args.comm).items()):
            print(f"  run {run}: {len(names)}")
            if not args.summary:
                for name in names:
                    print(f"    {name}")
    return 1 if failed else 0
