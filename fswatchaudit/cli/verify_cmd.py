"""`verify` and `keygen`: check the hash chain and seals of msgpack logs, make a
sealing key (sinks/integrity.py)."""
from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ..sinks import integrity
from ..sinks.reader import rotated_files


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
    verdict = integrity.verify(files, key, live=args.live)
    for note in verdict.notes:
        print(f"fswatchaudit: note: {note}", file=sys.stderr)
    if not verdict.ok:
        print(f"fswatchaudit: TAMPERED OR DAMAGED: {verdict.problem}", file=sys.stderr)
        return EXIT_FAILURE
    what = (f"{verdict.keyed_seals} seals authenticated" if key is not None
            else f"{verdict.seals} seals (not authenticated: no --key)")
    print(f"{len(files)} file(s), {verdict.records} records: chain intact, {what}")
    return EXIT_OK


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
    v = sub.add_parser(
        "verify", help="check that msgpack logs were not altered",
        description="Check the hash chain and the seals of msgpack logs given oldest "
                    "first. Exit 0 when they are intact, 1 naming the file and byte of "
                    "the first edited, deleted, inserted, reordered or truncated record, "
                    "2 for an unusable key.")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--key", metavar="KEYFILE",
                   help="the verification key (from keygen) to authenticate the seals")
    v.add_argument("--all", action="store_true",
                   help="include rotated files (FILE.N ... FILE.1 FILE), oldest first")
    v.add_argument("--live", action="store_true",
                   help="the last file is still being written: its unsealed tail is noted, "
                        "not an error")
    v.set_defaults(func=cmd_verify)
    k = sub.add_parser(
        "keygen", help="make the key that seals msgpack logs",
        description="Draw a new sealing key: written (epoch 0, mode 0600) to --key-file "
                    "for the daemon, which evolves it at each seal; the verification key "
                    "goes to --verify-key FILE or to stdout, to be kept off this host.")
    k.add_argument("--key-file", default=integrity.DEFAULT_KEY_FILE,
                   help=f"the sealing key (default {integrity.DEFAULT_KEY_FILE})")
    k.add_argument("--verify-key", metavar="FILE", help="write the verification key here")
    k.add_argument("--force", action="store_true", help="replace existing key files")
    k.set_defaults(func=cmd_keygen)
