"""Command line: one module per command group; this one assembles the parser."""
from __future__ import annotations

import argparse
import os
import re
import sys

from .. import diag
from ..errors import EXIT_CODES_HELP, EXIT_FAILURE
from . import backends_cmd, ctl, daemon_cmd, log_cmd, rules_cmd, search_cmd, trace


def version() -> str:
    try:
        from importlib.metadata import version as dist_version
        return dist_version("fswatchaudit")
    except Exception:           # not installed (run from a source tree)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fswatchaudit", description="Linux filesystem watch auditor.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    for module in (trace, rules_cmd, log_cmd, search_cmd, backends_cmd, daemon_cmd, ctl):
        module.register(sub)
    return parser


_TIME_OPTIONS = ("-ts", "--since", "-te", "--until")
_RELATIVE_TIME = re.compile(r"^-\d+(\.\d+)?[smhdw]$")


def _join_relative_times(argv: list[str]) -> list[str]:
    """`--since -10m`: argparse would read -10m as an option; join it to its option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _TIME_OPTIONS and _RELATIVE_TIME.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _join_relative_times(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    diag.configure()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:
        # A failure no command foresaw: one line naming it, never a traceback (set
        # FSWATCHAUDIT_DEBUG=1 to see where it came from).
        if os.environ.get("FSWATCHAUDIT_DEBUG"):
            raise
        print(f"fswatchaudit: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
