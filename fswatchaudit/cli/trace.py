"""`trace` and `run`: set up rules, scopes, backend and sinks; consume until told to stop."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from importlib import resources

from .. import backends
from .. import rules as rules_mod
from ..auditor import Auditor
from ..backends.base import Backend, BackendUnavailable
from ..errors import EXIT_CODES_HELP, EXIT_FAILURE, EXIT_NO_BACKEND, EXIT_OK, EXIT_USAGE
from ..rules import RuleError, RuleSet
from ..sinks import HumanEncoder, JsonEncoder, RotatingFileSink, Sink, StreamSink
from ..sinks.encode import color_wanted
from ..sinks.summary import SummarySink
from ..wiring import log_header, open_backend

DEFAULT_RULES = "default.rules"


def default_rules_text() -> str:
    return resources.files("fswatchaudit").joinpath("defaults", DEFAULT_RULES).read_text()


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


def _abandon(child: int | None, release: int | None) -> None:
    """The audit could not start: do not run the held command at all."""
    if child is not None:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    if release is not None:
        os.close(release)


def ignored_options(args: argparse.Namespace, command: list[str] | None) -> str | None:
    """An option that would be accepted and then ignored: say which (it is an error)."""
    where = "--path" if command is not None else "PATH"
    if not args.paths:
        if args.key is not None:
            return f"-k applies to {where} watches: give a {where} (or put the key in a rules file)"
        if args.perms is not None:
            return f"-p applies to {where} watches: give a {where}"
    if not args.pid and not args.children:
        return "--no-children applies to --pid"
    if args.all_namespaces and not args.container:
        return "--all-namespaces applies to --container"
    if args.ring_buffer is not None and args.backend in ("fanotify", "inotify"):
        return "--ring-buffer applies to the ebpf backend"
    if args.print and not args.output:
        return "--print applies to -o (without it, events are printed anyway)"
    if args.json and args.color == "always":
        return "--color applies to human lines, not --json"
    return None


def printing(args: argparse.Namespace) -> bool:
    """Events go to stdout without -o, and with it when asked (--print or --json):
    formatting every event for a stdout nobody reads costs a third of the consumer."""
    return not args.output or args.print or args.json


def run_trace(args: argparse.Namespace, command: list[str] | None = None) -> int:
    """trace and run: set up rules, scopes, backend, sinks; consume until told to stop."""
    problem = ignored_options(args, command)
    if problem is not None:
        print(f"fswatchaudit: {problem}", file=sys.stderr)
        return EXIT_USAGE
    container = None
    try:
        if args.container:
            from ..scope import resolve_container
            container = resolve_container(args.container)
        root = container.root if container else "/"
        scoped = bool(args.pid) or command is not None
        rules = build_rules(args.paths, args.rules, args.perms, args.key, root=root,
                            default=not scoped)
    except (RuleError, ValueError) as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    child: int | None = None
    release: int | None = None
    backend: Backend | None = None
    try:
        backend = open_backend(args.backend, rules, queue_size=args.ring_buffer,
                               container=container)
        if container is not None and not args.all_namespaces:
            backend.restrict_to_mount_namespace(container.mntns)
        if command is not None:
            child, release = _start_held(command)
            backend.add_process(child, children=True, announce=False)
        for pid in args.pid:
            backend.add_process(pid, children=args.children)
    except (BackendUnavailable, RuleError) as exc:
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        if backend is not None:
            backend.close()
        _abandon(child, release)
        return EXIT_NO_BACKEND if isinstance(exc, BackendUnavailable) else EXIT_USAGE

    sinks: list[Sink] = []
    if printing(args):
        sinks.append(StreamSink(sys.stdout.buffer, JsonEncoder() if args.json else
                                HumanEncoder(color_wanted(args.color, sys.stdout))))
    summary = SummarySink() if args.summary else None
    if summary is not None:
        sinks.append(summary)
    if args.output:
        try:
            sinks.append(RotatingFileSink(args.output, log_header(backend.name, rules)))
        except OSError as exc:
            print(f"fswatchaudit: cannot open log {args.output}: {exc.strerror or exc}",
                  file=sys.stderr)
            backend.close()
            _abandon(child, release)
            return EXIT_FAILURE
    try:
        sinks += extra_sinks(args.sink, backend.name, log_header(backend.name, rules))
    except (ValueError, OSError) as exc:
        for sink in sinks:
            sink.close()
        print(f"fswatchaudit: {exc}", file=sys.stderr)
        backend.close()
        _abandon(child, release)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILURE
    auditor = Auditor(backend, rules, sinks)

    def on_signal(signum, frame):
        auditor.stop()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    every_object = sum(1 for r in rules if r.kind == "syscall")
    what = f"{len(rules) - every_object} paths"
    if every_object:
        what += f", {every_object} syscall rules on every object"
    if command is not None or args.pid:
        what += f" and {len(args.pid) + (command is not None)} process trees"
    where = "" if printing(args) else f" (events to {args.output} only; --print to show them)"
    print(f"watching {what} with {backend.name}{where}", file=sys.stderr, flush=True)
    status = EXIT_OK
    exit_codes: dict[int, int] = {}
    if child is not None and release is not None:
        os.write(release, b"x")
        os.close(release)
        _stop_when_exits(child, auditor, exit_codes)
    try:
        auditor.run(args.duration)
    except Exception as exc:
        print(f"fswatchaudit: backend failed: {exc}", file=sys.stderr)
        status = EXIT_FAILURE
    finally:
        auditor.finish()        # the counters are read before anything is closed
        auditor.close()
    for line in auditor.summary():
        print(line, file=sys.stderr)
    if summary is not None:
        print("\n".join(["", *summary.lines()]), file=sys.stderr)
    if child is not None and status == EXIT_OK:
        return exit_codes.get(child, EXIT_FAILURE)
    return status


def extra_sinks(specs: list[str], backend: str, header: dict) -> list[Sink]:
    """The sinks of `--sink KIND[:TARGET]` options."""
    from ..capabilities import CAPABILITIES
    from ..sinks import kinds
    out: list[Sink] = []
    try:
        for index, spec in enumerate(specs):
            out.append(kinds.build(kinds.parse_spec(spec, index), kinds.SinkContext(header),
                                   CAPABILITIES[backend].fields))
    except BaseException:
        for sink in out:
            sink.close()
        raise
    return out


def _stop_when_exits(pid: int, auditor: Auditor, exit_codes: dict[int, int]) -> None:
    """Stop the audit once the command has exited (its events are then drained)."""
    def wait() -> None:
        _, status = os.waitpid(pid, 0)
        exit_codes[pid] = os.waitstatus_to_exitcode(status) & 0xFF
        auditor.stop()
    threading.Thread(target=wait, daemon=True).start()


def ring_size(text: str) -> int:
    from ..service.config import _ring
    try:
        return _ring(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_trace_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "--rules", action="append", default=[], metavar="RULES",
                   help="rules file or rules.d directory (repeatable)")
    p.add_argument("-p", "--perms", help="permission letters rwxa for PATH watches")
    p.add_argument("-k", "--key", help="key attached to PATH watches")
    p.add_argument("--backend", default="auto", choices=["auto", *backends.BACKENDS])
    p.add_argument("--json", action="store_true", help="JSON lines on stdout")
    p.add_argument("-o", "--output", metavar="LOGFILE",
                   help="write a msgpack log (events are then printed only with --print "
                        "or --json)")
    p.add_argument("--print", action="store_true",
                   help="with -o: print the events on stdout too")
    p.add_argument("--sink", action="append", default=[], metavar="KIND[:TARGET]",
                   help="also send records to a sink (repeatable): jsonl:FILE, "
                        "auditd:FILE, syslog[:unix:PATH|udp://HOST:PORT|tcp://HOST:PORT], "
                        "journald[:SOCKET]")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--ring-buffer", type=ring_size, metavar="SIZE",
                   help="eBPF ring buffer size, a power of two (default 32M; it is "
                        "mapped into the process twice, so it counts twice in its RSS)")
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
    p.add_argument("--summary", action="store_true",
                   help="at the end, counts per path and per program on stderr")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour human lines (auto: on a terminal, unless NO_COLOR is set)")


def register(sub: argparse._SubParsersAction) -> None:
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
