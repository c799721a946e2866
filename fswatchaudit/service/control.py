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

Only uid 0 may talk to the daemon: the socket is mode 0600 in a 0700 directory owned by
root, and the daemon also checks the peer's credentials (SO_PEERCRED) on every
connection, so a loosened mode on either does not open it up.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from .. import diag

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
