"""`rules check`: validate rules files and print them normalised."""
from __future__ import annotations

import argparse
import sys

from .. import rules as rules_mod
from ..errors import EXIT_OK, EXIT_USAGE
from ..rules import RuleError, RuleSet


def cmd_rules_check(args: argparse.Namespace) -> int:
    try:
        rs = RuleSet()
        rs.apply(rules_mod.read_files(args.files))
    except RuleError as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stdout.buffer        # rule lines with raw bytes in names print as written
    for text in rs.texts():
        out.write(text.encode("utf-8", "surrogateescape") + b"\n")
    out.flush()
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    rules_p = sub.add_parser("rules", help="rule files")
    rules_sub = rules_p.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate and print normalised rules")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(func=cmd_rules_check)
