"""fanotify backend: pid-attributed events for root where eBPF cannot load.

Built on directory file handles with names (FAN_REPORT_DFID_NAME) and FAN_RENAME.

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
The process: the event's pid, and whether it was still alive when the event was read,
through the pidfd that comes with it (FAN_REPORT_PIDFD); an event whose process had
exited is marked stale.  Its uid, comm, exe are the consumer's to read from /proc
(enrich.ProcessFacts), for the events it keeps: a filesystem mark reports the whole
filesystem.  One pidfd per process of a read is held until the next read, so that its
pid cannot be reused before the consumer has read its facts.
fanotify knows no syscall and no result, cannot tell chmod from chown (op "attr") and
does not see truncate (a modification).
The kernel interface itself (calls, record layouts) is in fanotify_c.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict

from .. import ops
from ..events import Event, ProcessState
from ..rules import Rule, RuleError, RuleSet
from .base import Backend, BackendUnavailable, entry_op
from .fanotify_c import (
    FAN_ATTRIB,
    FAN_CLASS_NOTIF,
    FAN_CLOEXEC,
    FAN_CLOSE_NOWRITE,
    FAN_CLOSE_WRITE,
    FAN_CREATE,
    FAN_DELETE,
    FAN_EVENT_ON_CHILD,
    FAN_MARK_ADD,
    FAN_MARK_FILESYSTEM,
    FAN_MARK_INODE,
    FAN_MARK_REMOVE,
    FAN_NONBLOCK,
    FAN_ONDIR,
    FAN_OPEN_EXEC,
    FAN_Q_OVERFLOW,
    FAN_RENAME,
    FAN_REPORT_DFID_NAME,
    FAN_REPORT_FID,
    FAN_REPORT_PIDFD,
    FAN_UNLIMITED_QUEUE,
    INFO_DFID,
    INFO_DFID_NAME,
    INFO_FID,
    INFO_NEW_DFID_NAME,
    INFO_OLD_DFID_NAME,
    Info,
    RawEvent,
    init,
    mark,
    open_by_handle,
    process_exited,
    read_events,
)

EVENTS = (FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_ATTRIB | FAN_CLOSE_WRITE
          | FAN_CLOSE_NOWRITE | FAN_OPEN_EXEC | FAN_ONDIR)
MEMORY_SECONDS = 5.0
DIR_CACHE_SIZE = 65536
PINNED_MAX = 256        # pidfds held until the next read (distinct processes)


class FanotifyBackend(Backend):
    name = "fanotify"

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "needs root (CAP_SYS_ADMIN)"
        try:
            os.close(init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_REPORT_DFID_NAME))
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
        self.pinned: dict[int, int] = {}            # pid -> pidfd, until the next read

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
                    mark(self.fd, FAN_MARK_ADD | flags, mask, path)
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
            self.fd = init(base | FAN_REPORT_PIDFD)
        except OSError:
            self.pidfd = False
            try:
                self.fd = init(base)
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
                mark(self.fd, FAN_MARK_REMOVE | flags, mask, path)
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
        self._unpin()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for fd in self.mount_fds.values():
            os.close(fd)
        self.mount_fds.clear()

    # -- events --------------------------------------------------------------------
    def _resolve(self, info: Info) -> str | None:
        """A directory handle (+ name) as a path, through any marked filesystem.  A
        directory deleted before its event was read no longer opens: the path it had
        when last seen is used (directory handles are stable)."""
        handle, name = info.handle, info.name
        directory = None
        for mount_fd in self.mount_fds.values():
            try:
                fd = open_by_handle(mount_fd, handle)
            except OSError:
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

    def _emit(self, out: list, op: str, path: str | None, path2: str | None, pid: int,
              stale: bool, access: str | None = None) -> None:
        if op == ops.LINK and path2 is None:
            path, path2 = None, path
        ev = Event(op=op, path=path, path2=path2, backend=self.name, time=time.time_ns(),
                   access=access, pid=pid)
        if stale:
            ev.stale = True     # exited (or exiting) before its event was read
        target = path2 if op in (ops.LINK, ops.RENAME) else path
        if target:
            try:
                st = os.lstat(target)
                ev.dev, ev.ino = st.st_dev, st.st_ino
            except OSError:
                pass
        out.append(ev)      # the consumer's match (RuleSet.select) decides

    def read(self, timeout: float) -> list[Event | ProcessState]:
        # The consumer is done with the events of the previous read.
        self._unpin()
        out: list[Event | ProcessState] = []
        for raw in read_events(self.fd, timeout):
            self._one(out, raw)
        self._forget(time.monotonic() - MEMORY_SECONDS)
        return out

    def _one(self, out: list, raw: RawEvent) -> None:
        pidfd = raw.pidfd
        emitted = len(out)
        stale = False
        try:
            if raw.mask & FAN_Q_OVERFLOW:
                self.overflows += 1
                return
            if pidfd is not None:
                stale = pidfd < 0 or process_exited(pidfd)
            self._translate(out, raw, stale)
        finally:
            if pidfd is not None and pidfd >= 0:
                if (len(out) > emitted and not stale and raw.pid not in self.pinned
                        and len(self.pinned) < PINNED_MAX):
                    self.pinned[raw.pid] = pidfd
                else:
                    os.close(pidfd)

    def _translate(self, out: list, raw: RawEvent, stale: bool) -> None:
        mask, pid, infos = raw.mask, raw.pid, raw.infos
        is_dir = bool(mask & FAN_ONDIR)
        if mask & FAN_RENAME:
            old = infos.get(INFO_OLD_DFID_NAME)
            new = infos.get(INFO_NEW_DFID_NAME)
            src = self._resolve(old) if old else None
            dst = self._resolve(new) if new else None
            if is_dir:
                self._remember(infos, dst)
            self._emit(out, ops.RENAME, src, dst, pid, stale)
            return
        dfid = infos.get(INFO_DFID_NAME) or infos.get(INFO_DFID)
        if dfid is None:
            return
        path = self._resolve(dfid)
        if path is None:
            return
        now = time.monotonic()
        if mask & FAN_CREATE:
            if is_dir:
                self._remember(infos, path)
            op = entry_op(path, is_dir)
            self._emit(out, op, path, None, pid, stale)
            if op == ops.CREATE:
                self.fresh[path] = now
        if mask & FAN_OPEN_EXEC:
            self._emit(out, ops.EXEC, path, None, pid, stale)
            self.execs[(path, pid)] = now
        if mask & FAN_ATTRIB:
            self._emit(out, ops.ATTR, path, None, pid, stale)
        if mask & FAN_CLOSE_WRITE and not is_dir:
            if self.fresh.pop(path, None) is None:
                self._emit(out, ops.OPEN, path, None, pid, stale, access="w")
        if mask & FAN_CLOSE_NOWRITE and not is_dir:
            if self.execs.pop((path, pid), None) is None and not mask & FAN_OPEN_EXEC:
                self._emit(out, ops.OPEN, path, None, pid, stale, access="r")
        if mask & FAN_DELETE:
            self._emit(out, ops.RMDIR if is_dir else ops.UNLINK, path, None, pid, stale)
            self.fresh.pop(path, None)

    def _unpin(self) -> None:
        for pidfd in self.pinned.values():
            os.close(pidfd)
        self.pinned.clear()

    def _remember(self, infos: dict[int, Info], path: str | None) -> None:
        """A new (or moved) directory: its own handle (the FID record) names it, so the
        events inside it stay readable even if it is gone before they are read."""
        fid = infos.get(INFO_FID)
        if fid is not None and path is not None:
            self.dir_paths[fid.handle] = path
            if len(self.dir_paths) > DIR_CACHE_SIZE:
                self.dir_paths.popitem(last=False)

    def _forget(self, cutoff: float) -> None:
        for fresh in [k for k, t in self.fresh.items() if t < cutoff]:
            del self.fresh[fresh]
        for ex in [k for k, t in self.execs.items() if t < cutoff]:
            del self.execs[ex]
