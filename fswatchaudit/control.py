"""The daemon's control socket and its client, ``fswatchaudit ctl``.

Wire format: a stream AF_UNIX socket carrying frames, each a 4-byte big-endian length
followed by that many bytes of one msgpack map (at most MAX_FRAME bytes).  The client
sends one request frame and reads one reply frame; a connection may carry several
request/reply pairs in turn.

Requests: ``{"op": OP, ...}`` with OP one of
  add     {"rule": TEXT}   add a rule (TEXT is a rule line: -w ... or -a always,exit ...)
  delete  {"rule": TEXT}   delete a rule (-W ... or -d always,exit ..., or an add form)
  delete-all               delete every rule (-D)
  list                     the rules in force, normalised (-l)
  status                   backend, rules, counters, buffer fill, log file
  rotate                   rotate the log now
  add-pid {"pid": N, "children": BOOL, "key": KEY}  audit everything a process touches
  remove-pid {"pid": N}    stop auditing it
Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": MESSAGE}``.

Only uid 0 may talk to the daemon: the socket is mode 0600 in a 0700 directory owned by
root, and the daemon also checks the peer's credentials (SO_PEERCRED) on every
connection, so a loosened mode on either does not open it up.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import select
import shlex
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from . import config as config_mod
from . import diag

MAX_FRAME = 1 << 20
OPS = ("add", "delete", "delete-all", "list", "status", "rotate")
_HEADER = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ProtocolError(RuntimeError):
    """The other end sent something that is not a frame of this protocol."""


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if not buf:
                return None
            raise ProtocolError("connection closed in the middle of a frame")
        buf += chunk
    return bytes(buf)


def send_frame(sock: socket.socket, msg: dict[str, Any]) -> None:
    data = msgpack.packb(msg, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame, or None when the peer closed the connection between frames."""
    head = _recv_exact(sock, _HEADER.size)
    if head is None:
        return None
    (size,) = _HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    body = _recv_exact(sock, size)
    if body is None:
        raise ProtocolError("connection closed in the middle of a frame")
    try:
        msg = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise ProtocolError(f"bad msgpack frame: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a frame must hold a map")
    return msg


def _discard_input(conn: socket.socket) -> None:
    """Read what the peer already sent (briefly) before closing: closing with unread
    data would reset the connection, and the peer might lose the reply."""
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(0.2)
    try:
        for _ in range(16):
            if not conn.recv(65536):
                break
    except OSError:
        pass


def peer_uid(sock: socket.socket) -> int:
    """The uid the peer had when it connected (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return _PEERCRED.unpack(raw)[1]


def _prepare_dir(directory: str) -> None:
    """Make the socket's directory root-only; refuse one that is not ours (a symlink,
    or owned by someone else) rather than following or trusting it."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "control socket directory is not a directory "
                      "(a symlink is not followed)", directory)
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, "control socket directory is owned by uid "
                      f"{st.st_uid}", directory)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)


def _remove_stale(path: str) -> None:
    """Remove a socket left by a daemon that is gone; refuse if one still answers."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another daemon is listening", path)


class ControlServer:
    """Accepts root's connections and hands each request to the handler, one at a time
    (so rule changes are serialised), on its own thread."""

    def __init__(self, path: str, handler: Handler, timeout: float = 10.0) -> None:
        self.path = path
        self.handler = handler
        self.timeout = timeout
        self.log = diag.get_logger("control")
        self.refused = 0
        _prepare_dir(os.path.dirname(path) or ".")
        _remove_stale(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket is born 0600: no window with a wider mode
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.sock, self._stop_r], [], [])
            except (OSError, ValueError):  # closed under us
                return
            if self._stop_r in ready:
                return
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                try:
                    self._handle(conn)
                except (OSError, ProtocolError) as exc:
                    self.log.warning("control connection failed", error=str(exc))

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        uid = peer_uid(conn)
        if uid != 0:
            self.refused += 1
            self.log.warning("control connection refused", uid=uid)
            send_frame(conn, {"ok": False, "error": "permission denied: root only"})
            _discard_input(conn)
            return
        while True:
            req = recv_frame(conn)
            if req is None:
                return
            try:
                reply = self.handler(req)
            except Exception as exc:  # a failing request must not end the server
                self.log.error("control request failed", op=req.get("op"), error=str(exc))
                reply = {"ok": False, "error": f"internal error: {exc}"}
            send_frame(conn, reply)

    def close(self) -> None:
        """Stop serving (a request in progress finishes) and remove the socket."""
        os.write(self._stop_w, b"x")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.timeout + 5)
        self.sock.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._stop_r)
        os.close(self._stop_w)


def request(path: str, msg: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to the daemon and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            send_frame(sock, msg)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the request was read: the refusal is waiting below
        reply = recv_frame(sock)
    if reply is None:
        raise ProtocolError("the daemon closed the connection without a reply")
    return reply


# -- fswatchaudit ctl ------------------------------------------------------------------

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
        return 2
    if (args.field or args.syscall) and args.append is None and args.delete is None:
        print("fswatchaudit: -F and -S go with -a or -d", file=sys.stderr)
        return 2
    if any(o is not None for o in rule_opts):
        op, text = rule_text(args)
        msg: dict[str, Any] = {"op": op, "rule": text}
    elif args.key is not None and args.add_pid is None:
        print("fswatchaudit: -k goes with a rule (-w, -W, -a or -d) or --add-pid",
              file=sys.stderr)
        return 2
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
        return 1
    except PermissionError:
        print(f"fswatchaudit: {args.socket}: permission denied (root only)", file=sys.stderr)
        return 1
    except (OSError, ProtocolError) as exc:
        print(f"fswatchaudit: cannot talk to the daemon at {args.socket}: {exc}",
              file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"fswatchaudit: {reply.get('error', 'request failed')}", file=sys.stderr)
        return 2 if reply.get("usage") else 1
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
    return 0


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
        return 2
    if args.socket is None:
        try:
            args.socket = configured_socket(args.config)
        except config_mod.ConfigError as exc:
            print(f"fswatchaudit: {exc}", file=sys.stderr)
            return 2
    return cmd_ctl(args)
