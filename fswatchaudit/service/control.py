"""The daemon's control socket: its server and the one-request client `ctl` uses.

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

import errno
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from .. import diag

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
