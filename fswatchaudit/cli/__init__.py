"""Command line: one module per command group; this one assembles the parser."""
from __future__ import annotations

import argparse
import os
import sys

from .. import diag
from ..errors import EXIT_CODES_HELP, EXIT_FAILURE
from . import backends_cmd, ctl, daemon_cmd, log_cmd, rules_cmd, trace, verify_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fswatchaudit", description="Linux filesystem watch auditor.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (trace, rules_cmd, log_cmd, backends_cmd, daemon_cmd, ctl, verify_cmd):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
