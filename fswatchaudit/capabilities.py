"""What each backend can tell, as data.

The conformance suite derives each backend's expected events from this table, and the
README's backend comparison is generated from it (`fswatchaudit backends --markdown`),
so the documentation cannot drift from what is tested.
"""
from __future__ import annotations

from dataclasses import dataclass

from .rules import FIELDS, Rule
from .rules.fields import COMPARANDS

# Event fields about the process and the syscall, in the README's column order.
PROCESS_FIELDS = ("pid", "tid", "ppid", "uid", "euid", "gid", "loginuid", "comm", "exe")
SYSCALL_FIELDS = ("syscall", "result")
INODE_FIELDS = ("dev", "ino")
OWNER_FIELDS = ("ouid", "ogid")     # the object's owner and group (-C auid!=obj_uid)


@dataclass(frozen=True)
class Capability:
    needs: str                    # what the host must allow
    fields: frozenset[str]        # event fields the backend fills (besides op/path/...)
    attr_kind: bool               # tells chmod, chown, utime, xattr... apart (else "attr")
    truncate: bool                # sees truncate()
    exec: bool                    # sees executions
    read_opens: bool              # sees opens for read
    failures: bool                # reports operations that failed (result < 0)
    rename_both_sides: bool       # a rename crossing the watched tree's edge has both paths
    link_source: bool             # a hard link has the existing name as path
    io_uring: bool                # sees operations submitted through io_uring
    in_kernel_filter: bool        # unwatched operations never reach user space
    # Ways around a watch (issue 11's evasion cases): is the change still reported?
    hard_links: bool = False      # write/chmod through a link made outside the tree
    bind_mounts: bool = False     # create/chmod through a bind mount of a watched dir
    mounts_below: bool = False    # a filesystem mounted below a watched dir (before)
    later_mounts: bool = False    # ... mounted after the watch started, from that instant
    proc_fd: bool = False         # chmod through /proc/self/fd/N (tar does)
    open_by_handle: bool = False  # a file opened for write with open_by_handle_at
    deep_trees: bool = False      # any depth below a watched directory
    notes: str = ""
    pathless_rules: bool = False  # audits -S syscalls on every object (rules without a path)
    # fields no event carries that the backend evaluates for path-less rules (the kernel)
    pathless_fields: frozenset[str] = frozenset()


CAPABILITIES: dict[str, Capability] = {
    "ebpf": Capability(
        needs="root (CAP_BPF+CAP_PERFMON), bcc, BTF, kernel >= 6.13 (timestamp tracepoints)",
        # open_flags and arch: the flags of opens and 32-bit syscalls, for -F a2& and arch
        fields=frozenset(PROCESS_FIELDS + SYSCALL_FIELDS + INODE_FIELDS
                         + OWNER_FIELDS + ("open_flags", "arch")),
        attr_kind=True, truncate=True, exec=True, read_opens=True, failures=True,
        rename_both_sides=True, link_source=True, io_uring=True, in_kernel_filter=True,
        # tested in tests/test_ebpf.py; a walk that ends short is continued in tail
        # calls over 256 more levels; beyond, counted as lost ("too_deep")
        hard_links=True, bind_mounts=True, mounts_below=True, later_mounts=True,
        proc_fd=True, open_by_handle=True, deep_trees=True,
        # tested in tests/test_pathless.py: the ids, pid, success and exit are compared
        # in the kernel (abi.KERNEL_FIELDS), so rejected syscalls never reach user space
        pathless_rules=True,
        pathless_fields=frozenset(("suid", "fsuid", "egid", "sgid", "fsgid"))),
    "fanotify": Capability(
        needs="root (CAP_SYS_ADMIN), kernel >= 5.9 (FAN_REPORT_DFID_NAME)",
        fields=frozenset(("pid", "ppid", "uid", "euid", "gid", "loginuid", "comm", "exe")
                         + INODE_FIELDS),
        attr_kind=False, truncate=False, exec=True, read_opens=True, failures=False,
        rename_both_sides=True, link_source=False, io_uring=True, in_kernel_filter=False,
        hard_links=False, bind_mounts=True, mounts_below=True, later_mounts=False,
        proc_fd=True, open_by_handle=True, deep_trees=True,
        notes="process facts read from /proc when the event is read: marked stale when "
              "the process had exited, or executed a program fanotify saw (an exec of a "
              "program on an unwatched filesystem goes unnoticed); create or link told "
              "from the event's inode handle (Linux 5.17+), else marked inferred; unread "
              "events for one file are merged (marked merged; repeats of one operation "
              "are not counted); a bind mount's changes are named by the watched path; "
              "a filesystem mounted below a watched directory after the start is "
              "marked at the next read (what happened on it before is missed); pseudo "
              "filesystems (proc, sysfs) cannot be marked (a warning names them)"),
    "inotify": Capability(
        needs="nothing (any user)",
        fields=frozenset(),
        attr_kind=False, truncate=False, exec=False, read_opens=True, failures=False,
        rename_both_sides=False, link_source=False, io_uring=True, in_kernel_filter=False,
        hard_links=False, bind_mounts=True, mounts_below=True, later_mounts=False,
        proc_fd=True, open_by_handle=True, deep_trees=True,
        notes="no process attribution at all; create or link told by the link count when "
              "the event is read (marked inferred); identical consecutive events are "
              "merged and not counted; unreadable directories are skipped with a "
              "warning; one watch per directory (max_user_watches)"),
}


def markdown_table() -> str:
    """The backend comparison table for the README."""
    names = list(CAPABILITIES)
    rows = [("needs", [CAPABILITIES[n].needs for n in names])]
    for f in PROCESS_FIELDS + SYSCALL_FIELDS + INODE_FIELDS + OWNER_FIELDS:
        rows.append((f"`{f}`", ["yes" if f in CAPABILITIES[n].fields else "no"
                                for n in names]))
    flags = [
        ("chmod/chown/utime/xattr told apart", "attr_kind"),
        ("truncate", "truncate"),
        ("exec", "exec"),
        ("opens for read", "read_opens"),
        ("failed operations (any errno)", "failures"),
        ("both paths of a rename across the tree's edge", "rename_both_sides"),
        ("existing name of a hard link", "link_source"),
        ("io_uring operations", "io_uring"),
        ("writes and chmod through a hard link made outside the tree", "hard_links"),
        ("changes through a bind mount of a watched directory", "bind_mounts"),
        ("filesystems mounted below a watched directory", "mounts_below"),
        ("... mounted after the start, from the instant they are mounted", "later_mounts"),
        ("chmod through /proc/self/fd/N", "proc_fd"),
        ("open_by_handle_at for write", "open_by_handle"),
        ("any depth below a watched directory", "deep_trees"),
        ("filters in the kernel", "in_kernel_filter"),
        ("syscall rules without a path (-S unlink -F auid>=1000)", "pathless_rules"),
    ]
    for label, attr in flags:
        rows.append((label, ["yes" if getattr(CAPABILITIES[n], attr) else "no"
                             for n in names]))
    rows.append(("notes", [CAPABILITIES[n].notes or "" for n in names]))
    out = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    out += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(out)


def refusal(backend: str, rule: Rule) -> str | None:
    """Why ``backend`` cannot honour ``rule`` (None: it can).  A rule is refused rather
    than widened: a field is honoured only where the backend reports what it compares."""
    cap = CAPABILITIES[backend]
    pathless = rule.kind == "syscall"
    if pathless and not cap.pathless_rules:
        return (f"the {backend} backend cannot audit syscalls on every object: give the "
                "rule a -F path=, -F dir= or -F inode=")
    for cond in rule.conds:
        row = FIELDS[cond.name]
        if cond.name == "arch" and cond.value == "b64":
            continue                    # the machine's own table: every backend's
        if pathless and cond.name in cap.pathless_fields:
            continue
        if row.attr not in cap.fields:
            return (f"the {backend} backend cannot honour -F {cond.name}{cond.op}"
                    f"{cond.value}: it does not report {row.attr}")
        if row.attr == "result" and not cap.failures:
            return (f"the {backend} backend cannot honour -F {cond.name}: it does not see "
                    "failed operations")
    for cmp in rule.compares:
        for name in (cmp.left, cmp.right):
            side = COMPARANDS[name]
            if not side.where:
                return (f"the {backend} backend cannot honour -C {cmp.text()}: no backend "
                        f"reports {side.attr} (the object's owner)")
            if side.attr not in cap.fields and not (pathless and name in cap.pathless_fields):
                return (f"the {backend} backend cannot honour -C {cmp.text()}: it does not "
                        f"report {side.attr}")
    return None
