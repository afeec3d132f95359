"""The transport benchmark: every target of the transport work in one run.

Three sections, each a module of its own that also runs alone:

* ``udp``     (:mod:`transport_udp`)    8 MiB over an emulated 20 ms path with
  jitter, loss and duplication, against the clean path and the tcp channel;
* ``crypto``  (:mod:`transport_crypto`) the sealed tcp channel against a TLS 1.3
  stream and against ``encrypt: false``, bulk and 8 B messages;
* ``aws``     (:mod:`transport_aws`)    a DynamoDB job under 10 % throttling
  against the unthrottled job, per retry strategy.

Every ratio is against a baseline measured in the same run (the machine is
shared and noisy: medians, and ratios rather than times)::

    python benchmarks/transport.py                       # all three, defaults
    python benchmarks/transport.py --only udp,crypto
    python benchmarks/transport.py --json rows.json
    python benchmarks/transport.py --args "udp: --repeat 5" --args "aws: --rounds 5"

A section's own options go through ``--args "SECTION: OPTIONS"``
(``python benchmarks/transport_udp.py --help`` lists them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transport_aws
import transport_crypto
import transport_udp

SECTIONS: dict[str, ModuleType] = {
    "udp": transport_udp,
    "crypto": transport_crypto,
    "aws": transport_aws,
}


def section_args(module: ModuleType, argv: list[str]) -> argparse.Namespace:
    """The section's own options: its defaults, overridden by ``argv``."""
    parser = argparse.ArgumentParser(prog=module.__name__)
    module.add_arguments(parser)
    return parser.parse_args(argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}"
    )
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="SECTION: OPTIONS",
        help="options for one section, e.g. 'udp: --repeat 5'",
    )
    parser.add_argument("--json", type=Path, help="also write every section's rows here")
    args = parser.parse_args()

    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; known: {list(SECTIONS)}")
    extra: dict[str, list[str]] = {name: [] for name in SECTIONS}
    for spec in args.args:
        name, sep, options = spec.partition(":")
        if not sep or name.strip() not in SECTIONS:
            parser.error(f"--args {spec!r}: expected 'SECTION: OPTIONS' with a section of {chosen}")
        extra[name.strip()] += shlex.split(options)

    results: dict[str, Any] = {}
    for name in chosen:
        module = SECTIONS[name]
        print(f"\n== {name}: {module.__doc__.splitlines()[0]}", flush=True)
        started = time.perf_counter()
        rows = module.run(section_args(module, extra[name]))
        module.show(rows)
        print(f"({name}: {time.perf_counter() - started:.0f} s)", flush=True)
        results[name] = rows
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
