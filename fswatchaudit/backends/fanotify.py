"""fanotify backend: pid-attributed events for root where eBPF cannot load.

Raw kernel interface through ctypes (fanotify_init, fanotify_mark, open_by_handle_at):
no PyPI binding reports directory file handles with names (FAN_REPORT_DFID_NAME) and
FAN_RENAME, which this backend is built on, and the interface is a few structs.

Marks, chosen per rule:
  dir rules    a FILESYSTEM mark on the rule's filesystem, filtered by path in user
               space.  One mark covers any depth with no race on new directories and
               no per-directory mark on huge trees; the price is that every event of
               that filesystem reaches user space (measured about 1.2x on unrelated
               file operations).
  path rules   an INODE mark on the parent directory with FAN_EVENT_ON_CHILD: only the
               directory's entries reach user space; the watched name is kept there,
               so a replaced file (rename over it) and a not-yet-created one are seen.
  inode rules  a FILESYSTEM mark, filtered by inode number.
Events carry a directory handle and a name, resolved to a path with open_by_handle_at.
The process: the event's pid, then uid, comm, exe read at once through /proc while a
pidfd (FAN_REPORT_PIDFD) pins it; an event whose process had exited is marked stale.
fanotify knows no syscall and no result, cannot tell chmod from chown (op "attr") and
does not see truncate (a modification).
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
import time
from collections import OrderedDict

from ..procfs import read_proc_facts
from ..events import Event
from ..rules import Rule, RuleError, RuleSet
from .base import Backend, BackendUnavailable, entry_op

# fanotify_init flags
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_UNLIMITED_QUEUE = 0x10
FAN_REPORT_PIDFD = 0x80
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
# fanotify_mark flags
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_DONT_FOLLOW = 0x4
FAN_MARK_INODE = 0x0
FAN_MARK_FILESYSTEM = 0x100
# event bits
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_CLOSE_NOWRITE = 0x10
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_OPEN_EXEC = 0x1000
FAN_Q_OVERFLOW = 0x4000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000
# info record types
INFO_FID, INFO_DFID_NAME, INFO_DFID, INFO_PIDFD = 1, 2, 3, 4
INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME = 10, 12
FAN_NOPIDFD, FAN_EPIDFD = -1, -2

EVENTS = (FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_ATTRIB | FAN_CLOSE_WRITE
          | FAN_CLOSE_NOWRITE | FAN_OPEN_EXEC | FAN_ONDIR)
METADATA = struct.Struct("<IBBHQii")           # event_len, vers, reserved, len, mask, fd, pid
INFO_HEADER = struct.Struct("<BBH")             # info_type, pad, len
FSID_AND_HANDLE = struct.Struct("<8sIi")        # fsid, handle_bytes, handle_type
READ_SIZE = 1 << 16
O_PATH = getattr(os, "O_PATH", 0o10000000)
MEMORY_SECONDS = 5.0
DIR_CACHE_SIZE = 65536

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def _init(flags: int) -> int:
    fd = _libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _mark(fd: int, flags: int, mask: int, path: str) -> None:
    if _libc.fanotify_mark(fd, flags, mask, -100, path.encode()) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fanotify_mark {path}: {os.strerror(err)}")


class FanotifyBackend(Backend):
    name = "fanotify"

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "needs root (CAP_SYS_ADMIN)"
        try:
            os.close(_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_REPORT_DFID_NAME))
        except OSError as exc:
            return False, (f"fanotify_init with FAN_REPORT_DFID_NAME failed ({exc.strerror}):"
                           " Linux 5.9 or newer with fanotify is needed")
        return True, "root and fanotify with directory handles and names"

    def __init__(self, rules: RuleSet, queue_size: int | None = None,
                 unlimited_queue: bool = True) -> None:
        super().__init__(rules)
        self.unlimited_queue = unlimited_queue
        self.fd = -1
        self.overflows = 0
        self.pidfd = True
        self.mount_fds: dict[str, int] = {}         # marked path -> O_PATH fd
        self.marks: dict[tuple[int, str], int] = {}  # (flags, path) -> users
        self.fresh: dict[str, float] = {}           # created: its first close-write is it
        self.execs: dict[tuple[str, int], float] = {}
        self.dir_paths: OrderedDict[bytes, str] = OrderedDict()   # handle -> last path
        self.unresolved = 0
    # -- marks ---------------------------------------------------------------------
    def _marks_for(self, rule: Rule) -> list[tuple[int, str]]:
        if rule.kind == "path":
            assert rule.target is not None
            parent = os.path.dirname(rule.target) or "/"
            if not os.path.isdir(parent):
                raise RuleError(f"cannot watch {rule.target}: directory {parent} "
                                "does not exist")
            return [(FAN_MARK_INODE, parent)]
        target = rule.target if rule.kind == "dir" else "/"
        if rule.kind == "dir" and not os.path.isdir(target or ""):
            raise RuleError(f"watched directory {target} does not exist")
        return [(FAN_MARK_FILESYSTEM, target or "/")]

    def _add_marks(self, rule: Rule) -> None:
        for key in self._marks_for(rule):
            if self.marks.get(key, 0) == 0:
                flags, path = key
                mask = EVENTS | (FAN_EVENT_ON_CHILD if flags == FAN_MARK_INODE else 0)
                try:
                    _mark(self.fd, FAN_MARK_ADD | flags, mask, path)
                except OSError as exc:
                    raise RuleError(f"cannot watch {path} with fanotify: {exc.strerror}"
                                    ) from None
                self.mount_fds.setdefault(path, os.open(
                    path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))  # O_PATH: EBADF
            self.marks[key] = self.marks.get(key, 0) + 1

    def start(self) -> None:
        # A filesystem mark sees the whole filesystem: the default queue (16384 events)
        # overflows under load, so the queue is unlimited (kernel memory, root only).
        base = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME \
            | FAN_REPORT_FID | (FAN_UNLIMITED_QUEUE if self.unlimited_queue else 0)
        try:
            self.fd = _init(base | FAN_REPORT_PIDFD)
        except OSError:
            self.pidfd = False
            try:
                self.fd = _init(base)
            except OSError as exc:
                raise BackendUnavailable(f"fanotify_init failed: {exc.strerror}") from None
        for rule in self.rules:
            self._add_marks(rule)

    def add_rule(self, rid: int, rule: Rule) -> None:
        self._add_marks(rule)

    def remove_rule(self, rid: int, rule: Rule) -> None:
        for key in self._marks_for(rule):
            users = self.marks.get(key, 0) - 1
            if users > 0:
                self.marks[key] = users
                continue
            self.marks.pop(key, None)
            flags, path = key
            try:
                mask = EVENTS | (FAN_EVENT_ON_CHILD if flags == FAN_MARK_INODE else 0)
                _mark(self.fd, FAN_MARK_REMOVE | flags, mask, path)
            except OSError:
                pass

    def watched_count(self) -> int:
        return len(self.marks)

    def lost(self) -> dict[str, int]:
        # Events whose directory could not be named are not counted as lost: every
        # directory of a watched tree is named when its creation is read (see _remember),
        # so those are events of other parts of the filesystem.
        return {"fanotify_overflow": self.overflows}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for fd in self.mount_fds.values():
            os.close(fd)
        self.mount_fds.clear()

    # -- events --------------------------------------------------------------------
    def _resolve(self, handle: bytes, name: str | None) -> str | None:
        """A directory handle (+ name) as a path, through any marked filesystem.  A
        directory deleted before its event was read no longer opens: the path it had
        when last seen is used (directory handles are stable)."""
        directory = None
        for mount_fd in self.mount_fds.values():
            fd = _libc.open_by_handle_at(mount_fd, handle, O_PATH | os.O_CLOEXEC)
            if fd < 0:
                continue
            try:
                directory = os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            if directory.endswith(" (deleted)"):
                directory = None
                continue
            self.dir_paths[handle] = directory
            self.dir_paths.move_to_end(handle)
            if len(self.dir_paths) > DIR_CACHE_SIZE:
                self.dir_paths.popitem(last=False)
            break
        if directory is None:
            directory = self.dir_paths.get(handle)
            if directory is None:
                self.unresolved += 1
                return None
        if name in (None, "", "."):
            return directory
        return os.path.join(directory, name)

    def _parse_info(self, data: bytes, pos: int, end: int) -> dict[int, tuple]:
        infos: dict[int, tuple] = {}
        while pos + INFO_HEADER.size <= end:
            info_type, _, length = INFO_HEADER.unpack_from(data, pos)
            if length == 0:
                break
            body = pos + INFO_HEADER.size
            if info_type == INFO_PIDFD:
                infos[info_type] = (struct.unpack_from("<i", data, body)[0],)
            elif info_type in (INFO_FID, INFO_DFID, INFO_DFID_NAME, INFO_OLD_DFID_NAME,
                               INFO_NEW_DFID_NAME):
                _, hbytes, htype = FSID_AND_HANDLE.unpack_from(data, body)
                hstart = body + 8
                handle = data[hstart:hstart + 8 + hbytes]
                name = None
                if info_type in (INFO_DFID_NAME, INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME):
                    nstart = hstart + 8 + hbytes
                    name = data[nstart:pos + length].split(b"\0", 1)[0].decode(
                        errors="surrogateescape")
                infos[info_type] = (handle, name)
            pos += length
        return infos

    def _process(self, ev: Event, pid: int, pidfd: int | None) -> None:
        ev.pid = pid
        facts = read_proc_facts(pid)
        alive = True
        if pidfd is not None:
            if pidfd < 0:
                alive = False
            else:
                try:
                    signal.pidfd_send_signal(pidfd, 0)
                except ProcessLookupError:
                    alive = False
                except OSError:
                    pass
        for key, value in facts.items():
            setattr(ev, key, value)
        if not alive or "exe" not in facts or "comm" not in facts:
            ev.stale = True     # exited (or exiting) before its event was read

    def _emit(self, out: list, op: str, path: str | None, path2: str | None, pid: int,
              pidfd: int | None, access: str | None = None) -> None:
        if op == "link" and path2 is None:
            path, path2 = None, path
        ev = Event(op=op, path=path, path2=path2, backend=self.name, time=time.time_ns(),
                   access=access)
        target = path2 if op in ("link", "rename") else path
        if target:
            try:
                st = os.lstat(target)
                ev.dev, ev.ino = st.st_dev, st.st_ino
            except OSError:
                pass
        if self.rules.select(ev) is None:
            return      # cheap to drop here: its process facts are not read
        ev.keys = []    # the consumer's match attaches them
        self._process(ev, pid, pidfd)
        out.append(ev)

    def read(self, timeout: float) -> list[Event]:
        out: list[Event] = []
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            return out
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                break
            pos = 0
            while pos + METADATA.size <= len(data):
                ev_len, _, _, meta_len, mask, fd, pid = METADATA.unpack_from(data, pos)
                if ev_len < METADATA.size:
                    break
                if fd >= 0:
                    os.close(fd)
                self._one(out, data, pos, meta_len, ev_len, mask, pid)
                pos += ev_len
        self._forget(time.monotonic() - MEMORY_SECONDS)
        return out

    def _one(self, out: list, data: bytes, pos: int, meta_len: int, ev_len: int, mask: int,
             pid: int) -> None:
        if mask & FAN_Q_OVERFLOW:
            self.overflows += 1
            return
        infos = self._parse_info(data, pos + meta_len, pos + ev_len)
        pidfd = infos.get(INFO_PIDFD, (None,))[0]
        try:
            is_dir = bool(mask & FAN_ONDIR)
            if mask & FAN_RENAME:
                old = infos.get(INFO_OLD_DFID_NAME)
                new = infos.get(INFO_NEW_DFID_NAME)
                src = self._resolve(*old) if old else None
                dst = self._resolve(*new) if new else None
                if is_dir:
                    self._remember(infos, dst)
                self._emit(out, "rename", src, dst, pid, pidfd)
                return
            dfid = infos.get(INFO_DFID_NAME) or infos.get(INFO_DFID)
            if dfid is None:
                return
            path = self._resolve(*dfid)
            if path is None:
                return
            now = time.monotonic()
            if mask & FAN_CREATE:
                if is_dir:
                    self._remember(infos, path)
                op = entry_op(path, is_dir)
                self._emit(out, op, path, None, pid, pidfd)
                if op == "create":
                    self.fresh[path] = now
            if mask & FAN_OPEN_EXEC:
                self._emit(out, "exec", path, None, pid, pidfd)
                self.execs[(path, pid)] = now
            if mask & FAN_ATTRIB:
                self._emit(out, "attr", path, None, pid, pidfd)
            if mask & FAN_CLOSE_WRITE and not is_dir:
                if self.fresh.pop(path, None) is None:
                    self._emit(out, "open", path, None, pid, pidfd, access="w")
            if mask & FAN_CLOSE_NOWRITE and not is_dir:
                if self.execs.pop((path, pid), None) is None and not mask & FAN_OPEN_EXEC:
                    self._emit(out, "open", path, None, pid, pidfd, access="r")
            if mask & FAN_DELETE:
                self._emit(out, "rmdir" if is_dir else "unlink", path, None, pid, pidfd)
                self.fresh.pop(path, None)
        finally:
            if pidfd is not None and pidfd >= 0:
                os.close(pidfd)

    def _remember(self, infos: dict[int, tuple], path: str | None) -> None:
        """A new (or moved) directory: its own handle (the FID record) names it, so the
        events inside it stay readable even if it is gone before they are read."""
        fid = infos.get(INFO_FID)
        if fid is not None and path is not None:
            self.dir_paths[fid[0]] = path
            if len(self.dir_paths) > DIR_CACHE_SIZE:
                self.dir_paths.popitem(last=False)

    def _forget(self, cutoff: float) -> None:
        for table in (self.fresh, self.execs):
            for key in [k for k, t in table.items() if t < cutoff]:
                del table[key]
