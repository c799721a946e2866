"""`backends`: which backends this host allows, and why."""
from __future__ import annotations

import argparse

from .. import backends
from ..errors import EXIT_NO_BACKEND, EXIT_OK


def cmd_backends(args: argparse.Namespace) -> int:
    if args.markdown:
        from ..capabilities import markdown_table
        print(markdown_table())
        return EXIT_OK
    probes = backends.probe_all()
    chosen = next((p.name for p in probes if p.usable), None)
    print(f"{'backend':<10} {'usable':<7} reason")
    for p in probes:
        mark = "yes" if p.usable else "no"
        star = " (auto picks this)" if p.name == chosen else ""
        print(f"{p.name:<10} {mark:<7} {p.reason}{star}")
    return EXIT_OK if chosen else EXIT_NO_BACKEND


def register(sub: argparse._SubParsersAction) -> None:
    be = sub.add_parser("backends", help="which backends this host allows, and why")
    be.add_argument("--markdown", action="store_true",
                    help="print what each backend can tell, as a markdown table")
    be.set_defaults(func=cmd_backends)
