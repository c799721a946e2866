"""`log show`, `log verify`, `log keygen`: read msgpack logs back as human lines or
JSON lines, check that they were not altered (hash chain, seals, and the chain heads
sent to remote sinks), make the key that seals them (sinks/integrity.py)."""
from __future__ import annotations

import argparse
import sys
from typing import BinaryIO, TextIO

from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ..sinks import integrity, reader
from ..sinks.encode import color_wanted
from ..sinks.reader import rotated_files


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


def cmd_verify(args: argparse.Namespace) -> int:
    key = None
    if args.key:
        try:
            key = integrity.read_key(args.key)
        except (OSError, integrity.KeyError_) as exc:
            print(f"fswatchaudit: cannot use key {args.key}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    files: list[str] = []
    for path in args.files:
        files += rotated_files(path) if args.all else [path]
    heads = None
    if args.heads or args.nats:
        heads = remote_heads(args, files)
        if heads is None:
            return EXIT_USAGE
    verdict = integrity.verify(files, key, live=args.live)
    against = integrity.check_heads(files, heads) if heads is not None else None
    for note in verdict.notes + (against.notes if against else []):
        print(f"fswatchaudit: note: {note}", file=sys.stderr)
    failed = False
    if not verdict.ok:
        print(f"fswatchaudit: TAMPERED OR DAMAGED: {verdict.problem}", file=sys.stderr)
        failed = True
    unchecked = against is not None and not against.records
    if against is not None and not against.ok:
        print(f"fswatchaudit: {'cannot check' if unchecked else 'TAMPERED'} against the "
              f"remote heads: {against.problem}", file=sys.stderr)
        failed = True
    if failed:
        return EXIT_USAGE if unchecked and verdict.ok else EXIT_FAILURE
    what = (f"{verdict.keyed_seals} seals authenticated" if key is not None
            else f"{verdict.seals} seals (not authenticated: no --key)")
    if against is not None:
        what += f", {against.records} remote heads agree"
    print(f"{len(files)} file(s), {verdict.records} records: chain intact, {what}")
    return EXIT_OK


def remote_heads(args: argparse.Namespace, files: list[str]) -> list[dict] | None:
    """The chain heads from --heads FILE and --nats URL; None (after a message) when
    they cannot be read."""
    from ..sinks import heads as heads_mod
    out: list[dict] = []
    try:
        for path in args.heads or []:
            out += heads_mod.read_heads_file(path)
    except OSError as exc:
        print(f"fswatchaudit: cannot read heads {exc.filename}: {exc.strerror}",
              file=sys.stderr)
        return None
    if args.nats:
        try:
            out += heads_mod.nats_heads(args.nats, integrity.log_hosts(files),
                                        stream=args.stream)
        except OSError as exc:
            print(f"fswatchaudit: cannot read {exc.filename}: {exc.strerror}",
                  file=sys.stderr)
            return None
        except Exception as exc:        # nats-py's own errors: no server, no stream
            print(f"fswatchaudit: cannot read the heads from {args.nats}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return None
    return out


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        line = integrity.keygen(args.key_file, args.verify_key, force=args.force)
    except FileExistsError:
        print(f"fswatchaudit: {args.key_file} or {args.verify_key} exists (--force "
              "replaces it)", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, integrity.KeyError_) as exc:
        print(f"fswatchaudit: keygen: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.verify_key is None:
        sys.stdout.write(line)
    print(f"fswatchaudit: sealing key written to {args.key_file}; keep the verification "
          "key OFF this host (it proves every seal) and delete any copy here",
          file=sys.stderr)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    log_p = sub.add_parser("log", help="read, verify and seal msgpack logs")
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
    v = log_sub.add_parser(
        "verify", help="check that logs were not altered",
        description="Check the hash chain and the seals of msgpack logs given oldest "
                    "first. Exit 0 when they are intact, 1 naming the file and byte of "
                    "the first edited, deleted, inserted, reordered or truncated record, "
                    "2 for an unusable key or heads that cannot be read (or none of "
                    "these logs' host). With --heads "
                    "or --nats, also against the chain heads the daemon sent to its "
                    "remote sinks: a tail cut off here is named (\"log truncated after "
                    "seq N: the remote head says M\").")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--key", metavar="KEYFILE",
                   help="the verification key (from keygen) to authenticate the seals")
    v.add_argument("--all", action="store_true",
                   help="include rotated files (FILE.N ... FILE.1 FILE), oldest first")
    v.add_argument("--live", action="store_true",
                   help="the last file is still being written: its unsealed tail is noted, "
                        "not an error")
    v.add_argument("--heads", metavar="FILE", action="append",
                   help="chain heads as received remotely: JSON lines (our records, "
                        "journalctl -o json) or syslog lines with our structured data; "
                        "repeatable")
    v.add_argument("--nats", metavar="URL",
                   help="read the chain heads of the logs' host from this NATS server")
    v.add_argument("--stream", default="FSWATCHAUDIT",
                   help="the JetStream stream (with --nats; default FSWATCHAUDIT)")
    v.set_defaults(func=cmd_verify)
    k = log_sub.add_parser(
        "keygen", help="make the key that seals msgpack logs",
        description="Draw a new sealing key: written (epoch 0, mode 0600) to --key-file "
                    "for the daemon, which evolves it at each seal; the verification key "
                    "goes to --verify-key FILE or to stdout, to be kept off this host.")
    k.add_argument("--key-file", default=integrity.DEFAULT_KEY_FILE,
                   help=f"the sealing key (default {integrity.DEFAULT_KEY_FILE})")
    k.add_argument("--verify-key", metavar="FILE", help="write the verification key here")
    k.add_argument("--force", action="store_true", help="replace existing key files")
    k.set_defaults(func=cmd_keygen)
