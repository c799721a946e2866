"""Command line: trace, rules check, log show, backends."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import sys
import time
from importlib import resources
from typing import Callable, TextIO

from . import backends, diag, rules as rules_mod
from .auditor import Auditor
from .backends.base import BackendUnavailable
from .events import Event, format_human
from .rules import RuleError, RuleSet

# Exit codes (documented in --help).
EXIT_OK = 0
EXIT_FAILURE = 1       # runtime failure (log not writable, backend error while running)
EXIT_USAGE = 2         # bad arguments or rules
EXIT_NO_BACKEND = 3    # the requested backend (or any, with auto) cannot run here

EXIT_CODES_HELP = """exit codes:
  0  success
  1  runtime failure (log file not writable, backend failed while running)
  2  bad arguments or rules (the message names the rule, file and line)
  3  no usable backend (the message says what the host lacks)
"""

DEFAULT_RULES = "default.rules"

# Modules that add their own subcommands with register(subparsers).
SUBCOMMAND_MODULES: tuple[str, ...] = ()


def default_rules_text() -> str:
    return resources.files("fswatchaudit").joinpath("defaults", DEFAULT_RULES).read_text()


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def log_header(backend: str, rules: RuleSet, **extra: object) -> dict:
    """What every log file starts with."""
    return {"host": socket.gethostname(), "boot_id": boot_id(), "start": time.time_ns(),
            "backend": backend, "rules_digest": rules.digest(), "rules": rules.texts(),
            **extra}


def event_printer(out: TextIO, as_json: bool) -> Callable[[Event], None]:
    if as_json:
        def sink(ev: Event) -> None:
            out.write(json.dumps(ev.to_dict(), separators=(",", ":")) + "\n")
    else:
        def sink(ev: Event) -> None:
            out.write(format_human(ev) + "\n")
    return sink


def build_rules(paths: list[str], rules_files: list[str], perms: str | None,
                key: str | None, root: str = "/") -> RuleSet:
    """Rules from trace's command line: PATH arguments become -w watches."""
    rs = RuleSet()
    cmds = rules_mod.read_files(rules_files, root) if rules_files else []
    for p in paths:
        absolute = os.path.abspath(p)
        if not os.path.lexists(os.path.join(root, absolute.lstrip("/"))):
            raise RuleError(f"path to watch does not exist: {p}")
        cmds.append(rules_mod.Command("add", rules_mod.watch_rule(absolute, perms, key)))
    if not cmds:
        cmds = rules_mod.parse_lines(default_rules_text().splitlines(), "<default rules>",
                                     root)
    rs.apply(cmds)
    return rs


def start_backend(name: str, rules: RuleSet, log) -> backends.Backend:
    cls, probes = backends.select(name)
    log.info("backend selected", detail=backends.selection_reason(probes))
    backend = cls(rules)
    backend.start()
    return backend


def cmd_trace(args: argparse.Namespace) -> int:
    log = diag.get_logger("trace")
    try:
        rules = build_rules(args.paths, args.rules, args.perms, args.key)
    except RuleError as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        backend = start_backend(args.backend, rules, log)
    except BackendUnavailable as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_NO_BACKEND
    except RuleError as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_USAGE

    writer = None
    if args.output:
        from .log import LogWriter
        try:
            writer = LogWriter(args.output, log_header(backend.name, rules))
        except OSError as exc:
            print(f"fswatchaudit: cannot open log {args.output}: {exc.strerror or exc}",
                  file=sys.stderr)
            backend.close()
            return EXIT_FAILURE
    sinks = [event_printer(sys.stdout, args.json)]
    if writer is not None:
        sinks.append(lambda ev: writer.write_event(ev))
    auditor = Auditor(backend, rules, sinks,
                      on_lost=(writer.write_lost if writer is not None else None))

    def on_signal(signum, frame):
        auditor.stop()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    print(f"watching {len(rules)} paths with {backend.name}", file=sys.stderr, flush=True)
    status = EXIT_OK
    try:
        auditor.run(args.duration)
    except Exception as exc:
        log.error("backend failed", error=str(exc))
        status = EXIT_FAILURE
    finally:
        sys.stdout.flush()
        lost = backend.lost()
        backend.close()
        if writer is not None:
            writer.write_lost(lost)
            writer.close()
    for line in auditor.summary():
        print(line, file=sys.stderr)
    return status


def cmd_rules_check(args: argparse.Namespace) -> int:
    try:
        rs = RuleSet()
        rs.apply(rules_mod.read_files(args.files))
    except RuleError as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for text in rs.texts():
        print(text)
    return EXIT_OK


def cmd_log_show(args: argparse.Namespace) -> int:
    from . import log as log_mod
    try:
        return log_mod.show(args.files, as_json=args.json, out=sys.stdout, err=sys.stderr,
                            all_rotated=args.all)
    except log_mod.LogFormatError as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"fswatchaudit: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE


def cmd_backends(args: argparse.Namespace) -> int:
    if args.markdown:
        from .capabilities import markdown_table
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fswatchaudit", description="Linux filesystem watch auditor.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    trace = sub.add_parser(
        "trace", help="watch paths and print events as they happen",
        description="Watch PATHs (directories: the whole subtree) or the rules of -r "
                    "files; with neither, the built-in default rules.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    trace.add_argument("paths", nargs="*", metavar="PATH")
    trace.add_argument("-r", "--rules", action="append", default=[], metavar="RULES",
                       help="rules file or rules.d directory (repeatable)")
    trace.add_argument("-p", "--perms", help="permission letters rwxa for PATH watches")
    trace.add_argument("-k", "--key", help="key attached to PATH watches")
    trace.add_argument("--backend", default="auto",
                       choices=["auto", *backends.BACKENDS])
    trace.add_argument("--json", action="store_true", help="JSON lines on stdout")
    trace.add_argument("-o", "--output", metavar="LOGFILE", help="also write a msgpack log")
    trace.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    trace.set_defaults(func=cmd_trace)

    rules_p = sub.add_parser("rules", help="rule files")
    rules_sub = rules_p.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate and print normalised rules")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(func=cmd_rules_check)

    log_p = sub.add_parser("log", help="read msgpack logs")
    log_sub = log_p.add_subparsers(dest="log_command", required=True)
    show = log_sub.add_parser("show", help="print a log")
    show.add_argument("files", nargs="+", metavar="FILE")
    show.add_argument("--json", action="store_true", help="JSON lines")
    show.add_argument("--all", action="store_true",
                      help="include rotated files (FILE.N ... FILE.1 FILE), oldest first")
    show.set_defaults(func=cmd_log_show)

    be = sub.add_parser("backends", help="which backends this host allows, and why")
    be.add_argument("--markdown", action="store_true",
                    help="print what each backend can tell, as a markdown table")
    be.set_defaults(func=cmd_backends)

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(f"fswatchaudit.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    diag.configure()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
