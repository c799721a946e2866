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
from collections.abc import Callable
from importlib import resources
from typing import TextIO

from . import backends, diag
from . import rules as rules_mod
from .auditor import Auditor
from .backends.base import BackendUnavailable
from .events import Event, ProcessState, format_human, format_state
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
SUBCOMMAND_MODULES: tuple[str, ...] = ("daemon", "control")


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
                key: str | None, root: str = "/", default: bool = True) -> RuleSet:
    """Rules from trace's command line: PATH arguments become -w watches; with none
    (and ``default``), the built-in default rules.  ``root`` is where paths are looked
    up (a container's root seen from the host)."""
    rs = RuleSet()
    cmds = rules_mod.read_files(rules_files, root) if rules_files else []
    for p in paths:
        absolute = os.path.abspath(p) if root == "/" else os.path.normpath(p)
        if not os.path.isabs(absolute):
            raise RuleError(f"path {p} is relative: inside a container give absolute paths")
        if not os.path.lexists(os.path.join(root, absolute.lstrip("/"))):
            raise RuleError(f"path to watch does not exist: {p}")
        cmds.append(rules_mod.Command("add", rules_mod.watch_rule(absolute, perms, key)))
    if not cmds and default:
        cmds = rules_mod.parse_lines(default_rules_text().splitlines(), "<default rules>",
                                     root)
    rs.apply(cmds)
    return rs


def start_backend(name: str, rules: RuleSet, log, container=None) -> backends.Backend:
    cls, probes = backends.select(name)
    log.info("backend selected", detail=backends.selection_reason(probes))
    backend = cls(rules)
    if container is not None:
        backend.set_container(container)
    backend.start()
    return backend


def cmd_trace(args: argparse.Namespace) -> int:
    return run_trace(args)


def cmd_run(args: argparse.Namespace) -> int:
    """Audit a command and everything it starts, from its first instruction."""
    command = [c for c in args.command if c != "--"] if args.command else []
    if not command:
        print("fswatchaudit: run needs a command after --", file=sys.stderr)
        return EXIT_USAGE
    return run_trace(args, command=command)


def _start_held(command: list[str]) -> tuple[int, int]:
    """Fork the command, held before exec until the audit covers it: (pid, release fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: wait for the go, then become the command
        os.close(w)
        os.read(r, 1)
        os.close(r)
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"fswatchaudit: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
            os._exit(127)
    os.close(r)
    return pid, w


def run_trace(args: argparse.Namespace, command: list[str] | None = None) -> int:
    """trace and run: set up rules, scopes, backend, sinks; consume until told to stop."""
    log = diag.get_logger("trace")
    container = None
    try:
        if args.container:
            from .scope import resolve_container
            container = resolve_container(args.container)
        root = container.root if container else "/"
        scoped = bool(args.pid) or command is not None
        rules = build_rules(args.paths, args.rules, args.perms, args.key, root=root,
                            default=not scoped)
    except (RuleError, ValueError) as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    child = release = None
    try:
        backend = start_backend(args.backend, rules, log, container=container)
        if container is not None and not args.all_namespaces:
            backend.restrict_to_mount_namespace(container.mntns)
        if command is not None:
            child, release = _start_held(command)
            backend.add_process(child, children=True, announce=False)
        for pid in args.pid:
            backend.add_process(pid, children=args.children)
    except BackendUnavailable as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        _abandon(child, release)
        return EXIT_NO_BACKEND
    except RuleError as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        _abandon(child, release)
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
            _abandon(child, release)
            return EXIT_FAILURE
    sinks = [event_printer(sys.stdout, args.json)]
    state_sinks = [state_printer(sys.stdout, args.json)]
    if writer is not None:
        sinks.append(writer.write_event)
        state_sinks.append(writer.write_state)
    auditor = Auditor(backend, rules, sinks, state_sinks=state_sinks,
                      on_lost=(writer.write_lost if writer is not None else None))

    def on_signal(signum, frame):
        auditor.stop()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    what = f"{len(rules)} paths"
    if command is not None or args.pid:
        what += f" and {len(args.pid) + (command is not None)} process trees"
    print(f"watching {what} with {backend.name}", file=sys.stderr, flush=True)
    status = EXIT_OK
    if child is not None:
        os.write(release, b"x")
        os.close(release)
        _stop_when_exits(child, auditor)
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
    if child is not None and status == EXIT_OK:
        return child_status.get(child, EXIT_FAILURE)
    return status


child_status: dict[int, int] = {}


def _stop_when_exits(pid: int, auditor: Auditor) -> None:
    """Stop the audit once the command has exited (its events are then drained)."""
    import threading

    def wait() -> None:
        _, status = os.waitpid(pid, 0)
        child_status[pid] = os.waitstatus_to_exitcode(status) & 0xFF
        auditor.stop()
    threading.Thread(target=wait, daemon=True).start()


def _abandon(child: int | None, release: int | None) -> None:
    """The audit could not start: do not run the held command at all."""
    if child is not None:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    if release is not None:
        os.close(release)


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
    except BrokenPipeError:            # `log show | head`: the reader has had enough
        sys.stderr.close()
        return EXIT_OK
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


def state_printer(out: TextIO, as_json: bool) -> Callable[[ProcessState], None]:
    if as_json:
        def sink(st: ProcessState) -> None:
            out.write(json.dumps({"state": st.to_dict()}, separators=(",", ":")) + "\n")
    else:
        def sink(st: ProcessState) -> None:
            out.write(format_state(st) + "\n")
    return sink


def add_trace_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "--rules", action="append", default=[], metavar="RULES",
                   help="rules file or rules.d directory (repeatable)")
    p.add_argument("-p", "--perms", help="permission letters rwxa for PATH watches")
    p.add_argument("-k", "--key", help="key attached to PATH watches")
    p.add_argument("--backend", default="auto", choices=["auto", *backends.BACKENDS])
    p.add_argument("--json", action="store_true", help="JSON lines on stdout")
    p.add_argument("-o", "--output", metavar="LOGFILE", help="also write a msgpack log")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--pid", type=int, action="append", default=[], metavar="PID",
                   help="audit this process (repeatable); with no PATH, all it touches")
    p.add_argument("--children", dest="children", action="store_true", default=True,
                   help="with --pid: also audit every process it starts (the default)")
    p.add_argument("--no-children", dest="children", action="store_false",
                   help="with --pid: do not follow the processes it starts")
    p.add_argument("--container", metavar="ID|PID",
                   help="resolve paths inside this container and report only its processes")
    p.add_argument("--all-namespaces", action="store_true",
                   help="with --container: report processes outside it too")


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
    add_trace_options(trace)
    trace.set_defaults(func=cmd_trace)

    run = sub.add_parser(
        "run", help="run a command and audit it and everything it starts",
        description="Run COMMAND, audited from its first instruction with every process "
                    "it starts; with no PATH or -r, everything they touch is reported. "
                    "Exits with the command's exit code.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--path", dest="paths", action="append", default=[], metavar="PATH",
                     help="only this path (repeatable)")
    add_trace_options(run)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    run.set_defaults(func=cmd_run)

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
