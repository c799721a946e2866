"""inotify backend (inotify_simple): works without privileges, knows no process.

inotify reports events per directory watch, so a subtree needs one watch per directory.
New directories are watched as soon as their IN_CREATE is read, and then scanned: what
was created inside them before the watch existed is reported from the scan, so
``mkdir -p a/b/c && touch a/b/c/f`` is complete.  Renames are paired by cookie; a rename
that crosses the edge of the watched tree has only the side that inotify saw (the other
path is absent).  inotify cannot tell who did anything: pid, uid, comm, exe, syscall and
result are always absent.  It cannot tell chmod from chown or utime ("attr"), does not
see executions, and reports opens when the file is closed (IN_CLOSE_WRITE: opened for
write; IN_CLOSE_NOWRITE: opened for read).  Create or link is told by the link count
when the event is read (marked inferred).  Directories the user cannot read are skipped
with one warning naming them; a watched path that cannot be read is a rule error.
"""
from __future__ import annotations

import errno
import os
import time

from inotify_simple import INotify, flags

from .. import ops
from ..diag import get_logger
from ..events import Event, ProcessState
from ..rules import Rule, RuleError, RuleSet
from .base import Backend, BackendUnavailable, entry_op

# What a directory watch asks for: every entry change, attribute change and close.
# IN_OPEN is asked for only to keep two close-writes of one file apart: the kernel merges
# identical consecutive events, and two opens for write are two audited operations.
DIR_MASK = (flags.OPEN | flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO
            | flags.ATTRIB | flags.CLOSE_WRITE | flags.CLOSE_NOWRITE | flags.DELETE_SELF
            | flags.MOVE_SELF | flags.DONT_FOLLOW | flags.EXCL_UNLINK | flags.ONLYDIR)

# How long a created file's first close-write, or a scanned entry's queued IN_CREATE, is
# waited for before the bookkeeping for it is dropped.
MEMORY_SECONDS = 5.0
MOVE_PAIR_MS = 10          # a rename's MOVED_TO may come in the next read: waited for this long
MERGE_NOTE = ("inotify merges identical consecutive events for one file: repeated "
              "operations (two chmods in a row) are folded without trace, not counted "
              "as lost")
SKIPPED_SHOWN = 20      # directories named in one warning


class InotifyBackend(Backend):
    name = "inotify"

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        try:
            INotify().close()
        except OSError as exc:
            return False, f"inotify_init1 failed: {exc.strerror}"
        return True, "inotify available (no process attribution)"

    def __init__(self, rules: RuleSet, queue_size: int | None = None) -> None:
        super().__init__(rules)
        self.inotify: INotify | None = None
        self.wd_path: dict[int, str] = {}       # watch descriptor -> directory path
        self.path_wd: dict[str, int] = {}
        self.recursive: set[str] = set()        # roots of subtree watches
        self.overflows = 0
        self.pending_from: dict[int, tuple[str, bool]] = {}
        # Created files whose first close-write belongs to the create, and entries a scan
        # already reported (their own IN_CREATE may still be queued): path -> when.
        self.fresh: dict[str, float] = {}
        self.scanned: dict[str, float] = {}
        # Directories of watched trees that cannot be read (permissions): not watched,
        # named in one warning (at start, then once per read that finds new ones).
        self.unreadable: list[str] = []
        self.unreadable_seen: set[str] = set()

    # -- watches ---------------------------------------------------------------
    def _watch_dir(self, path: str) -> bool:
        """Watch one directory; False when it cannot be (gone, or not readable: then
        it is noted for the warning)."""
        assert self.inotify is not None
        try:
            wd = self.inotify.add_watch(path, DIR_MASK)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            if exc.errno == errno.ENOSPC:
                raise BackendUnavailable(
                    f"inotify watch limit reached adding {path}: raise "
                    "/proc/sys/fs/inotify/max_user_watches") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                self._unreadable(path)
                return False
            raise
        old = self.wd_path.get(wd)
        if old is not None and old != path:
            self.path_wd.pop(old, None)
        self.wd_path[wd] = path
        self.path_wd[path] = wd
        return True

    def _unreadable(self, path: str) -> None:
        if path not in self.unreadable_seen:
            self.unreadable_seen.add(path)
            self.unreadable.append(path)

    def _warn_unreadable(self) -> None:
        """One warning naming the directories found unreadable since the last one."""
        if not self.unreadable:
            return
        names = self.unreadable[:SKIPPED_SHOWN]
        more = len(self.unreadable) - len(names)
        get_logger("inotify").warning(
            "directories not readable: not watched, their entries are not audited",
            count=len(self.unreadable),
            directories=", ".join(names) + (f" and {more} more" if more else ""))
        self.unreadable.clear()

    def _in_subtree(self, path: str) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in self.recursive)

    def _watch_tree(self, root: str, report: list[Event | ProcessState] | None = None) -> None:
        """Watch root and every directory below it; with ``report``, also report what is
        found there (entries created before the watch could exist)."""
        if not self._watch_dir(root):
            return
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                entries = list(os.scandir(d))
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM):
                    # watched (its own entries are seen) but its content is unknown
                    self._unreadable(d)
                continue
            for entry in entries:
                is_dir = entry.is_dir(follow_symlinks=False)
                if report is not None:
                    op = entry_op(entry.path, is_dir)
                    self._emit(report, op, entry.path, inferred=not is_dir)
                    now = time.monotonic()
                    self.scanned[entry.path] = now
                    if op == ops.CREATE:
                        self.fresh[entry.path] = now
                if is_dir:
                    self._watch_dir(entry.path)
                    stack.append(entry.path)

    def _unwatch_tree(self, root: str) -> None:
        assert self.inotify is not None
        prefix = root.rstrip("/") + "/"
        for path in [p for p in self.path_wd if p == root or p.startswith(prefix)]:
            wd = self.path_wd.pop(path)
            self.wd_path.pop(wd, None)
            try:
                self.inotify.rm_watch(wd)
            except OSError:
                pass

    def _retarget_tree(self, old: str, new: str) -> None:
        """A watched directory was renamed inside the tree: its watches keep working."""
        prefix = old.rstrip("/") + "/"
        for path in [p for p in self.path_wd if p == old or p.startswith(prefix)]:
            wd = self.path_wd.pop(path)
            moved = new + path[len(old):]
            self.path_wd[moved] = wd
            self.wd_path[wd] = moved

    def _readable_root(self, path: str) -> None:
        """A watched path that cannot be read at all is an error, not a warning."""
        if not os.access(path, os.R_OK | os.X_OK):
            raise RuleError(f"cannot watch {path}: permission denied")

    def _install(self, rule: Rule) -> None:
        if rule.kind == "inode":
            raise RuleError("the inotify backend cannot watch by inode number: "
                            "use a path rule or the ebpf/fanotify backend")
        assert rule.target is not None
        if rule.kind == "dir":
            if not os.path.isdir(rule.target):
                raise RuleError(f"watched directory {rule.target} does not exist")
            self._readable_root(rule.target)
            self.recursive.add(rule.target)
            self._watch_tree(rule.target)
        else:
            parent = os.path.dirname(rule.target) or "/"
            if not os.path.isdir(parent):
                raise RuleError(f"cannot watch {rule.target}: directory {parent} "
                                "does not exist")
            self._readable_root(parent)
            self._watch_dir(parent)
            if os.path.isdir(rule.target):
                self._watch_dir(rule.target)

    def start(self) -> None:
        self.inotify = INotify(nonblocking=False)
        for rule in self.rules:
            self._install(rule)
        self._warn_unreadable()

    def add_rule(self, rid: int, rule: Rule) -> None:
        self._install(rule)
        self._warn_unreadable()

    def remove_rule(self, rid: int, rule: Rule) -> None:
        if rule.kind == "dir" and rule.target in self.recursive:
            if not any(r.kind == "dir" and r.target == rule.target for r in self.rules):
                self.recursive.discard(rule.target)
                if not self._in_subtree(rule.target):
                    self._unwatch_tree(rule.target)

    def watched_count(self) -> int:
        return len(self.wd_path)

    def lost(self) -> dict[str, int]:
        return {"inotify_overflow": self.overflows}

    def limits(self) -> list[str]:
        notes = [MERGE_NOTE]
        if self.unreadable_seen:
            notes.append(f"{len(self.unreadable_seen)} unreadable directories were not "
                         "watched: operations in them are not seen")
        return notes

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None

    # -- events ----------------------------------------------------------------
    def _emit(self, out: list[Event | ProcessState], op: str, path: str | None,
              path2: str | None = None, access: str | None = None,
              inferred: bool = False) -> None:
        if op == ops.LINK and path2 is None:
            path, path2 = None, path   # the new name; the existing one is unknown
        ev = Event(op=op, path=path, path2=path2, backend=self.name, time=time.time_ns(),
                   access=access)
        if inferred:
            ev.inferred = ["op"]    # create or link: the name's link count when read
        out.append(ev)      # the consumer's match (RuleSet.select) decides

    def read(self, timeout: float) -> list[Event | ProcessState]:
        assert self.inotify is not None
        out: list[Event | ProcessState] = []
        self._take(self.inotify.read(timeout=int(timeout * 1000)), out)
        # The kernel queues a rename's MOVED_TO just after its MOVED_FROM, so a read can
        # end between them: before concluding that a name left the tree, look once more.
        if self.pending_from:
            self._take(self.inotify.read(timeout=MOVE_PAIR_MS), out)
        # A MOVED_FROM whose MOVED_TO did not follow left the tree.
        for cookie, (gone, is_dir) in list(self.pending_from.items()):
            del self.pending_from[cookie]
            self._emit(out, ops.RENAME, gone, None)
            if is_dir:
                self._unwatch_tree(gone)
        self._forget_older_than(time.monotonic() - MEMORY_SECONDS)
        self._warn_unreadable()
        return out

    def _take(self, raw: list, out: list[Event | ProcessState]) -> None:
        """Turn one read's inotify events into Events, renames paired by cookie."""
        for e in raw:
            if e.mask & flags.Q_OVERFLOW:
                self.overflows += 1
                continue
            base = self.wd_path.get(e.wd)
            if e.mask & flags.IGNORED:
                if base is not None:
                    self.wd_path.pop(e.wd, None)
                    if self.path_wd.get(base) == e.wd:
                        self.path_wd.pop(base, None)
                continue
            if base is None or not e.name:
                continue
            path = os.path.join(base, e.name)
            is_dir = bool(e.mask & flags.ISDIR)
            if e.mask & flags.CREATE:
                if self.scanned.pop(path, None) is not None:
                    continue  # already reported by the scan of its new parent
                op = entry_op(path, is_dir)
                self._emit(out, op, path, inferred=not is_dir)
                if is_dir and self._in_subtree(path):
                    self._watch_tree(path, report=out)
                elif op == ops.CREATE:
                    self.fresh[path] = time.monotonic()
            elif e.mask & flags.DELETE:
                self._emit(out, ops.RMDIR if is_dir else ops.UNLINK, path)
                self.fresh.pop(path, None)
                self.scanned.pop(path, None)
            elif e.mask & flags.MOVED_FROM:
                self.pending_from[e.cookie] = (path, is_dir)
            elif e.mask & flags.MOVED_TO:
                src = self.pending_from.pop(e.cookie, None)
                if src is not None:
                    self._emit(out, ops.RENAME, src[0], path)
                    if is_dir:
                        if self._in_subtree(path):
                            self._retarget_tree(src[0], path)
                        else:
                            self._unwatch_tree(src[0])
                else:
                    self._emit(out, ops.RENAME, None, path)
                    if is_dir and self._in_subtree(path):
                        self._watch_tree(path)
            elif e.mask & flags.ATTRIB:
                self._emit(out, ops.ATTR, path)
            elif e.mask & flags.CLOSE_WRITE:
                if self.fresh.pop(path, None) is None:
                    self._emit(out, ops.OPEN, path, access="w")
            elif e.mask & flags.CLOSE_NOWRITE and not is_dir:
                self._emit(out, ops.OPEN, path, access="r")

    def _forget_older_than(self, cutoff: float) -> None:
        """Entries are inserted in time order, so the old ones are at the front."""
        for table in (self.fresh, self.scanned):
            while table:
                path, when = next(iter(table.items()))
                if when >= cutoff:
                    break
                del table[path]
