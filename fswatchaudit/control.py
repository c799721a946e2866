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

Only uid 0 may talk to the daemon: the socket is created mode 0600 in a directory
owned by root that nobody else can write to (created 0700 when missing; an existing one
is checked, never re-moded), and the daemon also checks the peer's credentials
(SO_PEERCRED) on every connection, so a loosened mode does not open it up.

Connections are served together, so an idle or stalled client holds up no one: each has
the server's timeout to send a whole request and to read its reply (an idle one is
closed after it), a request is at most MAX_REQUEST bytes, and past MAX_CONNECTIONS a new
connection closes the one idle the longest.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import shlex
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from . import config as config_mod
from . import diag

MAX_FRAME = 1 << 20
# A request is one rule line or less: far smaller than a frame may be.  A larger one is
# answered with an error and its connection closed.
MAX_REQUEST = 64 << 10
# Connections served at once; a new one past this closes the one idle the longest.
MAX_CONNECTIONS = 64
# Seconds a closing connection (refused peer, bad request) is drained before the close.
_LINGER = 1.0
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


def _decode(body: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise ProtocolError(f"bad msgpack frame: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a frame must hold a map")
    return msg


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
    return _decode(body)


def peer_uid(sock: socket.socket) -> int:
    """The uid the peer had when it connected (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return _PEERCRED.unpack(raw)[1]


def _prepare_dir(directory: str) -> None:
    """Create the socket's directory 0700, or check an existing one: a real directory
    (a symlink is not followed), owned by root, that nobody else can write to.  The mode
    of a directory the daemon did not create is never changed: control_socket =
    /run/x.sock must not make /run root-only."""
    try:
        os.mkdir(directory, 0o700)  # the umask can only narrow this
        return
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "control socket directory is not a directory "
                      "(a symlink is not followed)", directory)
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, "control socket directory is owned by uid "
                      f"{st.st_uid}, not root", directory)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(errno.EPERM, "control socket directory is writable by group or "
                      f"others (mode {stat.S_IMODE(st.st_mode):04o}); use a directory "
                      "only root can write to", directory)


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


def _encode(msg: dict[str, Any]) -> bytes:
    data = msgpack.packb(msg, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(data)) + data


class _Conn:
    """One accepted connection and its buffers.  ``closing``: the last reply is queued;
    once it is sent, the write side is shut and input is read and dropped until the
    peer closes or the deadline passes (closing with unread input would reset the
    connection, and the peer might lose that reply)."""

    __slots__ = ("sock", "inbuf", "outbuf", "deadline", "closing", "drained", "events")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.deadline = deadline
        self.closing = False
        self.drained = 0
        self.events = 0

    @property
    def idle(self) -> bool:
        return not (self.closing or self.inbuf or self.outbuf)


class ControlServer:
    """Accepts root's connections and hands each request to the handler, on its own
    thread.  Connections are served together (one thread, non-blocking sockets), so an
    idle or slow client never holds up another; requests are handled one at a time
    (so rule changes are serialised).  Each connection has ``timeout`` seconds to send
    a whole request (from its connection, or from its previous reply) and to read a
    reply; then it is dropped.  A request is at most MAX_REQUEST bytes."""

    def __init__(self, path: str, handler: Handler, timeout: float = 10.0,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.path = path
        self.handler = handler
        self.timeout = timeout
        self.max_connections = max_connections
        self.log = diag.get_logger("control")
        self.refused = 0
        self.dropped = 0
        _prepare_dir(os.path.dirname(path) or ".")
        _remove_stale(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket is born 0600: no window with a wider mode
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        st = os.lstat(path)
        if stat.S_IMODE(st.st_mode) & 0o177 or st.st_uid != os.geteuid():
            self.sock.close()
            os.unlink(path)
            raise OSError(errno.EPERM, "control socket was not created root-only "
                          f"(mode {stat.S_IMODE(st.st_mode):04o})", path)
        self.sock.listen(64)
        self.sock.setblocking(False)
        self._conns: dict[int, _Conn] = {}
        self._sel = selectors.DefaultSelector()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the event loop (control thread) ----------------------------------------------
    def _serve(self) -> None:
        sel = self._sel
        try:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self._stop_r, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                wait = min((c.deadline for c in self._conns.values()), default=None)
                try:
                    ready = sel.select(None if wait is None else max(0.0, wait - now))
                except (OSError, ValueError):  # closed under us
                    return
                for key, mask in ready:
                    if key.fileobj == self._stop_r:
                        return
                    if key.fileobj is self.sock:
                        self._accept()
                        continue
                    conn = key.data
                    if conn.sock.fileno() not in self._conns:
                        continue  # closed earlier in this round
                    try:
                        if mask & selectors.EVENT_WRITE:
                            self._write(conn)
                        if mask & selectors.EVENT_READ and conn.sock.fileno() in self._conns:
                            self._read(conn)
                    except OSError as exc:
                        self._drop(conn, "control connection failed", error=str(exc))
                now = time.monotonic()
                for conn in [c for c in self._conns.values() if c.deadline <= now]:
                    self._expire(conn)
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            sel.close()

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the pending one waits
                self.log.warning("control accept failed", error=str(exc))
                return
            sock.setblocking(False)
            try:
                uid = peer_uid(sock)
            except OSError as exc:
                self.log.warning("control connection failed", error=str(exc))
                sock.close()
                continue
            if len(self._conns) >= self.max_connections and not self._evict():
                self.log.warning("control connection dropped: too many connections",
                                 limit=self.max_connections)
                self.dropped += 1
                sock.close()
                continue
            conn = _Conn(sock, time.monotonic() + self.timeout)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            conn.events = selectors.EVENT_READ
            if uid != 0:
                self.refused += 1
                self.log.warning("control connection refused", uid=uid)
                self._reply_and_close(conn, {"ok": False,
                                             "error": "permission denied: root only"})

    def _evict(self) -> bool:
        """Make room for a new connection: close one being drained, else the one idle
        the longest.  False when every connection is in the middle of a request."""
        victims = [c for c in self._conns.values() if c.closing] or \
                  [c for c in self._conns.values() if c.idle]
        if not victims:
            return False
        victim = min(victims, key=lambda c: c.deadline)
        self._drop(victim, "control connection closed to make room",
                   limit=self.max_connections)
        return True

    def _read(self, conn: _Conn) -> None:
        data = conn.sock.recv(65536)
        if conn.closing:  # draining before the close
            conn.drained += len(data)
            if not data or conn.drained > 2 * MAX_FRAME:
                self._close(conn)
            return
        if not data:
            if conn.inbuf:
                self._drop(conn, "control connection failed",
                           error="connection closed in the middle of a frame")
            else:
                self._close(conn)
            return
        conn.inbuf += data
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Handle the complete requests at the head of the input, in turn, each once the
        previous reply is sent (a client that does not read its replies is not read)."""
        while not conn.closing and not conn.outbuf and len(conn.inbuf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(conn.inbuf)
            if size > MAX_REQUEST:
                self.log.warning("control request too large", size=size, limit=MAX_REQUEST)
                self._reply_and_close(conn, {"ok": False, "error": f"request of {size} "
                                             f"bytes exceeds the limit of {MAX_REQUEST}"})
                return
            end = _HEADER.size + size
            if len(conn.inbuf) < end:
                break
            body = bytes(conn.inbuf[_HEADER.size:end])
            del conn.inbuf[:end]
            try:
                req = _decode(body)
            except ProtocolError as exc:
                self.log.warning("control connection failed", error=str(exc))
                self._reply_and_close(conn, {"ok": False, "error": f"bad request: {exc}"})
                return
            conn.outbuf += self._answer(req)
            self._flush(conn)
            # a fresh timeout: to read the reply, or to send the next request
            conn.deadline = time.monotonic() + self.timeout
        self._update(conn)

    def _answer(self, req: dict[str, Any]) -> bytes:
        try:
            reply = self.handler(req)
        except Exception as exc:  # a failing request must not end the server
            self.log.error("control request failed", op=req.get("op"), error=str(exc))
            reply = {"ok": False, "error": f"internal error: {exc}"}
        try:
            return _encode(reply)
        except Exception as exc:
            self.log.error("control reply not sent", op=req.get("op"), error=str(exc))
            return _encode({"ok": False, "error": f"internal error: reply not sent: {exc}"})

    def _flush(self, conn: _Conn) -> bool:
        """Send what the socket takes of the pending output; True when all is sent."""
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            del conn.outbuf[:sent]
        return not conn.outbuf

    def _write(self, conn: _Conn) -> None:
        if not self._flush(conn):
            self._update(conn)
            return
        if conn.closing:
            self._shut(conn)
            return
        conn.deadline = time.monotonic() + self.timeout  # for the next request
        self._process(conn)  # requests already waiting behind this reply

    def _reply_and_close(self, conn: _Conn, reply: dict[str, Any]) -> None:
        conn.inbuf.clear()
        conn.outbuf += _encode(reply)
        conn.closing = True
        conn.deadline = time.monotonic() + min(self.timeout, _LINGER)
        if self._flush(conn):
            self._shut(conn)
        else:
            self._update(conn)

    def _shut(self, conn: _Conn) -> None:
        """The last reply is sent: end the write side and drain the input."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._update(conn)

    def _update(self, conn: _Conn) -> None:
        """Wait for what this connection can do next: write its reply, else read."""
        events = selectors.EVENT_WRITE if conn.outbuf else selectors.EVENT_READ
        if events != conn.events:
            self._sel.modify(conn.sock, events, conn)
            conn.events = events

    def _expire(self, conn: _Conn) -> None:
        if conn.closing:
            self._close(conn)
        elif conn.outbuf:
            self._drop(conn, "control connection dropped: the reply was not read",
                       timeout=self.timeout)
        elif conn.inbuf:
            self._drop(conn, "control connection dropped: incomplete request",
                       timeout=self.timeout, received=len(conn.inbuf))
        else:
            self.log.debug("idle control connection closed", timeout=self.timeout)
            self._close(conn)

    def _drop(self, conn: _Conn, event: str, **kw: Any) -> None:
        self.dropped += 1
        self.log.warning(event, **kw)
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self._conns.pop(fd, None) is not None:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        conn.sock.close()

    def close(self) -> None:
        """Stop serving (a request in progress finishes) and remove the socket."""
        os.write(self._stop_w, b"x")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.timeout + 5)
        if not self._thread.is_alive():
            self._sel.close()  # never started, or done (closing twice is harmless)
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
