"""`log show`: read msgpack logs back as human lines or JSON lines."""
from __future__ import annotations

import argparse
import sys
from typing import BinaryIO, TextIO

from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ..sinks import reader
from ..sinks.encode import color_wanted


def show_logs(files: list[str], as_json: bool = False, all_rotated: bool = False,
              out: BinaryIO | None = None, err: TextIO = sys.stderr,
              color: bool = False) -> int:
    """Print logs; every problem is a message on ``err`` and an exit code, never a
    traceback: 0 whole, 1 damaged (the records before the damage are printed)."""
    try:
        return reader.show(files, as_json=as_json, out=out, err=err,
                           all_rotated=all_rotated, color=color)
    except reader.LogFormatError as exc:
        if out is not None:
            out.flush()
        print(f"fswatchaudit: {exc}", file=err)
        return EXIT_FAILURE
    except BrokenPipeError:            # `log show | head`: the reader has had enough
        return EXIT_OK
    except OSError as exc:
        print(f"fswatchaudit: cannot read {exc.filename}: {exc.strerror}", file=err)
        return EXIT_FAILURE


def cmd_log_show(args: argparse.Namespace) -> int:
    if args.json and args.color == "always":
        print("fswatchaudit: --color applies to human lines, not --json", file=sys.stderr)
        return EXIT_USAGE
    code = show_logs(args.files, as_json=args.json, all_rotated=args.all,
                     color=not args.json and color_wanted(args.color, sys.stdout))
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        sys.stderr.close()
    return code


def register(sub: argparse._SubParsersAction) -> None:
    log_p = sub.add_parser("log", help="read msgpack logs")
    log_sub = log_p.add_subparsers(dest="log_command", required=True)
    show = log_sub.add_parser(
        "show", help="print a log",
        description="Print the records of logs. Exit 0 when every file is whole, 1 when "
                    "one is damaged or torn (every record before the damage is printed).")
    show.add_argument("files", nargs="+", metavar="FILE")
    show.add_argument("--json", action="store_true", help="JSON lines")
    show.add_argument("--all", action="store_true",
                      help="include rotated files (FILE.N ... FILE.1 FILE), oldest first")
    show.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                      help="colour human lines (auto: on a terminal, unless NO_COLOR is set)")
    show.set_defaults(func=cmd_log_show)
