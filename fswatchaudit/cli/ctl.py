"""`ctl`: change and inspect the running daemon over its control socket (like auditctl)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ..service import config as config_mod
from ..service.control import ProtocolError, request


def rule_text(args: argparse.Namespace) -> tuple[str, str]:
    """(op, rule line) from ctl's auditctl-style options; the daemon parses the line."""
    tokens: list[str] = []
    if args.watch is not None:
        op, tokens = "add", ["-w", args.watch]
    elif args.unwatch is not None:
        op, tokens = "delete", ["-W", args.unwatch]
    elif args.append is not None:
        op, tokens = "add", ["-a", args.append]
    elif args.delete is not None:
        op, tokens = "delete", ["-d", args.delete]
    else:
        raise ValueError("no rule")
    for f in args.field:
        tokens += ["-F", f]
    for s in args.syscall:
        tokens += ["-S", s]
    if args.perms is not None:
        tokens += ["-p", args.perms]
    if args.key is not None:
        tokens += ["-k", args.key]
    return op, shlex.join(tokens)


def format_status(st: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in st.items():
        if key == "sinks" and isinstance(value, dict):
            # one line per sink: an operator of many sinks reads down, not across
            for name, stats in value.items():
                text = (", ".join(f"{k}={v}" for k, v in stats.items())
                        if isinstance(stats, dict) else str(stats))
                lines.append(f"sink {name}: {text}")
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "none"
        lines.append(f"{key}: {value}")
    return lines


def cmd_ctl(args: argparse.Namespace) -> int:
    rule_opts = (args.watch, args.unwatch, args.append, args.delete)
    if args.perms is not None and args.watch is None and args.unwatch is None:
        print("fswatchaudit: -p goes with -w or -W", file=sys.stderr)
        return EXIT_USAGE
    if (args.field or args.syscall) and args.append is None and args.delete is None:
        print("fswatchaudit: -F and -S go with -a or -d", file=sys.stderr)
        return EXIT_USAGE
    if any(o is not None for o in rule_opts):
        op, text = rule_text(args)
        msg: dict[str, Any] = {"op": op, "rule": text}
    elif args.key is not None and args.add_pid is None:
        print("fswatchaudit: -k goes with a rule (-w, -W, -a or -d) or --add-pid",
              file=sys.stderr)
        return EXIT_USAGE
    elif args.add_pid is not None:
        msg = {"op": "add-pid", "pid": args.add_pid, "children": args.children,
               "key": args.key}
    elif args.remove_pid is not None:
        msg = {"op": "remove-pid", "pid": args.remove_pid}
    elif args.list:
        msg = {"op": "list"}
    elif args.delete_all:
        msg = {"op": "delete-all"}
    elif args.rotate:
        msg = {"op": "rotate"}
    else:
        msg = {"op": "status"}
    try:
        reply = request(args.socket, msg)
    except FileNotFoundError:
        print(f"fswatchaudit: no daemon socket at {args.socket} (is the daemon running?)",
              file=sys.stderr)
        return EXIT_FAILURE
    except PermissionError:
        print(f"fswatchaudit: {args.socket}: permission denied (root only)", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, ProtocolError) as exc:
        print(f"fswatchaudit: cannot talk to the daemon at {args.socket}: {exc}",
              file=sys.stderr)
        return EXIT_FAILURE
    if not reply.get("ok"):
        print(f"fswatchaudit: {reply.get('error', 'request failed')}", file=sys.stderr)
        return EXIT_USAGE if reply.get("usage") else EXIT_FAILURE
    if args.json:
        reply.pop("ok", None)
        print(json.dumps(reply, sort_keys=True))
    elif msg["op"] == "list":
        for line in reply.get("rules", []):
            print(line)
    elif msg["op"] == "status":
        for line in format_status(reply.get("status", {})):
            print(line)
    elif msg["op"] == "rotate":
        print(f"rotated: {reply.get('file') or 'old log deleted (rotate_count = 0)'}")
    elif msg["op"] in ("add-pid", "remove-pid"):
        print("audited processes: " + (" ".join(map(str, reply.get("pids", []))) or "none"))
    return EXIT_OK


def configured_socket(path: str | None) -> str:
    """The control socket named by a configuration file (None: the default one, or the
    built-in default when there is none)."""
    return config_mod.load(path).control_socket


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ctl", help="change and inspect the running daemon (like auditctl)",
        description="Talk to the running daemon over its control socket (root only). "
                    "Rule options are those of rules files: `ctl -w /srv -p wa -k srv`, "
                    "`ctl -a always,exit -F dir=/srv -S fs-create`, `ctl -W /srv -p wa "
                    "-k srv`, `ctl -d always,exit -F dir=/srv -S fs-create`. With no "
                    "option, -s. Changes last until the next reload (SIGHUP) or restart: "
                    "put lasting rules in rules.d.")
    p.add_argument("--socket", default=None, metavar="PATH",
                   help="control socket (default: control_socket of the configuration)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"daemon configuration to take the socket from (default: "
                        f"{config_mod.DEFAULT_PATH} if it exists)")
    p.add_argument("-w", dest="watch", metavar="PATH", help="add a watch")
    p.add_argument("-W", dest="unwatch", metavar="PATH", help="delete a watch")
    p.add_argument("-a", "-A", dest="append", metavar="always,exit", help="add a rule")
    p.add_argument("-d", dest="delete", metavar="always,exit", help="delete a rule")
    p.add_argument("-p", dest="perms", metavar="PERMS", help="with -w/-W: rwxa letters")
    p.add_argument("-k", dest="key", metavar="KEY", help="rule key")
    p.add_argument("-F", dest="field", action="append", default=[], metavar="NAME=VALUE",
                   help="with -a/-d: a field (repeatable)")
    p.add_argument("-S", dest="syscall", action="append", default=[], metavar="NAMES",
                   help="with -a/-d: syscalls or aliases (repeatable)")
    p.add_argument("-l", dest="list", action="store_true", help="list the rules in force")
    p.add_argument("-D", dest="delete_all", action="store_true", help="delete every rule")
    p.add_argument("-s", dest="status", action="store_true", help="status (the default)")
    p.add_argument("--rotate", action="store_true", help="rotate the log now")
    p.add_argument("--add-pid", type=int, metavar="PID",
                   help="audit everything this process (and what it starts) touches")
    p.add_argument("--remove-pid", type=int, metavar="PID",
                   help="stop auditing this process")
    p.add_argument("--no-children", dest="children", action="store_false",
                   help="with --add-pid: not the processes it starts")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.set_defaults(func=_ctl_entry)


def _ctl_entry(args: argparse.Namespace) -> int:
    chosen = [n for n in ("watch", "unwatch", "append", "delete")
              if getattr(args, n) is not None]
    chosen += [n for n in ("list", "delete_all", "status", "rotate") if getattr(args, n)]
    if len(chosen) > 1:
        print("fswatchaudit: give one of -w, -W, -a, -d, -l, -D, -s, --rotate",
              file=sys.stderr)
        return EXIT_USAGE
    if args.socket is None:
        try:
            args.socket = configured_socket(args.config)
        except config_mod.ConfigError as exc:
            print(f"fswatchaudit: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return cmd_ctl(args)
