"""Ring buffer records -> Events and ProcessStates.

A record is struct event (abi.py): a fixed header, then NUL-separated strings: the
components of the first base directory (leaf first), the first path argument, the same
for the second path, then the program's path.  The decoder joins them, names the
operation, and merges the several records one io_uring request gives.  It keeps no
kernel resources, so it runs on synthetic records too.
"""
from __future__ import annotations

import os
from typing import Any

from ... import ops, syscalls
from ...diag import get_logger
from ...events import Event, ProcessState
from .abi import (
    AT_REMOVEDIR_FLAG,
    BASE_AS_BEFORE,
    COMPAT_BASE,
    CREATED_FLAG_SHIFT,
    DATA_SIZE,
    EV,
    EXE_AS_BEFORE,
    HEADER,
    IORING_OP_UNLINKAT,
    NO_ID,
    OFLAG,
    PATH_DEPTH,
    SHARED_SLOT,
    URING_FLAGS_SHIFT,
    URING_NAMED,
    URING_NEW_ENTRY,
    URING_OPENED,
    Header,
    user_dev,
)

log = get_logger("ebpf")
MAX_EXES = 65536
MAX_BASES = 65536         # threads whose last base directory is kept
MAX_CACHED = 16384        # decoded paths and command names kept for reuse
OPEN_SYSCALLS = frozenset({"open", "openat", "openat2", "creat", "open_by_handle_at"})
# operations that give a path a new inode (a file rule then marks the new one)
NEW_NAME_OPS = frozenset({ops.CREATE, ops.RENAME, ops.LINK, ops.SYMLINK, ops.MKNOD,
                          ops.MKDIR})

# operations that make a new entry in a directory (its parent is reported)
CREATING_OPS = frozenset({ops.CREATE, ops.MKDIR, ops.MKNOD, ops.SYMLINK})

# io_uring opcodes (include/uapi/linux/io_uring.h, an ABI) -> the operation they do.
IORING_OPS = {18: ops.CREATE, 28: ops.CREATE, 35: ops.RENAME, 36: ops.UNLINK,
              37: ops.MKDIR, 38: ops.SYMLINK, 39: ops.LINK, 41: ops.SETXATTR,
              42: ops.SETXATTR}


def mount_points(pid: int | str = "self") -> dict[int, str]:
    """st_dev -> where that filesystem's root is mounted (for paths of io_uring work)."""
    out: dict[int, str] = {}
    try:
        with open(f"/proc/{pid}/mountinfo") as fh:
            for line in fh:
                parts = line.split()
                major, minor = parts[2].split(":")
                if parts[3] == "/":
                    out.setdefault(os.makedev(int(major), int(minor)),
                                   parts[4].replace("\\040", " "))
    except OSError:
        pass
    return out


class Decoder:
    """Turns records into a batch of Events and ProcessStates, in order.

    ``tp_names`` maps syscall_spec slots to syscall names; ``audited`` and
    ``audit_keys`` are the processes of per-process audits (kept up to date by the
    backend and by the fork records), ``container`` resolves paths inside a container.
    """

    def __init__(self, backend: str = "ebpf") -> None:
        self.backend = backend
        self.tp_names: dict[int, str] = {}      # syscall_spec slot -> syscall name
        self.undecodable = 0
        self.time_offset = 0                    # wall clock minus bpf_ktime_get_ns()
        self.mounts: dict[int, str] = {}
        self.container = None
        self.audited: set[int] = set()
        self.audit_keys: dict[int, str] = {}    # audited pid -> key of its audit
        self.exes: dict[int, str] = {}          # tgid -> its program, as last sent
        # tid -> the base directory its last whole (not cut) record ended with
        # (BASE_AS_BEFORE), least recently sent first
        self.bases: dict[int, str] = {}
        self.paths: dict[tuple[bytes, ...], str] = {}   # decoded directory paths
        self.comms: dict[bytes, str] = {}
        self.batch: list[Event | ProcessState] = []
        # rule slot (a bit of event.rules) -> the rules in it (set by the backend)
        self.slot_rules: dict[int, list[tuple[int, Any]]] = {}
        self.path_targets: set[str] = set()     # targets of file rules
        self.renamed_targets = False            # one of them was created or replaced

    def take(self) -> list[Event | ProcessState]:
        """What was decoded since the last call, io_uring records merged."""
        out, self.batch = self.batch, []
        return merge_uring(out)

    def host_path(self, path: str) -> str:
        return self.container.host_path(path) if self.container else path

    def _base(self, tid: int, parts: list[bytes], n: int, pos: int
              ) -> tuple[str | None, int]:
        """A base directory: written in the record, or the thread's last one
        (BASE_AS_BEFORE; None when it is not known here)."""
        if n == BASE_AS_BEFORE:
            return self.bases.get(tid), pos
        return self._path(parts, n, pos)

    def _sent_base(self, tid: int, h: Any, base1: str, base2: str) -> None:
        """Remember the last base a whole record wrote, as the kernel does."""
        last = (base2 if h.base_dirs & 2 and h.n_base2 and h.n_base2 != BASE_AS_BEFORE
                else base1 if h.base_dirs & 1 and h.n_base1 and h.n_base1 != BASE_AS_BEFORE
                else None)
        if last is None:
            return
        self.bases.pop(tid, None)
        if len(self.bases) >= MAX_BASES:        # the least recently sent go first
            for old in list(self.bases)[:MAX_BASES // 4]:
                del self.bases[old]
        self.bases[tid] = last

    def _path(self, parts: list[bytes], n: int, pos: int) -> tuple[str, int]:
        key = tuple(parts[pos:pos + n])
        path = self.paths.get(key)
        if path is None:
            path = "/" + "/".join(p.decode(errors="surrogateescape") for p in reversed(key))
            if len(self.paths) >= MAX_CACHED:
                self.paths.clear()
            self.paths[key] = path
        return path, pos + n

    def _cut_strings(self, h: Any, raw: bytes) -> tuple[str, str | None, str, str | None,
                                                        str | None, list[str]]:
        """The strings of a record the kernel could not write whole (cut): what is
        there, with the fields that cannot be trusted named.  A walk of PATH_DEPTH
        components may lack its root side; once the string area was full, the string
        that filled it and everything after may be missing.  A path that lacks its
        root side is shown as "..." and the part that is there; a missing name as
        None."""
        strings = raw.split(b"\0")
        if strings and not strings[-1]:
            strings.pop()                       # what the last NUL ends
        ends, end = [], 0
        for s in strings:
            end += len(s) + 1
            ends.append(end)
        cut: list[str] = []
        pos = 0
        full_from = next((i for i, e in enumerate(ends) if e >= DATA_SIZE), len(strings))
        fields: list[str | None] = []
        before = {"path": h.n_base1 == BASE_AS_BEFORE, "path2": h.n_base2 == BASE_AS_BEFORE}
        for name, count, is_walk in (("path", 0 if before["path"] else h.n_base1, True),
                                     ("path", h.has_name1, False),
                                     ("path2", 0 if before["path2"] else h.n_base2, True),
                                     ("path2", h.has_name2, False),
                                     ("exe", 0 if h.n_exe == EXE_AS_BEFORE else h.n_exe,
                                      True)):
            if is_walk and name != "exe" and before[name]:
                known = self.bases.get(h.tid)
                fields.append(known or "...")
                if known is None:
                    cut.append(name)
                continue
            if not count:
                missing = is_walk and pos > full_from and name != "exe"
                fields.append(("..." if missing else "") if is_walk else None)
                if missing:
                    cut.append(name)            # a base left out: nothing of it is known
                continue
            taken = strings[pos:pos + count]
            short = len(taken) < count or (is_walk and (
                pos <= full_from < pos + count or count % PATH_DEPTH == 0))
            pos += count
            if is_walk:
                text = "/" + "/".join(p.decode(errors="surrogateescape")
                                      for p in reversed(taken))
                if short:
                    text = "..." + text if taken else ("..." if name != "exe" else "")
                fields.append(text)
            else:
                fields.append(taken[0].decode(errors="surrogateescape") if taken else None)
            if short:
                cut.append(name)
        if not cut:
            cut = ["path", "path2", "exe"]      # unreadable: anything may be short
        base1, name1, base2, name2, exe = fields
        return (base1 or "/", name1, base2 or "/", name2, exe or None,
                sorted(set(cut)))

    def on_record(self, data: memoryview | bytes, off: int, size: int) -> None:
        """Decode one record of ``size`` bytes at ``off`` (a RingReader handler).  A
        record that cannot be read is counted (``undecodable``, reported as lost) and
        never stops the audit."""
        try:
            self._decode(data, off, size)
        except Exception as exc:        # noqa: BLE001 - any flaw: count it, go on
            self.undecodable += 1
            self.bases.clear()          # it may have carried a thread's new base
            if self.undecodable == 1:
                log.warning("undecodable record", error=repr(exc), size=size)

    def _decode(self, data: memoryview | bytes, off: int, size: int) -> None:
        h: Any = Header._make(HEADER.unpack_from(data, off))
        start = off + HEADER.size
        raw = bytes(data[start:start + min(h.data_len, size - HEADER.size)])
        if h.cut:
            base1, name1, base2, name2, exe_given, cut = self._cut_strings(h, raw)
        else:
            parts = raw.split(b"\0")
            pos = 0
            known1, pos = self._base(h.tid, parts, h.n_base1, pos)
            name1 = None
            if h.has_name1:
                name1, pos = parts[pos].decode(errors="surrogateescape"), pos + 1
            known2, pos = self._base(h.tid, parts, h.n_base2, pos)
            name2 = None
            if h.has_name2:
                name2, pos = parts[pos].decode(errors="surrogateescape"), pos + 1
            exe_given = self._path(parts, h.n_exe, pos)[0] if (
                h.n_exe and h.n_exe != EXE_AS_BEFORE) else None
            cut = None
            # a base the thread's earlier record carried, which did not come here
            # (a record that could not be read): not guessed, marked
            unknown = [field for field, base, name in (("path", known1, name1),
                                                       ("path2", known2, name2))
                       if base is None and not (name or "").startswith("/")]
            if unknown:
                cut = unknown
            base1, base2 = known1 or "...", known2 or "..."
            self._sent_base(h.tid, h, base1, base2)
        pid = h.pid
        exe: str | None
        if h.n_exe == EXE_AS_BEFORE:
            exe = self.exes.get(pid) or _proc_exe(pid)
        elif exe_given is not None and exe_given.startswith("/"):
            exe = exe_given
            if len(self.exes) >= MAX_EXES:
                self.exes.clear()
            self.exes[pid] = exe
        else:
            exe = exe_given             # None, or a cut one: never kept for later records

        comm = h.comm
        comm_text = self.comms.get(comm)
        if comm_text is None:
            if len(self.comms) >= MAX_CACHED:
                self.comms.clear()
            comm_text = self.comms[comm] = comm.split(b"\0", 1)[0].decode(
                errors="surrogateescape")
        kind = h.kind
        if kind == EV.STATE or (kind == EV.EXEC and pid in self.audited):
            # a process entering the audit (fork: it is still a copy of its parent) or
            # becoming another program: who it is, from the kernel, at that moment
            self.audited.add(pid)
            if kind == EV.STATE and h.ppid in self.audit_keys:
                self.audit_keys[pid] = self.audit_keys[h.ppid]
            self.batch.append(self._state(h, comm_text, exe,
                                          "fork" if kind == EV.STATE else "exec"))
            if kind == EV.STATE:
                return
        path = base1 if name1 is None else join(base1, name1)
        path2 = None if name2 is None else join(base2, name2)
        syscall = self.tp_names.get(h.tp_id)
        flags = h.flags
        access = None
        open_flags = None
        if kind == EV.EXEC:
            # the execve or execveat that ran it (None: it began before the trace)
            op = ops.EXEC
        elif kind == EV.URING:
            op, syscall = IORING_OPS.get(h.tp_id, ops.ATTR), None
            req_flags = flags >> URING_FLAGS_SHIFT
            if flags & URING_OPENED:
                # an open of an existing file, at its completion: the path is the
                # opened file's, like an open syscall's
                op, open_flags = ops.OPEN, req_flags
                acc = req_flags & OFLAG.ACCMODE
                access = ("w" if acc == OFLAG.WRONLY else
                          ("rw" if acc == OFLAG.RDWR else "r"))
            elif flags & URING_NAMED:
                # names and dirfds the request was given: as a syscall's arguments
                if h.tp_id == IORING_OP_UNLINKAT and req_flags & AT_REMOVEDIR_FLAG:
                    op = ops.RMDIR
            else:
                mount = self.mounts.get(user_dev(h.dev))
                if mount and mount != "/":
                    path = mount + path
                if flags & URING_NEW_ENTRY:
                    path = _entry_named_by_inode(self.host_path(path), h.ino, path)
        elif syscall is None:
            return
        elif syscall in OPEN_SYSCALLS:
            open_flags = flags & 0xFFFFFFFF
            if kind == EV.SYSCALL and (flags >> CREATED_FLAG_SHIFT) & 1:
                op = ops.CREATE
            elif kind == EV.FAILED and flags & OFLAG.CREAT:
                op = ops.CREATE
            else:
                op = ops.OPEN
                acc = flags & OFLAG.ACCMODE
                access = ("w" if acc == OFLAG.WRONLY else
                          ("rw" if acc == OFLAG.RDWR else "r"))
        elif syscall == "unlinkat":
            op = ops.RMDIR if flags & AT_REMOVEDIR_FLAG else ops.UNLINK
        else:
            op = next(iter(syscalls.SYSCALL_OPS[syscall]))
        ret = h.ret
        ev = Event(op=op, path=path, path2=path2, backend=self.backend,
                   time=self.time_offset + h.ktime, syscall=syscall,
                   result=0 if kind == EV.EXEC or ret >= 0 else ret,
                   dev=user_dev(h.dev) if h.dev else None, ino=h.ino or None,
                   ouid=None if h.ouid == NO_ID else h.ouid,
                   ogid=None if h.ogid == NO_ID else h.ogid,
                   pid=pid, tid=h.tid, ppid=h.ppid, uid=h.uid, euid=h.euid, gid=h.gid,
                   loginuid=h.loginuid, comm=comm_text, exe=exe, access=access,
                   open_flags=open_flags)
        if kind == EV.SYSCALL:
            ev.parent_ino, ev.parent2_ino = parents(op, h.parent_ino, h.left_ino)
        if cut:
            ev.cut = cut
        if kind == EV.URING:
            ev.result = None
        elif h.tp_id >= COMPAT_BASE:
            ev.arch = "b32"         # a 32-bit syscall, judged through its own table
        if kind != EV.FAILED:
            ev.rule_ids = self.rule_ids(ev, h.rules, h.name_rules)
        else:                       # no inode changed: names decide
            ev.rule_ids = self.failed_rule_ids(ev, h.rules)
        if self.path_targets and op in NEW_NAME_OPS and (
                path in self.path_targets or path2 in self.path_targets):
            self.renamed_targets = True
        if self.container is not None:
            ev.container = dict(self.container.identity(), pid=h.nspid)
        if pid in self.audited:
            key = self.audit_keys.get(pid)
            ev.scope_keys = (key,) if key else ()
        self.batch.append(ev)

    def rule_ids(self, ev: Event, rules: int, names: int) -> tuple[int, ...]:
        """The rules whose objects the kernel matched for this record: those of the
        slots in ``rules``; for the slots in ``names`` (a file rule's parent matched,
        the name decides) and the shared slot, those whose object the names match."""
        out: list[int] = []
        bits = rules | names
        while bits:
            low = bits & -bits
            slot = low.bit_length() - 1
            bits ^= low
            confirmed = bool(rules & low) and slot != SHARED_SLOT
            for rid, rule in self.slot_rules.get(slot, ()):
                if confirmed or rule.matches_object(ev):
                    out.append(rid)
        return tuple(sorted(out))

    def failed_rule_ids(self, ev: Event, pathless: int) -> tuple[int, ...]:
        """The rules of a failed attempt: those whose objects its names match, and the
        path-less rules whose kernel conditions it met (their slots in ``pathless``)."""
        out: list[int] = []
        for slot, rules in self.slot_rules.items():
            chosen = bool(pathless >> slot & 1)
            for rid, rule in rules:
                if chosen if rule.kind == "syscall" else rule.matches_object(ev):
                    out.append(rid)
        return tuple(sorted(out))

    def _state(self, h, comm: str, exe: str | None, reason: str) -> ProcessState:
        st = ProcessState(pid=h.pid, ppid=h.ppid, uid=h.uid, euid=h.euid, gid=h.gid,
                          loginuid=h.loginuid, comm=comm, exe=exe, start_time=h.ktime,
                          reason=reason, nspid=h.nspid or None)
        try:
            st.cwd = os.readlink(f"/proc/{h.pid}/cwd")
        except OSError:
            pass
        if self.container is not None:
            st.container = self.container.identity()
        return st


def parents(op: str, now: int, left: int) -> tuple[int | None, int | None]:
    """The directories holding path's and path2's names (auditd's PARENT items), from
    the directory the object is named in at the syscall's end (``now``) and another
    one the syscall changed (``left``: the one it left); 0: none.  A link's existing
    name's directory is not known."""
    if op in CREATING_OPS:
        return now or None, None
    if op in (ops.UNLINK, ops.RMDIR):     # the removed name's (now: another name's)
        return (left or now) or None, None
    if op == ops.RENAME:
        return (left or now) or None, now or None
    if op == ops.LINK:
        return None, now or None
    return None, None


def join(base: str, name: str) -> str:
    """base (absolute, normalised by the kernel's walk) joined with a path argument."""
    if "/" not in name and name not in ("", ".", ".."):
        return base + "/" + name if base != "/" else "/" + name
    return os.path.normpath(os.path.join(base, name))


def _proc_exe(pid: int) -> str | None:
    """The program of a process whose last record with its path was not delivered."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _entry_named_by_inode(host_dir: str, ino: int, shown_dir: str) -> str:
    """The name under which a new inode appeared in a directory (io_uring creations:
    the kernel saw the directory change and the new inode, not the name)."""
    try:
        with os.scandir(host_dir) as it:
            for entry in it:
                if entry.inode() == ino:
                    return os.path.join(shown_dir, entry.name)
    except OSError:
        pass
    return shown_dir


def merge_uring(items: list) -> list:
    """An io_uring request changes several inodes (an unlink: the file and its
    directory); keep one event per request: the deepest path of consecutive events from
    the same worker with the same operation (with the request's names: the same
    path and path2)."""
    out: list = []
    for item in items:
        prev = out[-1] if out else None
        if (isinstance(item, Event) and isinstance(prev, Event) and item.syscall is None
                and prev.syscall is None and item.op == prev.op and item.tid == prev.tid
                and item.op != ops.EXEC and prev.op != ops.EXEC
                and item.path and prev.path and item.path2 == prev.path2
                and (item.path == prev.path or item.path.startswith(prev.path + "/") or
                     prev.path.startswith(item.path + "/"))):
            if len(item.path) > len(prev.path):
                out[-1] = item
            continue
        out.append(item)
    return out
