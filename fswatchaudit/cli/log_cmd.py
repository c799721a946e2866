"""`log show`: read msgpack logs back as human lines or JSON lines."""
from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_FAILURE, EXIT_OK
from ..sinks import reader


def cmd_log_show(args: argparse.Namespace) -> int:
    try:
        return reader.show(args.files, as_json=args.json, err=sys.stderr,
                           all_rotated=args.all)
    except reader.LogFormatError as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:            # `log show | head`: the reader has had enough
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:
        print(f"fswatchaudit: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE


def register(sub: argparse._SubParsersAction) -> None:
    log_p = sub.add_parser("log", help="read msgpack logs")
    log_sub = log_p.add_subparsers(dest="log_command", required=True)
    show = log_sub.add_parser("show", help="print a log")
    show.add_argument("files", nargs="+", metavar="FILE")
    show.add_argument("--json", action="store_true", help="JSON lines")
    show.add_argument("--all", action="store_true",
                      help="include rotated files (FILE.N ... FILE.1 FILE), oldest first")
    show.set_defaults(func=cmd_log_show)
