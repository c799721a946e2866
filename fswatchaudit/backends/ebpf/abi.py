"""The interface between the BPF programs and user space, written down once.

Both sides are generated from the tables in this module, the way libbpf-tools shares one
header (opensnoop.h) between its BPF program and its loader:

* ``c_header()`` is C text prepended to probes.c when it is compiled: a #define for every
  shared constant, ``struct event`` (the record header and its string area) and
  ``struct syscall_spec`` (the per-syscall argument roles), with a ``_Static_assert`` on
  the offset of every member, so the compiler checks the layout against these tables;
* ``HEADER`` (a ``struct.Struct``) and ``Header`` (its field names) decode record headers,
  and the constants below are what the decoder and the loader compare with.

A constant group is an ``IntEnum`` whose class name is the C prefix: ``EV.SYSCALL`` here
is ``EV_SYSCALL`` in C.
"""
from __future__ import annotations

import os
import struct
from collections import namedtuple
from dataclasses import dataclass
from enum import IntEnum


@dataclass(frozen=True)
class Field:
    """One member of a shared struct: its C type, its ``struct`` module code, and for
    arrays the element count (``char comm[16]`` is ``Field("comm", "char", "16s", 16)``).
    Padding members have a code ending in ``x`` and are not decoded."""
    name: str
    ctype: str
    code: str
    count: int = 0
    comment: str = ""

    @property
    def is_pad(self) -> bool:
        return self.code.endswith("x")

    def c_decl(self) -> str:
        decl = f"{self.ctype} {self.name}" + (f"[{self.count}]" if self.count else "") + ";"
        return f"    {decl:<28}/* {self.comment} */" if self.comment else f"    {decl}"


# ---- plain shared constants ---------------------------------------------------------
COMM_LEN = 16               # task comm length
DATA_SIZE = 16384           # string area of one record (a power of two)
PATH_SLOT = 4096            # PATH_MAX: room kept after DATA_SIZE for one more string
PATH_DEPTH = 32             # path components one walk writes (a tail call goes on)
EXE_AS_BEFORE = 0xFFFF      # event.n_exe: the program this process's last record named
BASE_AS_BEFORE = 0xFFFF     # event.n_base1/2: the base directory the thread's last record
                            # that wrote one whole (and was not cut) ended with
NO_ID = 0xFFFFFFFF          # event.ouid/ogid: no inode, so no owner (never a real id)
CREATED_FLAG_SHIFT = 32     # event.flags of an open: this bit says the file was created
URING_NEW_ENTRY = 1         # event.flags of EV_URING: dev/ino are of a new entry of the dir
URING_NAMED = 2             # ... names and dirfds from the request, as a syscall's arguments
URING_OPENED = 4            # ... an open's completion (an existing file): not a creation
URING_FLAGS_SHIFT = 32      # ... the request's own flags (open, unlinkat) from this bit
# io_uring opcodes (include/uapi/linux/io_uring.h, an ABI)
IORING_OP_OPENAT = 18
IORING_OP_OPENAT2 = 28
IORING_OP_RENAMEAT = 35
IORING_OP_UNLINKAT = 36
IORING_OP_MKDIRAT = 37
IORING_OP_SYMLINKAT = 38
IORING_OP_LINKAT = 39
AT_REMOVEDIR_FLAG = 0x200   # unlinkat(2) flag (ABI)
MAX_SYSCALL_NR = 1024       # syscall numbers below this are followed
COMPAT_BASE = MAX_SYSCALL_NR    # syscall_spec slot of 32-bit syscall 0 (ia32 emulation)
SPEC_SLOTS = 2 * COMPAT_BASE
RULE_SLOTS = 64             # bits of event.rules: one per rule; rules beyond the last
SHARED_SLOT = RULE_SLOTS - 1    # slot share it, and user space matches them by path
MAX_KCONDS = 4              # conditions of one path-less rule evaluated in the kernel
PATHLESS_SLOTS = 16         # rule slots (the first) whose kernel conditions are kept
KVALS = 16                  # values a condition can compare (KF_*), a power of two
# Failed syscalls are judged by their names in the kernel first: FNV-1a (64 bit) hashes
# of watched objects' absolute paths, computed by user space (path_hash) and over the
# first FAIL_SCAN bytes of a path argument by the BPF program.
FAIL_SCAN = 256
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
DEFINES = ("COMM_LEN", "DATA_SIZE", "PATH_SLOT", "PATH_DEPTH", "EXE_AS_BEFORE",
           "BASE_AS_BEFORE", "NO_ID",
           "CREATED_FLAG_SHIFT",
           "URING_NEW_ENTRY", "AT_REMOVEDIR_FLAG", "MAX_SYSCALL_NR", "COMPAT_BASE",
           "SPEC_SLOTS", "FAIL_SCAN", "FNV_OFFSET", "FNV_PRIME", "URING_NAMED",
           "URING_OPENED", "URING_FLAGS_SHIFT", "IORING_OP_OPENAT", "IORING_OP_OPENAT2",
           "IORING_OP_RENAMEAT", "IORING_OP_UNLINKAT", "IORING_OP_MKDIRAT",
           "IORING_OP_SYMLINKAT", "IORING_OP_LINKAT", "RULE_SLOTS", "MAX_KCONDS",
           "PATHLESS_SLOTS", "KVALS")


def path_hash(path: bytes) -> int:
    """FNV-1a of a path's bytes, as the BPF program hashes a path argument's prefixes."""
    h = FNV_OFFSET
    for c in path:
        h = ((h ^ c) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


# ---- constant groups ------------------------------------------------------------------
class EV(IntEnum):
    """record kinds (event.kind)"""
    SYSCALL = 1             # a followed syscall changed or opened a watched object
    EXEC = 2                # sched_process_exec of a watched program
    URING = 3               # an io_uring worker changed a watched inode (tp_id: opcode)
    FAILED = 4              # a syscall that changed no inode (failed, any errno; or did
    #                         nothing) and may concern a watched object: names decide
    STATE = 5               # a process entered a per-process audit (a fork)


class CNT(IntEnum):
    """counters, per CPU: what was submitted and what the ring buffer refused"""
    SUBMITTED = 0
    LOST = 1
    PENDING_FULL = 2        # no per-thread entry could be had at a syscall's entry
    UNSIGNALLED = 3         # records sent since this CPU last woke the reader
    COMPAT = 4              # 32-bit syscalls that could not be judged (no 32-bit table)
    TOO_DEEP = 5            # objects judged without their ancestors beyond the walk
    #                         (WATCH_DEPTH, continued by deep_walk over DEEP_CHAIN more)
    TOO_MANY_NAMES = 6      # changed files judged by their first MAX_ALIASES names only


class PERM(IntEnum):
    """permission classes, as in auditctl -p"""
    R = 1
    W = 2
    X = 4
    A = 8


class KIND(IntEnum):
    """syscall argument roles (syscall_spec.kind)"""
    PLAIN = 0               # path or fd arguments; reported if a changed inode is watched
    OPEN = 1                # returns an fd: the opened file decides
    MOUNT = 2               # makes a filesystem reachable: directory verdicts expire
    EXEC = 3                # execve: a success is told at sched_process_exec


class MOVES(IntEnum):
    """syscall_spec.moves: can the syscall move or remove a directory?"""
    NEVER = 0
    MAYBE = 1               # rename*, unlinkat: yes when two directories changed
    ALWAYS = 2              # rmdir


class GEN(IntEnum):
    """slots of the gens map: generations of the directory verdict cache"""
    KERNEL = 0              # a directory moved or a filesystem was mounted
    USER = 1                # user space changed the watched map


class AUDIT(IntEnum):
    """audited map flags"""
    CHILDREN = 1            # processes it forks are audited too
    ALL_PATHS = 2           # everything it touches is reported, watched or not


class OFLAG(IntEnum):
    """open(2) flag bits (the same on every architecture we run on)"""
    ACCMODE = 3
    WRONLY = 1
    RDWR = 2
    CREAT = 0o100
    TRUNC = 0o1000


class KF(IntEnum):
    """what a kernel condition of a path-less rule compares (struct kcond.field)"""
    NONE = 0                # always 0: an unused condition
    LOGINUID = 1
    UID = 2
    EUID = 3
    SUID = 4
    FSUID = 5
    GID = 6
    EGID = 7
    SGID = 8
    FSGID = 9
    PID = 10                # tgid
    PPID = 11
    SUCCESS = 12            # 1 when the syscall returned >= 0
    EXIT = 13               # the return value (-errno on failure)


class REL(IntEnum):
    """struct kcond.rel: the outcomes of comparing the value with the condition's that
    satisfy it (auditctl's operators: = is EQ, != is LT|GT, >= is GT|EQ ...)"""
    LT = 1
    EQ = 2
    GT = 4
    ANY = 7                 # an unused condition


# Rule fields (rules/fields.py) and -C comparands the kernel evaluates for path-less
# rules, and the value each one is; the operators (REL bits).
KERNEL_FIELDS: dict[str, KF] = {
    "auid": KF.LOGINUID, "loginuid": KF.LOGINUID, "uid": KF.UID, "euid": KF.EUID,
    "suid": KF.SUID, "fsuid": KF.FSUID, "gid": KF.GID, "egid": KF.EGID, "sgid": KF.SGID,
    "fsgid": KF.FSGID, "pid": KF.PID, "ppid": KF.PPID, "success": KF.SUCCESS,
    "exit": KF.EXIT}
KERNEL_OPS: dict[str, int] = {
    "=": REL.EQ, "!=": REL.LT | REL.GT, "<": REL.LT, "<=": REL.LT | REL.EQ,
    ">": REL.GT, ">=": REL.GT | REL.EQ}

GROUPS: tuple[type[IntEnum], ...] = (EV, CNT, PERM, KIND, MOVES, GEN, AUDIT, OFLAG, KF,
                                     REL)
NCOUNTERS = len(CNT)
PERM_BITS = {p.name.lower(): int(p) for p in PERM}      # "r" -> PERM.R ...

# ---- struct event: a fixed header, then NUL-separated strings ------------------------
EVENT_FIELDS: tuple[Field, ...] = (
    Field("ktime", "u64", "Q", comment="bpf_ktime_get_ns()"),
    Field("kind", "u32", "I", comment="EV_*"),
    Field("tp_id", "u32", "I", comment="syscall number, or io_uring opcode"),
    Field("ret", "s64", "q"),
    Field("flags", "u64", "Q"),
    Field("dev", "u64", "Q", comment="super_block.s_dev, kernel encoding"),
    Field("ino", "u64", "Q"),
    Field("parent_ino", "u64", "Q", comment="the directory the object is named in at the end"),
    Field("left_ino", "u64", "Q", comment="another directory changed: the one it left"),
    Field("mntns", "u64", "Q"),
    Field("rules", "u64", "Q", comment="rule slots whose object this is (bit n: slot n)"),
    Field("name_rules", "u64", "Q", comment="rule slots naming it: confirm the name"),
    Field("pid", "u32", "I"),
    Field("tid", "u32", "I"),
    Field("ppid", "u32", "I"),
    Field("uid", "u32", "I"),
    Field("euid", "u32", "I"),
    Field("gid", "u32", "I"),
    Field("loginuid", "u32", "I"),
    Field("nspid", "u32", "I", comment="pid in the task's own pid namespace"),
    Field("ouid", "u32", "I", comment="the object's owner (inode.i_uid); NO_ID: unknown"),
    Field("ogid", "u32", "I", comment="the object's group (inode.i_gid)"),
    Field("n_base1", "u16", "H", comment="path components of the first base, or "
          "BASE_AS_BEFORE"),
    Field("n_base2", "u16", "H"),
    Field("n_exe", "u16", "H", comment="or EXE_AS_BEFORE"),
    Field("has_name1", "u16", "H", comment="a path argument follows the base"),
    Field("has_name2", "u16", "H"),
    Field("walk_count", "u16", "H", comment="scratch of put_path"),
    Field("cut", "u16", "H", comment="a string was cut short or left out (no room, "
          "too deep, unreadable): the decoder marks the fields it cannot trust"),
    Field("base_dirs", "u16", "H", comment="bit 0, 1: base 1, 2 is a base directory "
          "(put_base; else the path of a file): the last whole one is the thread's "
          "BASE_AS_BEFORE"),
    Field("pad_cut", "u8", "4x", 4),
    Field("data_len", "u32", "I", comment="bytes used in data; the write position"),
    Field("comm", "char", f"{COMM_LEN}s", COMM_LEN),
)
# after the header: char data[DATA_SIZE + PATH_SLOT]
HEADER = struct.Struct("<" + "".join(f.code for f in EVENT_FIELDS))
EVENT_HEADER_SIZE = HEADER.size
# the decoded header, a named tuple of the table's field names
Header = namedtuple("Header", [f.name for f in EVENT_FIELDS if not f.is_pad])  # type: ignore[misc]

# ---- struct kcond: one condition of a path-less rule (rule_filters map) -------------
KCOND_FIELDS: tuple[Field, ...] = (
    Field("field", "u8", "B", comment="KF_*"),
    Field("rel", "u8", "B", comment="REL_* outcomes that satisfy it"),
    Field("other", "u8", "B", comment="KF_*: compared with value + this (-C)"),
    Field("pad", "u8", "5x", 5),
    Field("value", "s64", "q"),
)
KCOND = struct.Struct("<" + "".join(f.code for f in KCOND_FIELDS))


# ---- struct syscall_spec: syscall number -> which arguments are what -----------------
SPEC_FIELDS: tuple[Field, ...] = (
    Field("dfd1", "s16", "h", comment="argument index; -1: none"),
    Field("path1", "s16", "h"),
    Field("dfd2", "s16", "h"),
    Field("path2", "s16", "h"),
    Field("fd", "s16", "h"),
    Field("flags", "s16", "h"),
    Field("kind", "u8", "B", comment="KIND_*"),
    Field("perm", "u8", "B", comment="PERM_* class (opens: from flags)"),
    Field("flags_in_struct", "u8", "B", comment="openat2: flags in struct open_how"),
    Field("active", "u8", "B", comment="a syscall this program follows"),
    Field("moves", "u8", "B", comment="MOVES_*"),
    Field("pad", "u8", "7x", 7),
    Field("fixed_flags", "u64", "Q", comment="creat(): the flags it implies"),
    Field("pathless", "u64", "Q", comment="rule slots of path-less rules on it"),
)
SPEC = struct.Struct("<" + "".join(f.code for f in SPEC_FIELDS))


@dataclass(frozen=True)
class SyscallSpec:
    """The value of one syscall_spec slot; field names are those of SPEC_FIELDS."""
    dfd1: int = -1
    path1: int = -1
    dfd2: int = -1
    path2: int = -1
    fd: int = -1
    flags: int = -1
    kind: int = KIND.PLAIN
    perm: int = 0
    flags_in_struct: int = 0
    active: int = 1
    moves: int = MOVES.NEVER
    fixed_flags: int = 0
    pathless: int = 0

    def fill(self, leaf) -> None:
        """Set the members of a bcc leaf (ctypes struct syscall_spec) by name."""
        for f in SPEC_FIELDS:
            if not f.is_pad:
                setattr(leaf, f.name, getattr(self, f.name))


def offsets(fields: tuple[Field, ...]) -> dict[str, tuple[int, int]]:
    """Member name -> (offset, size) as the table lays the struct out."""
    out, off = {}, 0
    for f in fields:
        size = struct.calcsize("<" + f.code)
        out[f.name] = (off, size)
        off += size
    return out


def _c_struct(name: str, fields: tuple[Field, ...], tail: str = "") -> list[str]:
    lines = [f"struct {name} {{", *(f.c_decl() for f in fields)]
    if tail:
        lines.append(f"    {tail}")
    lines.append("};")
    for member, (off, _size) in offsets(fields).items():
        if member != "pad":
            lines.append(f"_Static_assert(__builtin_offsetof(struct {name}, {member}) == {off}, "
                         f'"abi.py: struct {name}.{member}");')
    return lines


def c_header() -> str:
    """The C side of this module, prepended to probes.c."""
    lines = ["/* ---- generated from fswatchaudit/backends/ebpf/abi.py: edit it there ---- */"]
    lines += [f"#define {name} {globals()[name]}{'ULL' if globals()[name] >> 31 else ''}"
              for name in DEFINES]
    for group in GROUPS:
        lines.append(f"/* {group.__doc__} */")
        lines += [f"#define {group.__name__}_{m.name} {int(m)}" for m in group]
    lines.append(f"#define NCOUNTERS {NCOUNTERS}")
    lines.append(f"#define EVENT_HEADER_SIZE {EVENT_HEADER_SIZE}")
    lines += _c_struct("event", EVENT_FIELDS, "char data[DATA_SIZE + PATH_SLOT];")
    lines.append("_Static_assert(__builtin_offsetof(struct event, data) == EVENT_HEADER_SIZE, "
                 '"abi.py: struct event header size");')
    lines += _c_struct("syscall_spec", SPEC_FIELDS)
    lines.append(f"_Static_assert(sizeof(struct syscall_spec) == {SPEC.size}, "
                 '"abi.py: struct syscall_spec size");')
    lines += _c_struct("kcond", KCOND_FIELDS)
    lines.append(f"_Static_assert(sizeof(struct kcond) == {KCOND.size}, "
                 '"abi.py: struct kcond size");')
    lines.append("/* ---- end of generated text ---- */")
    return "\n".join(lines) + "\n"


# ---- device numbers: the kernel's encoding in records and in the watched map ---------
def kernel_dev(st_dev: int) -> int:
    """st_dev (user space encoding) -> super_block.s_dev (kernel MKDEV encoding)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def user_dev(kdev: int) -> int:
    return os.makedev(kdev >> 20, kdev & 0xFFFFF)
