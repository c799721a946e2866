"""eBPF backend: bcc programs on kernel tracepoints, filtering on inodes in the kernel.

The programs (fswatchaudit/bpf/probes.c) attach only to tracepoints: syscall enter/exit
for the filesystem syscalls, the timestamp:* inode ctime tracepoints (which inodes a
syscall changed, also for io_uring workers), sched_process_exec/fork/exit and
io_uring_submit_req.  A hash map of watched (device, inode) pairs with permission masks
decides in the kernel which operations reach user space; the walk up the directory tree
happens at the time of the operation, so new and moved directories are covered at once.

Kernel struct offsets come from the running kernel's BTF, read by fswatchaudit.bpf.btf.
Without kernel headers, bcc is pointed at the minimal include tree shipped in
fswatchaudit/bpf/include.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from importlib import resources

from ... import syscalls
from ...events import Event, ProcessState
from ...rules import Rule, RuleError, RuleSet
from ..base import Backend, BackendUnavailable
from .btf import BTF, VMLINUX_BTF, BTFError
from .ringbuf import RingReader

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
CTIME_TRACEPOINTS = ("inode_set_ctime_to_ts", "ctime_ns_xchg", "ctime_xchg_skip")

# Kernel struct members the programs read, by the -D name they are passed under.
OFFSETS = {
    "OFF_TASK_TGID": "task_struct.tgid", "OFF_TASK_PID": "task_struct.pid",
    "OFF_TASK_REAL_PARENT": "task_struct.real_parent", "OFF_TASK_CRED": "task_struct.cred",
    "OFF_TASK_LOGINUID": "task_struct.loginuid", "OFF_TASK_FS": "task_struct.fs",
    "OFF_TASK_FILES": "task_struct.files", "OFF_TASK_MM": "task_struct.mm",
    "OFF_TASK_NSPROXY": "task_struct.nsproxy", "OFF_NSPROXY_MNT_NS": "nsproxy.mnt_ns",
    "OFF_MNT_NS_INUM": "mnt_namespace.ns.inum",
    "OFF_CRED_UID": "cred.uid", "OFF_CRED_EUID": "cred.euid", "OFF_CRED_GID": "cred.gid",
    "OFF_FS_PWD": "fs_struct.pwd", "OFF_FS_ROOT": "fs_struct.root",
    "OFF_PATH_MNT": "path.mnt", "OFF_PATH_DENTRY": "path.dentry",
    "OFF_FILES_FDT": "files_struct.fdt", "OFF_FDTABLE_FD": "fdtable.fd",
    "OFF_FDTABLE_MAX_FDS": "fdtable.max_fds", "OFF_FILE_F_PATH": "file.f_path",
    "OFF_FILE_F_INODE": "file.f_inode", "OFF_DENTRY_D_PARENT": "dentry.d_parent",
    "OFF_DENTRY_D_NAME": "dentry.d_name", "OFF_QSTR_NAME": "qstr.name",
    "OFF_DENTRY_D_INODE": "dentry.d_inode", "OFF_DENTRY_D_ALIAS": "dentry.d_u",
    "OFF_INODE_I_INO": "inode.i_ino", "OFF_INODE_I_SB": "inode.i_sb",
    "OFF_INODE_I_MODE": "inode.i_mode", "OFF_INODE_I_DENTRY": "inode.i_dentry",
    "OFF_SB_S_DEV": "super_block.s_dev", "OFF_MOUNT_MNT": "mount.mnt",
    "OFF_MOUNT_MNT_PARENT": "mount.mnt_parent",
    "OFF_MOUNT_MNT_MOUNTPOINT": "mount.mnt_mountpoint",
    "OFF_VFSMOUNT_MNT_ROOT": "vfsmount.mnt_root", "OFF_MM_EXE_FILE": "mm_struct.exe_file",
    "OFF_TASK_GROUP_LEADER": "task_struct.group_leader",
    "OFF_TASK_START_TIME": "task_struct.start_time",
    "OFF_BINPRM_FILE": "linux_binprm.file",
    "OFF_TASK_THREAD_PID": "task_struct.thread_pid", "OFF_PID_LEVEL": "pid.level",
    "OFF_PID_NUMBERS": "pid.numbers", "OFF_UPID_NR": "upid.nr",
}

# Permission classes, as in probes.c.
PERM_BITS = {"r": 1, "w": 2, "x": 4, "a": 8}
KIND_PLAIN, KIND_OPEN, KIND_MOUNT = 0, 1, 2
MOVES_MAYBE, MOVES_ALWAYS = 1, 2
# Syscalls that can move or remove a directory, and those that make a filesystem
# reachable: after them the kernel's cache of directory verdicts is expired.
MOVING_SYSCALLS = {"rename": MOVES_MAYBE, "renameat": MOVES_MAYBE, "renameat2": MOVES_MAYBE,
                   "unlinkat": MOVES_MAYBE, "rmdir": MOVES_ALWAYS}
MOUNT_SYSCALLS = ("mount", "fsmount", "move_mount")
GEN_USER = 1
EV_SYSCALL, EV_EXEC, EV_URING, EV_FAILED, EV_STATE = 1, 2, 3, 4, 5
AUDIT_CHILDREN, AUDIT_ALL_PATHS = 1, 2
CNT_SUBMITTED, CNT_LOST, CNT_PENDING_FULL, CNT_COMPAT = 0, 1, 2, 4

# The record header, field for field as struct event in probes.c.
HEADER = struct.Struct("<QIIqQQQQ8I6HI16s")
AT_REMOVEDIR = 0x200
O_ACCMODE, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC = 3, 1, 2, 0o100, 0o1000
CREATED_FLAG_SHIFT = 32
URING_NEW_ENTRY = 1
EXE_AS_BEFORE = 0xFFFF    # n_exe: the program is the one this process's last record named
MAX_EXES = 65536
MAX_CACHED = 16384        # decoded paths and command names kept for reuse       # EV_URING: dev/ino are of a new entry of the directory in path

# io_uring opcodes (include/uapi/linux/io_uring.h, an ABI) -> the operation they do.
IORING_OPS = {18: "create", 28: "create", 35: "rename", 36: "unlink", 37: "mkdir",
              38: "symlink", 39: "link", 41: "setxattr", 42: "setxattr"}

# Syscall argument roles, by the argument names in the tracefs format files.
DFD_NAMES = ("dfd", "olddfd")
PATH_NAMES = ("filename", "pathname", "path", "oldname")
ATTR_SYSCALL_OPS = syscalls.ATTR_OPS


def tracefs() -> str | None:
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def kernel_dev(st_dev: int) -> int:
    """st_dev (user space encoding) -> super_block.s_dev (kernel MKDEV encoding)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def user_dev(kdev: int) -> int:
    return os.makedev(kdev >> 20, kdev & 0xFFFFF)


def syscall_args(tfs: str, name: str) -> list[str] | None:
    """Argument names of sys_enter_NAME, or None where this kernel has no such syscall."""
    try:
        with open(f"{tfs}/events/syscalls/sys_enter_{name}/format") as fh:
            text = fh.read()
    except OSError:
        return None
    names = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:") or "common_" in line or "__syscall_nr" in line:
            continue
        decl = line.split(";")[0][len("field:"):]
        names.append(decl.replace("*", " ").split()[-1])
    return names


# Where syscall arguments are in struct pt_regs, per architecture (the syscall ABI).
SYSCALL_ARG_REGS = {
    "x86_64": ("di", "si", "dx", "r10", "r8", "r9"),
    "aarch64": ("regs",) * 6,     # regs[0..5]
}
# Where the syscall number stays during the syscall (read at the raw sys_exit).
SYSCALL_NR_REG = {"x86_64": "pt_regs.orig_ax", "aarch64": "pt_regs.syscallno"}
MAX_SYSCALL_NR = 1024
TS_COMPAT = 0x0002        # x86 thread_info.status: a 32-bit syscall is running
# 32-bit syscalls of 64-bit kernels (ia32 emulation): their argument registers, their
# number table, and the 64-bit syscall each one is the same operation as (arguments in
# the same order as far as paths, fds and flags go).  Slots COMPAT_BASE + number.
COMPAT_BASE = MAX_SYSCALL_NR
COMPAT_ARG_REGS = {"x86_64": ("bx", "cx", "dx", "si", "di", "bp")}
COMPAT_UNISTD = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_32.h"}
COMPAT_NAMES = {"chown32": "chown", "lchown32": "lchown", "fchown32": "fchown",
                "truncate64": "truncate", "ftruncate64": "ftruncate",
                "utimensat_time64": "utimensat"}
UNISTD_HEADERS = ("/usr/include/{multiarch}/asm/unistd_64.h", "/usr/include/asm/unistd_64.h",
                  "/usr/include/asm-generic/unistd.h")
MULTIARCH = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
# Syscalls newer than the libc headers we may find.  Since Linux 5.1 new syscalls get
# the same number on every architecture.
NEWER_SYSCALLS = {"fchmodat2": 452, "setxattrat": 463, "removexattrat": 466}


def compat_syscalls() -> list[tuple[str, int]]:
    """(64-bit syscall name, 32-bit number) for the 32-bit syscalls of this machine."""
    import re
    path = COMPAT_UNISTD.get(os.uname().machine)
    try:
        with open(path or "") as fh:
            text = fh.read()
    except OSError:
        return []
    out = [(COMPAT_NAMES.get(name, name), int(nr))
           for name, nr in re.findall(r"#define\s+__NR_(\w+)\s+(\d+)", text)]
    have = {name for name, _ in out}
    # syscalls newer than the header have one number on every architecture
    out += [(name, nr) for name, nr in NEWER_SYSCALLS.items() if name not in have]
    return [(name, nr) for name, nr in out if nr < MAX_SYSCALL_NR]


def syscall_arg_offsets(btf: BTF) -> list[int]:
    machine = os.uname().machine
    regs = SYSCALL_ARG_REGS.get(machine)
    if regs is None:
        raise BackendUnavailable(f"syscall argument registers unknown for {machine}")
    if regs[0] == "regs":
        base = btf.offset("pt_regs.regs")
        return [base + 8 * i for i in range(6)]
    return [btf.offset(f"pt_regs.{r}") for r in regs]


def syscall_numbers() -> dict[str, int]:
    """Syscall name -> number, from the kernel ABI headers (Debian's linux-libc-dev)."""
    import re
    multiarch = MULTIARCH.get(os.uname().machine, "")
    define = re.compile(r"#define\s+__NR(?:3264)?_(\w+)\s+(\w+)")
    for pattern in UNISTD_HEADERS:
        path = pattern.format(multiarch=multiarch)
        try:
            with open(path) as fh:
                text = fh.read()
        except OSError:
            continue
        raw = dict(define.findall(text))
        numbers: dict[str, int] = {}
        for name, value in raw.items():
            while not value.isdigit() and value.startswith("__NR"):
                value = raw.get(value.split("_", 3)[-1] if value.startswith("__NR3264_")
                                else value[len("__NR_"):], "x")
            if value.isdigit():
                numbers[name] = int(value)
        for name, nr in NEWER_SYSCALLS.items():
            numbers.setdefault(name, nr)
        return numbers
    raise BackendUnavailable("no syscall number table: install linux-libc-dev "
                             f"(looked for {', '.join(UNISTD_HEADERS)})")


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


class EbpfBackend(Backend):
    name = "ebpf"

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "needs root (CAP_BPF and CAP_PERFMON)"
        try:
            import bcc  # noqa: F401
        except ImportError:
            return False, "bcc is not importable (Debian package python3-bpfcc)"
        if not os.path.exists(VMLINUX_BTF):
            return False, f"no kernel BTF at {VMLINUX_BTF} (CONFIG_DEBUG_INFO_BTF)"
        tfs = tracefs()
        if tfs is None:
            return False, "tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing)"
        missing = [t for t in CTIME_TRACEPOINTS
                   if not os.path.isdir(f"{tfs}/events/timestamp/{t}")]
        if missing:
            return False, ("kernel lacks the timestamp:* tracepoints "
                           f"({', '.join(missing)}): Linux 6.13 or newer is needed")
        return True, "root, bcc, BTF and timestamp tracepoints present"

    def __init__(self, rules: RuleSet, ringbuf_pages: int = 8192,
                 exclude_self: bool = True) -> None:
        super().__init__(rules)
        self.exclude_self = exclude_self
        self.ringbuf_pages = ringbuf_pages
        self.bpf = None
        self.ring: RingReader | None = None
        self.have_compat = False                # 32-bit syscalls can be judged
        self.exes: dict[int, str] = {}          # tgid -> its program, as last sent
        self.paths: dict[tuple[bytes, ...], str] = {}   # decoded directory paths
        self.comms: dict[bytes, str] = {}
        self.batch: list[Event | ProcessState] = []
        self.tp_names: dict[int, str] = {}      # syscall number -> syscall name
        self.container = None
        self.mounts: dict[int, str] = {}
        self.time_offset = 0
        self.audited: set[int] = set()
        self.audit_keys: dict[int, str] = {}     # audited pid -> key of its audit
        self.watch_values: dict[tuple[int, int], tuple[int, int, int]] = {}

    # -- loading -----------------------------------------------------------------
    def _cflags(self) -> list[str]:
        try:
            btf = BTF()
            flags = [f"-D{name}={btf.offset(member)}" for name, member in OFFSETS.items()]
            arg_offs = syscall_arg_offsets(btf)
            flags += [f"-DOFF_REGS_ARG{i}={off}" for i, off in enumerate(arg_offs)]
            flags += [f"-DREGS_SPAN_START={min(arg_offs)}",
                      f"-DREGS_SPAN_LEN={max(arg_offs) + 8 - min(arg_offs)}"]
            flags.append(f"-DOFF_REGS_SYSCALL_NR={btf.offset(SYSCALL_NR_REG[os.uname().machine])}")
            compat_regs = COMPAT_ARG_REGS.get(os.uname().machine)
            if compat_regs:
                offs = [btf.offset(f"pt_regs.{r}") for r in compat_regs]
                flags += [f"-DOFF_TASK_TI_STATUS={btf.offset('task_struct.thread_info.status')}",
                          f"-DTS_COMPAT_BIT={TS_COMPAT}"]
                flags += [f"-DOFF_CREGS_ARG{i}={off}" for i, off in enumerate(offs)]
                flags += [f"-DCREGS_SPAN_START={min(offs)}",
                          f"-DCREGS_SPAN_LEN={max(offs) + 8 - min(offs)}"]
        except (OSError, BTFError) as exc:
            raise BackendUnavailable(f"cannot read kernel struct layouts from BTF: {exc}")
        flags += [f"-DSIZEOF_UPID={btf.size('upid')}",
                  f"-DRINGBUF_PAGES={self.ringbuf_pages}",
                  f"-DMAX_SYSCALL_NR={MAX_SYSCALL_NR}",
                  f"-DCOMPAT_BASE={COMPAT_BASE}", f"-DSPEC_SLOTS={2 * COMPAT_BASE}",
                  f"-DHAVE_COMPAT_TABLE={1 if self.have_compat else 0}",
                  f"-DEVENT_HEADER_SIZE={HEADER.size}"]
        return flags

    def _compile(self):
        from bcc import BPF
        headers = f"/lib/modules/{os.uname().release}/build"
        if not os.path.isdir(headers) and "BCC_KERNEL_SOURCE" not in os.environ:
            os.environ["BCC_KERNEL_SOURCE"] = str(
                resources.files(__package__).joinpath("include"))
        src = resources.files(__package__).joinpath("probes.c").read_bytes()
        try:
            return BPF(text=src, cflags=self._cflags())
        except Exception as exc:
            raise BackendUnavailable(f"the BPF programs did not load: {exc}") from None

    def _specs(self, tfs: str) -> dict[str, tuple]:
        """Per syscall: (dfd1, path1, dfd2, path2, fd, flags, kind, perm, in_struct, fixed,
        moves)."""
        specs = {}
        for name, ops in syscalls.SYSCALL_OPS.items():
            if "exec" in ops:
                continue            # executions are seen at sched_process_exec
            args = syscall_args(tfs, name)
            if args is None:
                continue

            def idx(*names: str) -> int:
                return next((args.index(n) for n in names if n in args), -1)
            dfd1, path1 = idx(*DFD_NAMES), idx(*PATH_NAMES)
            dfd2, path2 = idx("newdfd"), idx("newname")
            if name in ("symlink", "symlinkat"):   # oldname is the link's text, not a path
                dfd1, path1, dfd2, path2 = dfd2, path2, -1, -1
            fd = idx("fd") if path1 < 0 else -1
            flags = idx("flags", "flag", "how")
            kind = KIND_OPEN if ops & {"open", "create"} else KIND_PLAIN
            perm = 0
            for op in ops:
                for letter in syscalls.perms_for(op, "rw"):
                    perm |= PERM_BITS[letter]
            fixed = O_CREAT | O_WRONLY | O_TRUNC if name == "creat" else 0
            specs[name] = (dfd1, path1, dfd2, path2, fd, flags, kind, perm,
                           1 if name == "openat2" else 0, fixed, MOVING_SYSCALLS.get(name, 0))
        for name in MOUNT_SYSCALLS:
            if syscall_args(tfs, name) is not None:
                specs[name] = (-1, -1, -1, -1, -1, -1, KIND_MOUNT, 0, 0, 0, 0)
        return specs

    def start(self) -> None:
        ok, reason = self.probe()
        if not ok:
            raise BackendUnavailable(reason)
        tfs = tracefs()
        assert tfs is not None
        t0 = time.time_ns()
        self.time_offset = t0 - time.monotonic_ns()
        specs = self._specs(tfs)
        numbers = syscall_numbers()
        self.tp_names = {numbers[name]: name for name in specs
                         if numbers.get(name, MAX_SYSCALL_NR) < MAX_SYSCALL_NR}
        if os.uname().machine in COMPAT_ARG_REGS:
            compat = {COMPAT_BASE + nr: name for name, nr in compat_syscalls() if name in specs}
            self.have_compat = bool(compat)
            self.tp_names.update(compat)
        self.bpf = self._compile()
        bpf = self.bpf
        spec_map = bpf[b"syscall_spec"]
        for nr, name in self.tp_names.items():
            value = spec_map.Leaf()
            (value.dfd1, value.path1, value.dfd2, value.path2, value.fd, value.flags,
             value.kind, value.perm, value.flags_in_struct, value.fixed_flags,
             value.moves) = specs[name]
            value.active = 1
            spec_map[spec_map.Key(nr)] = value
        self.mounts = mount_points()
        self._sync_watches()
        self.ring = RingReader(bpf[b"events"].map_fd, self.ringbuf_pages * mmap.PAGESIZE)

    # -- rules -> the watched map ------------------------------------------------------
    def _host_path(self, path: str) -> str:
        return self.container.host_path(path) if self.container else path

    def _rule_entries(self, rule: Rule) -> list[tuple[tuple[int, int], tuple[int, int, int]]]:
        mask = sum(PERM_BITS[p] for p in rule.perms)
        if rule.kind == "inode":
            return [((kernel_dev(rule.dev or 0), rule.inode or 0), (mask, 0, 0))]
        assert rule.target is not None
        if rule.kind == "dir":
            target = self._host_path(rule.target)
            try:
                st = os.stat(target)
            except OSError as exc:
                raise RuleError(f"cannot watch {rule.target}: {exc.strerror}") from None
            return [((kernel_dev(st.st_dev), st.st_ino), (mask, mask, mask))]
        parent = os.path.dirname(rule.target) or "/"
        try:
            st = os.stat(self._host_path(parent))
        except OSError as exc:
            raise RuleError(f"cannot watch {rule.target}: its directory {parent}: "
                            f"{exc.strerror}") from None
        # The parent's entries: user space keeps the watched name (it survives the file
        # being replaced by a rename, and a file that does not exist yet).
        return [((kernel_dev(st.st_dev), st.st_ino), (0, mask, 0))]

    def _sync_watches(self) -> None:
        wanted: dict[tuple[int, int], tuple[int, int, int]] = {}
        for rule in self.rules:
            for key, (s, c, t) in self._rule_entries(rule):
                old = wanted.get(key, (0, 0, 0))
                wanted[key] = (old[0] | s, old[1] | c, old[2] | t)
        table = self.bpf[b"watched"]
        for key, val in wanted.items():
            if self.watch_values.get(key) != val:
                leaf = table.Leaf()
                leaf.self, leaf.child, leaf.subtree = val
                k = table.Key()
                k.dev, k.ino = key
                table[k] = leaf
        for key in set(self.watch_values) - set(wanted):
            k = table.Key()
            k.dev, k.ino = key
            try:
                del table[k]
            except KeyError:
                pass
        if wanted != self.watch_values:
            gens = self.bpf[b"gens"]
            key = gens.Key(GEN_USER)
            gens[key] = gens.Leaf(gens[key].value + 1)     # the kernel's verdicts expire
        self.watch_values = wanted
        self._set_config()

    def _set_config(self, **changes: int) -> None:
        cfg_map = self.bpf[b"config"]
        cfg = cfg_map[0]
        cfg.have_watches = 1 if self.watch_values else 0
        cfg.file_watches = 1 if any(r.kind == "inode" for r in self.rules) else 0
        cfg.self_tgid = os.getpid() if self.exclude_self else 0
        for name, value in changes.items():
            setattr(cfg, name, value)
        cfg_map[0] = cfg

    def add_rule(self, rid: int, rule: Rule) -> None:
        self._rule_entries(rule)        # refuse before changing anything
        self._sync_watches()

    def remove_rule(self, rid: int, rule: Rule) -> None:
        self._sync_watches()

    def watched_count(self) -> int:
        return len(self.watch_values)

    # -- scopes ----------------------------------------------------------------------
    def set_container(self, container) -> None:
        self.container = container

    def restrict_to_mount_namespace(self, mntns: int | None) -> None:
        self._set_config(mntns=mntns or 0)

    def add_process(self, pid: int, children: bool = True, announce: bool = True,
                    exclusive: bool = True, key: str | None = None) -> None:
        """announce=False: the process is about to exec; its record comes with the exec.
        exclusive=False (the daemon): the rules keep applying to every process, and
        everything this one touches is reported besides, with ``key``."""
        from ...scope import process_tree, read_process_state
        if not os.path.exists(f"/proc/{pid}"):
            raise RuleError(f"no process {pid}")
        pids = process_tree(pid) if children else [pid]
        table = self.bpf[b"audited"]
        flag = AUDIT_CHILDREN if children else 0
        if not exclusive or not len(self.rules):
            flag |= AUDIT_ALL_PATHS
        for p in pids:
            table[table.Key(p)] = table.Leaf(flag)
            self.audited.add(p)
            if key:
                self.audit_keys[p] = key
            st = read_process_state(p, "initial" if p == pid else "descendant")
            if st is not None and announce:
                if self.container is not None:
                    st.container = self.container.identity()
                self.batch.append(st)
        if exclusive:
            self._set_config(scope_processes=1)

    def remove_process(self, pid: int) -> None:
        table = self.bpf[b"audited"]
        try:
            del table[table.Key(pid)]
        except KeyError:
            raise RuleError(f"process {pid} is not audited") from None
        self.audited.discard(pid)
        self.audit_keys.pop(pid, None)

    # -- events ----------------------------------------------------------------------
    def _path(self, parts: list[bytes], n: int, pos: int) -> tuple[str, int]:
        key = tuple(parts[pos:pos + n])
        path = self.paths.get(key)
        if path is None:
            path = "/" + "/".join(p.decode(errors="surrogateescape") for p in reversed(key))
            if len(self.paths) >= MAX_CACHED:
                self.paths.clear()
            self.paths[key] = path
        return path, pos + n

    def _on_record(self, data: memoryview, off: int, size: int) -> None:
        (ktime, kind, tp_id, ret, flags, kdev, ino, mntns, pid, tid, ppid, uid, euid, gid,
         loginuid, nspid, n_base1, n_base2, n_exe, has_name1, has_name2, _walk, data_len,
         comm) = HEADER.unpack_from(data, off)
        start = off + HEADER.size
        parts = bytes(data[start:start + min(data_len, size - HEADER.size)]).split(b"\0")
        pos = 0
        base1, pos = self._path(parts, n_base1, pos)
        name1 = None
        if has_name1:
            name1, pos = parts[pos].decode(errors="surrogateescape"), pos + 1
        base2, pos = self._path(parts, n_base2, pos)
        name2 = None
        if has_name2:
            name2, pos = parts[pos].decode(errors="surrogateescape"), pos + 1
        if n_exe == EXE_AS_BEFORE:
            exe = self.exes.get(pid) or _proc_exe(pid)
        elif n_exe:
            exe, pos = self._path(parts, n_exe, pos)
            if len(self.exes) >= MAX_EXES:
                self.exes.clear()
            self.exes[pid] = exe
        else:
            exe = None

        comm_text = self.comms.get(comm)
        if comm_text is None:
            if len(self.comms) >= MAX_CACHED:
                self.comms.clear()
            comm_text = self.comms[comm] = comm.split(b"\0", 1)[0].decode(errors="replace")
        if kind == EV_STATE or (kind == EV_EXEC and pid in self.audited):
            # a process entering the audit (fork: it is still a copy of its parent) or
            # becoming another program: who it is, from the kernel, at that moment
            self.audited.add(pid)
            if kind == EV_STATE and ppid in self.audit_keys:
                self.audit_keys[pid] = self.audit_keys[ppid]
            self.batch.append(self._state(pid, ppid, uid, euid, gid, loginuid, comm_text,
                                          exe, ktime, "fork" if kind == EV_STATE else "exec",
                                          nspid))
            if kind == EV_STATE:
                return
        path = base1 if name1 is None else _join(base1, name1)
        path2 = None if name2 is None else _join(base2, name2)
        syscall = self.tp_names.get(tp_id)
        access = None
        if kind == EV_EXEC:
            op, syscall = "exec", None
        elif kind == EV_URING:
            op, syscall = IORING_OPS.get(tp_id, "attr"), None
            mount = self.mounts.get(user_dev(kdev))
            if mount and mount != "/":
                path = mount + path
            if flags & URING_NEW_ENTRY:
                path = _entry_named_by_inode(self._host_path(path), ino, path)
        elif syscall is None:
            return
        elif syscall in ("open", "openat", "openat2", "creat"):
            if kind == EV_SYSCALL and (flags >> CREATED_FLAG_SHIFT) & 1:
                op = "create"
            elif kind == EV_FAILED and flags & O_CREAT:
                op = "create"
            else:
                op = "open"
                acc = flags & O_ACCMODE
                access = "w" if acc == O_WRONLY else ("rw" if acc == O_RDWR else "r")
        elif syscall == "unlinkat":
            op = "rmdir" if flags & AT_REMOVEDIR else "unlink"
        else:
            op = next(iter(syscalls.SYSCALL_OPS[syscall]))
        ev = Event(op=op, path=path, path2=path2, backend=self.name,
                   time=self.time_offset + ktime, syscall=syscall,
                   result=0 if kind in (EV_EXEC, EV_URING) else (0 if ret >= 0 else ret),
                   dev=user_dev(kdev) if kdev else None, ino=ino or None,
                   pid=pid, tid=tid, ppid=ppid, uid=uid, euid=euid, gid=gid,
                   loginuid=loginuid, comm=comm_text,
                   exe=exe, access=access)
        if kind == EV_URING:
            ev.result = None
        if self.container is not None:
            ev.container = dict(self.container.identity(), pid=nspid)
        if pid in self.audited:
            key = self.audit_keys.get(pid)
            ev.scope_keys = (key,) if key else ()
        self.batch.append(ev)

    def _state(self, pid: int, ppid: int, uid: int, euid: int, gid: int, loginuid: int,
               comm: str, exe: str | None, ktime: int, reason: str,
               nspid: int) -> ProcessState:
        st = ProcessState(pid=pid, ppid=ppid, uid=uid, euid=euid, gid=gid,
                          loginuid=loginuid, comm=comm, exe=exe, start_time=ktime,
                          reason=reason, nspid=nspid or None)
        try:
            st.cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            pass
        if self.container is not None:
            st.container = self.container.identity()
        return st

    def read(self, timeout: float) -> list[Event | ProcessState]:
        assert self.bpf is not None
        if self.ring.wait(timeout):
            self.ring.consume(self._on_record)
        out, self.batch = self.batch, []
        return _merge_uring(out)

    def _counter(self, idx: int) -> int:
        values = self.bpf[b"counters"][ctypes.c_int(idx)]
        return int(sum(values))

    def submitted(self) -> int:
        """Records the kernel submitted to the ring buffer (for tests and status)."""
        return self._counter(CNT_SUBMITTED)

    def lost(self) -> dict[str, int]:
        if self.bpf is None:
            return {"ringbuf": 0}
        out = {"ringbuf": self._counter(CNT_LOST),
               "pending_full": self._counter(CNT_PENDING_FULL)}
        compat = self._counter(CNT_COMPAT)
        if compat:      # 32-bit syscalls: not judged, so possibly unreported operations
            out["compat_syscalls"] = compat
        return out

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def _join(base: str, name: str) -> str:
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


def _merge_uring(items: list) -> list:
    """An io_uring request changes several inodes (an unlink: the file and its
    directory); keep one event per request: the deepest path of consecutive events from
    the same worker with the same operation."""
    out: list = []
    for item in items:
        prev = out[-1] if out else None
        if (isinstance(item, Event) and isinstance(prev, Event) and item.syscall is None
                and prev.syscall is None and item.op == prev.op and item.tid == prev.tid
                and item.op != "exec" and prev.op != "exec"
                and item.path and prev.path
                and (item.path.startswith(prev.path + "/") or
                     prev.path.startswith(item.path + "/"))):
            if len(item.path) > len(prev.path):
                out[-1] = item
            continue
        out.append(item)
    return out
