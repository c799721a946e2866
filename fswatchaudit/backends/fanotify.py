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
An exec that fanotify reports after a process's events (same read) marks them stale:
/proc then describes the new program.
Create or link comes from the entry's own inode handle (FAN_REPORT_TARGET_FID), not from
the name when read; what cannot be decided so is marked inferred (see _created).
The kernel merges unread events for one object and process: an event whose mask holds
several operations gives one event per operation, each marked merged; repeats of one
operation are invisible, which limits() says (the summary prints it).
fanotify knows no syscall and no result, cannot tell chmod from chown (op "attr") and
does not see truncate (a modification).
The kernel interface itself (calls, record layouts) is in fanotify_c.
"""
from __future__ import annotations

import os
import select
import time
from collections import OrderedDict
from typing import TextIO

from .. import ops
from ..diag import get_logger
from ..events import Event, ProcessState
from ..rules import Rule, RuleError, RuleSet
from .base import Backend, BackendUnavailable, entry_op, entry_op_of
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
    FAN_REPORT_TARGET_FID,
    FAN_UNLIMITED_QUEUE,
    INFO_DFID,
    INFO_DFID_NAME,
    INFO_FID,
    INFO_NEW_DFID_NAME,
    INFO_OLD_DFID_NAME,
    Info,
    RawEvent,
    birth_time,
    init,
    mark,
    mounts_below,
    open_by_handle,
    process_exited,
    read_events,
)

EVENTS = (FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_ATTRIB | FAN_CLOSE_WRITE
          | FAN_CLOSE_NOWRITE | FAN_OPEN_EXEC | FAN_ONDIR)
MEMORY_SECONDS = 5.0
DIR_CACHE_SIZE = 65536
REMOVALS = frozenset({ops.UNLINK, ops.RMDIR})
PINNED_MAX = 256        # pidfds held until the next read (distinct processes)
KNOWN_MAX = 1 << 17     # inode handles remembered from events (an entry of a known inode
                        # is a link)
# The operations one event's mask can carry: more than one means the kernel merged
# queued events for the same object (repeats of one operation leave no trace at all).
OP_BITS = (FAN_CREATE, FAN_DELETE, FAN_ATTRIB, FAN_CLOSE_WRITE, FAN_CLOSE_NOWRITE,
           FAN_OPEN_EXEC)
CLOCK_REALTIME_COARSE = 5   # the clock inode timestamps are taken from
MERGE_NOTE = ("fanotify merges unread events for one file and process: operations "
              "folded into one event are marked merged, repeats of one operation "
              "are folded without trace; neither is counted as lost")


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
        self.fresh: dict[str, float] = {}           # created: its first close-write is it
        self.execs: dict[tuple[str, int], float] = {}
        self.dir_paths: OrderedDict[bytes, str] = OrderedDict()   # handle -> last path
        # handle -> path, resolved during the current read (one open and readlink per
        # directory and read, not per event)
        self.read_dirs: dict[bytes, str] = {}
        self.read_exited: dict[int, bool] = {}      # pid -> exited, as of this read
        self.unresolved = 0
        self.pinned: dict[int, int] = {}            # pid -> pidfd, until the next read
        self.target_fid = True          # entry events carry the child's handle (5.17+)
        # Inode handles seen in events, oldest first, with when they were read (ns):
        # a new name for a known inode is a link.  forgotten_until: read time of the
        # newest entry dropped from the table (inodes born before may be unknown).
        self.known: OrderedDict[bytes, int] = OrderedDict()
        self.forgotten_until = 0
        self.started_ns = 0                         # when the first mark was added
        self.fs_marked: dict[int, int] = {}         # st_dev -> filesystem mark since (ns)
        self.marks: dict[tuple[int, object], int] = {}  # mark key -> users (rules)
        self.mark_paths: dict[tuple[int, object], str] = {}  # mark key -> path marked
        self.rule_marks: dict[tuple, set[tuple[int, object]]] = {}  # rule -> its marks
        self.fsid_fd: dict[int, int] = {}           # fsid -> a directory fd on it
        self.unmarkable: dict[str, str] = {}        # mount point below a rule -> why
        self.unmarkable_new: list[str] = []         # not warned about yet
        self.mountinfo: TextIO | None = None        # polled: the mount table changed
        self.mount_poll = select.poll()

    # -- marks ---------------------------------------------------------------------
    # A mark is keyed by what it marks: (FAN_MARK_FILESYSTEM, fsid) for a filesystem,
    # so that two directory rules on one filesystem share its mark (removing one rule
    # keeps the other's), and (FAN_MARK_INODE, path) for a directory.
    def _marks_for(self, rule: Rule) -> list[tuple[tuple[int, object], str, bool]]:
        """(key, path to mark through, required) for a rule: a directory rule also
        marks every filesystem mounted below its directory (not required: a filesystem
        fanotify cannot mark is a warning, not an error)."""
        if rule.kind == "path":
            assert rule.target is not None
            parent = os.path.dirname(rule.target) or "/"
            if not os.path.isdir(parent):
                raise RuleError(f"cannot watch {rule.target}: directory {parent} "
                                "does not exist")
            return [((FAN_MARK_INODE, parent), parent, True)]
        target = (rule.target if rule.kind == "dir" else "/") or "/"
        if rule.kind == "dir" and not os.path.isdir(target):
            raise RuleError(f"watched directory {target} does not exist")
        out: list[tuple[tuple[int, object], str, bool]] = [
            ((FAN_MARK_FILESYSTEM, os.statvfs(target).f_fsid), target, True)]
        if rule.kind == "dir":
            for below in mounts_below(target):
                try:
                    fsid = os.statvfs(below).f_fsid
                except OSError:
                    continue
                out.append(((FAN_MARK_FILESYSTEM, fsid), below, False))
        return out

    def _add_marks(self, rule: Rule) -> None:
        # Taken before the mark exists: an inode born later has a birth time at least this.
        since = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
        self.started_ns = self.started_ns or since
        held = self.rule_marks.setdefault(rule.identity(), set())
        for key, path, required in self._marks_for(rule):
            if key in held:
                continue
            if self.marks.get(key, 0) == 0:
                flags = key[0]
                mask = EVENTS | (FAN_EVENT_ON_CHILD if flags == FAN_MARK_INODE else 0)
                try:
                    mark(self.fd, FAN_MARK_ADD | flags, mask, path)
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as exc:
                    if required:
                        raise RuleError(f"cannot watch {path} with fanotify: "
                                        f"{exc.strerror}") from None
                    if path not in self.unmarkable:
                        self.unmarkable[path] = exc.strerror or str(exc)
                        self.unmarkable_new.append(path)
                    continue
                self.mark_paths[key] = path
                self.mount_fds[path] = fd       # (O_PATH fds: EBADF for handles)
                self.fsid_fd.setdefault(os.fstatvfs(fd).f_fsid, fd)
                if flags == FAN_MARK_FILESYSTEM:
                    self.fs_marked.setdefault(os.fstat(fd).st_dev, since)
            self.marks[key] = self.marks.get(key, 0) + 1
            held.add(key)
        self._warn_unmarkable()

    def _warn_unmarkable(self) -> None:
        if self.unmarkable_new:
            get_logger("fanotify").warning(
                "filesystems mounted below a watched directory cannot be watched: "
                "their changes are not audited",
                mounts=", ".join(f"{p} ({self.unmarkable[p]})" for p in self.unmarkable_new))
            self.unmarkable_new.clear()

    def _mounts_changed(self) -> None:
        """Mount table changed: mark filesystems newly mounted below directory rules
        (covered from now on: what happened on them before this read is not seen)."""
        if self.mountinfo is None or not self.mount_poll.poll(0):
            return
        self.mountinfo.seek(0)
        self.mountinfo.read()
        for rule in self.rules:
            if rule.kind == "dir":
                try:
                    self._add_marks(rule)
                except (RuleError, OSError):
                    continue    # the directory itself went away: its events say so

    def start(self) -> None:
        # A filesystem mark sees the whole filesystem: the default queue (16384 events)
        # overflows under load, so the queue is unlimited (kernel memory, root only).
        base = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME \
            | FAN_REPORT_FID | (FAN_UNLIMITED_QUEUE if self.unlimited_queue else 0)
        error = None
        for flags in (base | FAN_REPORT_TARGET_FID | FAN_REPORT_PIDFD,
                      base | FAN_REPORT_PIDFD, base):
            try:
                self.fd = init(flags)
                break
            except OSError as exc:
                error = exc
        else:
            assert error is not None
            raise BackendUnavailable(f"fanotify_init failed: {error.strerror}") from None
        self.target_fid = bool(flags & FAN_REPORT_TARGET_FID)
        self.pidfd = bool(flags & FAN_REPORT_PIDFD)
        try:
            self.mountinfo = open("/proc/self/mountinfo")    # noqa: SIM115 (kept open)
            self.mount_poll.register(self.mountinfo, select.POLLPRI | select.POLLERR)
            self.mountinfo.read()
        except OSError:
            self.mountinfo = None
        for rule in self.rules:
            self._add_marks(rule)

    def add_rule(self, rid: int, rule: Rule) -> None:
        self._add_marks(rule)

    def remove_rule(self, rid: int, rule: Rule) -> None:
        for key in self.rule_marks.pop(rule.identity(), set()):
            users = self.marks.get(key, 0) - 1
            if users > 0:
                self.marks[key] = users
                continue
            self.marks.pop(key, None)
            path = self.mark_paths.pop(key)
            flags = key[0]
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

    def limits(self) -> list[str]:
        notes = [MERGE_NOTE]
        if self.unmarkable:
            notes.append(f"{len(self.unmarkable)} filesystems mounted below watched "
                         "directories could not be marked: their changes are not seen")
        return notes

    def close(self) -> None:
        self._unpin()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for fd in self.mount_fds.values():
            os.close(fd)
        self.mount_fds.clear()
        self.fsid_fd.clear()
        if self.mountinfo is not None:
            self.mountinfo.close()
            self.mountinfo = None

    # -- events --------------------------------------------------------------------
    def _resolve(self, info: Info) -> str | None:
        """A directory handle (+ name) as a path, through any marked filesystem.  A
        directory deleted before its event was read no longer opens: the path it had
        when last seen is used (directory handles are stable)."""
        handle, name = info.handle, info.name
        directory = self.read_dirs.get(handle)
        if directory is not None:
            return directory if name in (None, "", ".") else os.path.join(directory, name)
        for mount_fd in self._mount_fds_for(info):
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
            self.read_dirs[handle] = directory
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
              stale: bool, access: str | None = None,
              ident: tuple[int, int] | None = None) -> Event:
        if op == ops.LINK and path2 is None:
            path, path2 = None, path
        ev = Event(op=op, path=path, path2=path2, backend=self.name, time=time.time_ns(),
                   access=access, pid=pid)
        if stale:
            ev.stale = True     # exited (or exiting) before its event was read
        target = path2 if op in (ops.LINK, ops.RENAME) else path
        if ident is not None:
            ev.dev, ev.ino = ident
        elif target and op not in REMOVALS:     # a removed name names nothing now
            try:
                st = os.lstat(target)
                ev.dev, ev.ino = st.st_dev, st.st_ino
            except OSError:
                pass
        out.append(ev)      # the consumer's match (RuleSet.select) decides
        return ev

    def read(self, timeout: float) -> list[Event | ProcessState]:
        # The consumer is done with the events of the previous read.
        self._unpin()
        self._mounts_changed()
        self.read_dirs.clear()
        self.read_exited.clear()
        out: list[Event | ProcessState] = []
        by_pid: dict[int, list[Event]] = {}
        for raw in read_events(self.fd, timeout):
            if raw.mask & FAN_OPEN_EXEC:
                # The process executed a program after these events: the facts the
                # consumer reads from /proc (exe, comm, uid...) are the new program's.
                for ev in by_pid.pop(raw.pid, ()):
                    ev.stale = True
            start = len(out)
            self._one(out, raw)
            for rec in out[start:]:
                assert isinstance(rec, Event)
                by_pid.setdefault(raw.pid, []).append(rec)
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
                if pidfd < 0:
                    stale = True
                else:       # one look per process and read
                    exited = self.read_exited.get(raw.pid)
                    if exited is None:
                        exited = self.read_exited[raw.pid] = process_exited(pidfd)
                    stale = exited
            self._translate(out, raw, stale)
            if sum(1 for bit in OP_BITS if raw.mask & bit) > 1:
                for ev in out[emitted:]:
                    ev.merged = True
        finally:
            if pidfd is not None and pidfd >= 0:
                if (len(out) > emitted and not stale and raw.pid not in self.pinned
                        and len(self.pinned) < PINNED_MAX):
                    self.pinned[raw.pid] = pidfd
                else:
                    os.close(pidfd)

    def _know(self, fid: Info | None) -> bool:
        """Remember an inode seen in an event; whether it had been seen before."""
        if fid is None:
            return False
        known = fid.handle in self.known
        self.known[fid.handle] = time.time_ns()
        if known:
            self.known.move_to_end(fid.handle)
        elif len(self.known) > KNOWN_MAX:
            _, self.forgotten_until = self.known.popitem(last=False)
        return known

    def _mount_fds_for(self, info: Info) -> list[int]:
        """Where a handle can be opened: a directory on the filesystem its fsid names
        (a handle decoded on another filesystem could name an unrelated inode)."""
        fd = self.fsid_fd.get(info.fsid)
        return [fd] if fd is not None else list(self.mount_fds.values())

    def _open_handle(self, info: Info) -> int | None:
        for mount_fd in self._mount_fds_for(info):
            try:
                return open_by_handle(mount_fd, info.handle)
            except OSError:
                continue
        return None

    def _created(self, path: str, is_dir: bool, fid: Info | None,
                 known: bool) -> tuple[str, bool, tuple[int, int] | None]:
        """Which operation made a new entry: (op, whether op was inferred from what the
        file looked like when the event was read, (dev, ino) of the new entry's inode).

        Decided from the event where it can be: the entry's own inode handle (kernel
        5.17+) says whether the inode was seen before (a link: link() also reports a
        change of the inode's link count first), and its birth time whether it existed
        before the audit (a link) or was born under a filesystem mark that would have
        reported any earlier name (a create).  Otherwise (an inode mark only, no birth
        time, the inode already gone) its link count when read decides, and the event
        says so (``inferred``)."""
        if fid is None:
            return entry_op(path, is_dir), not is_dir, None
        fd = self._open_handle(fid)
        if fd is None:                  # removed before the event was read
            if is_dir:
                return ops.MKDIR, False, None
            return (ops.LINK, False, None) if known else (ops.CREATE, True, None)
        try:
            st = os.fstat(fd)
            born = birth_time(fd)
        finally:
            os.close(fd)
        ident = (st.st_dev, st.st_ino)
        op = entry_op_of(st)
        if op != ops.CREATE:
            return op, False, ident     # the inode's type never changes
        if known:
            return ops.LINK, False, ident
        if born is not None and born > 0:
            if born < self.started_ns:
                return ops.LINK, False, ident   # older than the audit: not its first name
            since = self.fs_marked.get(st.st_dev)
            if since is not None and born >= since and born > self.forgotten_until:
                return ops.CREATE, False, ident
        return (ops.LINK if st.st_nlink > 1 else ops.CREATE), True, ident

    def _translate(self, out: list, raw: RawEvent, stale: bool) -> None:
        mask, pid, infos = raw.mask, raw.pid, raw.infos
        is_dir = bool(mask & FAN_ONDIR)
        fid = infos.get(INFO_FID)
        known = self._know(fid)
        if mask & FAN_RENAME:
            if is_dir:      # directories resolved earlier in this read may have moved
                self.read_dirs.clear()
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
            op, inferred, ident = self._created(path, is_dir, fid, known)
            ev = self._emit(out, op, path, None, pid, stale, ident=ident)
            if inferred:
                ev.inferred = ["op"]
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
