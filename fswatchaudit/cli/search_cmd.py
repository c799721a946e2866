"""`search` and `report`: select events from the logs by key, path, operation, process,
user, result, container and time; print them, or summarise them."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from ..errors import EXIT_CODES_HELP, EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ..search import Follower, Query, Report, Scanner, check_query, compile_query, log_files
from ..search import query as q
from ..search.output import CsvOut, HumanOut, JsonOut
from ..search.timeparse import parse_when
from ..sinks.encode import color_wanted
from ..sinks.reader import LogFormatError, rotated_files

PROGRESS_MIN_BYTES = 64 << 20       # a progress bar only for searches this big


def _pids(values: list[str]) -> list[int]:
    out = []
    for v in q.split(values):
        if not v.isdigit():
            raise ValueError(f"not a pid: {v}")
        out.append(int(v))
    return out


def build_query(args: argparse.Namespace) -> Query:
    """The filters of the command line; ValueError for a value no event can hold."""
    query = Query(
        keys=q.split(args.key), paths=[os.path.normpath(p) for p in args.path],
        under=[os.path.normpath(p) for p in args.under], globs=args.glob,
        ops=q.split(args.op), aliases=q.split(args.alias),
        pids=_pids(args.pid), ppids=_pids(args.ppid),
        uids=q.uids(args.uid), euids=q.uids(args.euid), loginuids=q.uids(args.loginuid),
        comms=args.comm, exes=args.exe, results=q.split(args.result),
        containers=args.container)
    now = time.time_ns()
    if args.since:
        query.since = parse_when(args.since, now)
    if args.until:
        query.until = parse_when(args.until, now)
    check_query(query)
    return query


def select_files(args: argparse.Namespace) -> list[str]:
    if not args.files:
        return log_files(args.config)
    files: list[str] = []
    for f in args.files:
        files += [x for x in rotated_files(f) if os.path.exists(x)] if args.all else [f]
    return files


class _Progress:
    """A transient progress bar on a terminal, for searches over many bytes only."""

    def __init__(self, total: int) -> None:
        self.bar: Any = None
        if total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )
        self.bar = Progress(TextColumn("searching"), BarColumn(), DownloadColumn(),
                            TimeRemainingColumn(), transient=True,
                            console=Console(file=sys.stderr))
        self.task = self.bar.add_task("search", total=total)
        self.bar.start()

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _stream_records(args: argparse.Namespace) -> Iterator[Any]:
    """The records of the fleet's stream (of --host HOST ... when given); a server or
    stream that cannot be read is an OSError with the reason."""
    from ..sinks.nats_reader import iter_stream
    try:
        for host in args.host or [None]:
            yield from iter_stream(args.nats.split(","), host, stream=args.stream)
    except OSError:
        raise
    except Exception as exc:            # nats-py's own: no servers, no such stream
        raise OSError(f"cannot read the stream {args.stream} at {args.nats}: "
                      f"{type(exc).__name__}: {exc}".rstrip(": ")) from None


def _scan(args: argparse.Namespace, query: Query,
          ) -> tuple[Scanner, Iterator[dict[str, Any]], _Progress, list[str]]:
    scanner = Scanner(compile_query(query), query.since, query.until,
                      needles=q.needles(query))
    if args.nats:
        if args.files or args.all:
            raise ValueError("--nats reads the fleet's stream: give no log files")
        return (scanner, scanner.scan_stream(_stream_records(args), args.stream),
                _Progress(0), [])
    if args.host:
        raise ValueError("--host selects hosts of the fleet's stream: it needs --nats")
    files = select_files(args)
    spans = scanner.plan(files)
    progress = _Progress(sum(s.size for s in spans))
    if progress.bar is not None:
        scanner.progress = progress.update
    return scanner, scanner.scan([s.path for s in spans]), progress, files


def _say_scanned(scanner: Scanner, err: Any = None) -> None:
    st = scanner.stats
    rate = st.records / st.seconds if st.seconds > 0 else 0.0
    where = (f"the stream {st.stream}" if st.stream is not None else
             f"{st.files} files ({st.files_skipped} skipped by time range)")
    line = (f"fswatchaudit: {st.matched} matched; {st.records} records scanned in "
            f"{where} in {st.seconds:.2f} s ({rate:,.0f} records/s)")
    lost = sum(st.lost.values())
    if lost or st.dropped:
        line += f"; the auditor lost {lost} events and could not store {st.dropped}"
    print(line, file=err or sys.stderr)
    for path in st.torn:
        print(f"fswatchaudit: {path}: last record is torn (a crash mid-write); every "
              "record before it was read", file=err or sys.stderr)


def _errors(func: Any) -> Any:
    """Every failure of a search is a message and an exit code."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ValueError as exc:
            if isinstance(exc, LogFormatError):
                print(f"fswatchaudit: {exc}", file=sys.stderr)
                return EXIT_FAILURE
            print(f"fswatchaudit: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except BrokenPipeError:
            try:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
            except OSError:
                pass
            return EXIT_OK
        except OSError as exc:
            what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
            print(f"fswatchaudit: cannot read {what}" if exc.filename else
                  f"fswatchaudit: {what}", file=sys.stderr)
            return EXIT_FAILURE
    return wrapped


def cmd_search(args: argparse.Namespace) -> int:
    if args.json and args.csv:
        print("fswatchaudit: --json and --csv exclude each other", file=sys.stderr)
        return EXIT_USAGE
    if args.follow and args.nats:
        print("fswatchaudit: --follow reads the live log file: it takes no --nats",
              file=sys.stderr)
        return EXIT_USAGE
    if args.follow and args.until:
        print("fswatchaudit: --follow reads what comes next: it takes no --until",
              file=sys.stderr)
        return EXIT_USAGE
    query = build_query(args)
    out = sys.stdout.buffer
    writer: HumanOut | JsonOut | CsvOut
    if args.json:
        writer = JsonOut(out)
    elif args.csv:
        writer = CsvOut(out, host=bool(args.nats))
    else:
        writer = HumanOut(out, color_wanted(args.color, sys.stdout))
    scanner, matches, progress, files = _scan(args, query)
    try:
        for d in matches:
            writer.write(d)
    finally:
        progress.stop()
    out.flush()
    _say_scanned(scanner)
    if not args.follow:
        return EXIT_FAILURE if scanner.stats.torn else EXIT_OK
    # --follow: the live file is the last one (the current log)
    live = files[-1] if files else None
    if live is None:
        print("fswatchaudit: nothing to follow", file=sys.stderr)
        return EXIT_FAILURE
    follower = Follower(live, scanner)

    def stop(signum: int, frame: Any) -> None:
        follower.stopped = True
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for d in follower.follow(scanner.last_end):
        if d:
            writer.write(d)
        else:
            out.flush()
    out.flush()
    _say_scanned(scanner)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    query = build_query(args)
    report = Report(top=args.top)
    scanner, matches, progress, _ = _scan(args, query)
    try:
        for d in matches:
            report.add(d)
    finally:
        progress.stop()
    st = scanner.stats
    data = report.data(scanned={"records": st.records,
                                "files": st.files, "files_skipped": st.files_skipped,
                                "lost": st.lost, "dropped": st.dropped,
                                "seconds": round(st.seconds, 3)})
    from ..search import render
    if args.html:
        page = render.html_page(data)
        fd = os.open(args.html, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                     0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
    if args.json:
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
    elif not args.html:
        render.terminal(data, sys.stdout, color={"always": True, "never": False}.get(
            args.color, None if color_wanted("auto", sys.stdout) else False))
    sys.stdout.flush()
    _say_scanned(scanner)
    return EXIT_FAILURE if st.torn else EXIT_OK


def add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="log files (default: the daemon's log, every rotated file, oldest "
                        "first)")
    p.add_argument("--config", metavar="FILE",
                   help="daemon configuration naming the log (default: "
                        "/etc/fswatchaudit/fswatchaudit.conf)")
    p.add_argument("--all", action="store_true",
                   help="with FILEs: include their rotated files (FILE.N ... FILE.1 FILE)")
    fleet = p.add_argument_group("a fleet's stream (NATS JetStream, see For a fleet)")
    fleet.add_argument("--nats", metavar="URL",
                       help="read every host's records from this NATS server instead of "
                            "log files (nats://HOST:4222; comma-separate a cluster's)")
    fleet.add_argument("--host", action="append", default=[], metavar="HOST",
                       help="with --nats: only these hosts (repeatable)")
    fleet.add_argument("--stream", default="FSWATCHAUDIT",
                       help="with --nats: the stream (default FSWATCHAUDIT)")
    f = p.add_argument_group("filters (repeat or comma-separate values for alternatives; "
                             "different filters must all hold)")
    f.add_argument("-k", "--key", action="append", default=[], help="rule key")
    f.add_argument("-f", "--path", action="append", default=[], metavar="PATH",
                   help="this exact path (either path of a rename or link)")
    f.add_argument("--under", action="append", default=[], metavar="DIR",
                   help="DIR itself or anything below it")
    f.add_argument("--glob", action="append", default=[], metavar="PATTERN",
                   help="shell pattern on the whole path (* also matches /)")
    f.add_argument("--op", action="append", default=[], help="operation (create, unlink, ...)")
    f.add_argument("-S", "--alias", action="append", default=[],
                   help="fs-create, fs-remove, fs-attr, open, exec")
    f.add_argument("-p", "--pid", action="append", default=[])
    f.add_argument("--ppid", action="append", default=[])
    f.add_argument("-u", "--uid", action="append", default=[], help="number or user name")
    f.add_argument("--euid", action="append", default=[], help="number or user name")
    f.add_argument("-ul", "--loginuid", action="append", default=[],
                   help="number, user name or unset")
    f.add_argument("-c", "--comm", action="append", default=[], help="command name")
    f.add_argument("-x", "--exe", action="append", default=[], help="executable path")
    f.add_argument("-r", "--result", action="append", default=[],
                   help="success, failure or an errno name (EACCES)")
    f.add_argument("--container", action="append", default=[], metavar="ID",
                   help="container id (or a prefix of at least 4 characters)")
    f.add_argument("-ts", "--since", metavar="WHEN",
                   help="from (ISO 8601, today, yesterday, now, -10m, -2h, -3d)")
    f.add_argument("-te", "--until", metavar="WHEN", help="to (the same forms)")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "search", help="find events in the logs (like ausearch)",
        description="Print the events of the logs that match every filter given. The "
                    "number of records scanned is said on stderr.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection(s)
    out = s.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="JSON lines (the serialised form)")
    out.add_argument("--csv", action="store_true", help="CSV with a header row")
    out.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    out.add_argument("-F", "--follow", action="store_true",
                     help="then keep reading the live log, across rotations (tail -F)")
    s.set_defaults(func=_errors(cmd_search))

    r = sub.add_parser(
        "report", help="summaries of the logs (like aureport)",
        description="Summarise the events the filters select: per alias and operation, "
                    "key, program, user, failures, container, the most changed paths, "
                    "and a timeline.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection(r)
    out = r.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="the summary as one JSON object")
    out.add_argument("--html", metavar="FILE",
                     help="write a self-contained HTML page (timeline, path tree, tables)")
    out.add_argument("--top", type=int, default=15, metavar="N",
                     help="rows per table and paths in the tree (default 15)")
    out.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    r.set_defaults(func=_errors(cmd_report))
