"""Loading the programs: what the host offers (probe), tracefs, kernel struct offsets
from BTF turned into compiler flags, syscall numbers and per-syscall argument roles, and
the program text: probes.c with the C text generated from abi.py in front of it,
compiled and loaded by objcache.py.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
from importlib import resources

from ... import ops, syscalls
from ...diag import get_logger
from ..base import BackendUnavailable
from . import abi, objcache
from .abi import KIND, MOVES, OFLAG, PERM_BITS, SyscallSpec
from .btf import BTF, VMLINUX_BTF, BTFError

log = get_logger("ebpf")

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
TRACEFS_MOUNT = TRACEFS_DIRS[0]
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
    "OFF_CRED_SUID": "cred.suid", "OFF_CRED_FSUID": "cred.fsuid", "OFF_CRED_EGID": "cred.egid",
    "OFF_CRED_SGID": "cred.sgid", "OFF_CRED_FSGID": "cred.fsgid",
    "OFF_FS_PWD": "fs_struct.pwd", "OFF_FS_ROOT": "fs_struct.root",
    "OFF_PATH_MNT": "path.mnt", "OFF_PATH_DENTRY": "path.dentry",
    "OFF_FILES_FDT": "files_struct.fdt", "OFF_FDTABLE_FD": "fdtable.fd",
    "OFF_FDTABLE_MAX_FDS": "fdtable.max_fds", "OFF_FILE_F_PATH": "file.f_path",
    "OFF_FILE_F_INODE": "file.f_inode", "OFF_DENTRY_D_PARENT": "dentry.d_parent",
    "OFF_DENTRY_D_NAME": "dentry.d_name", "OFF_QSTR_NAME": "qstr.name",
    "OFF_DENTRY_D_INODE": "dentry.d_inode", "OFF_DENTRY_D_ALIAS": "dentry.d_u",
    "OFF_INODE_I_INO": "inode.i_ino", "OFF_INODE_I_SB": "inode.i_sb",
    "OFF_INODE_I_UID": "inode.i_uid", "OFF_INODE_I_GID": "inode.i_gid",
    "OFF_INODE_I_MODE": "inode.i_mode", "OFF_INODE_I_NLINK": "inode.i_nlink",
    "OFF_INODE_I_DENTRY": "inode.i_dentry",
    "OFF_SB_S_DEV": "super_block.s_dev", "OFF_MOUNT_MNT": "mount.mnt",
    "OFF_MOUNT_MNT_PARENT": "mount.mnt_parent",
    "OFF_MOUNT_MNT_MOUNTPOINT": "mount.mnt_mountpoint",
    "OFF_VFSMOUNT_MNT_ROOT": "vfsmount.mnt_root", "OFF_MM_EXE_FILE": "mm_struct.exe_file",
    "OFF_TASK_GROUP_LEADER": "task_struct.group_leader",
    "OFF_TASK_START_TIME": "task_struct.start_time",
    "OFF_BINPRM_FILE": "linux_binprm.file",
    "OFF_TASK_THREAD_PID": "task_struct.thread_pid", "OFF_PID_LEVEL": "pid.level",
    "OFF_PID_NUMBERS": "pid.numbers", "OFF_UPID_NR": "upid.nr",
    "OFF_TASK_FLAGS": "task_struct.flags",
    # io_uring requests run by io-wq workers (their opcode, names and open flags)
    "OFF_TASK_WORKER_PRIVATE": "task_struct.worker_private",
    "OFF_IO_WORKER_CUR_WORK": "io_worker.cur_work", "OFF_IO_KIOCB_WORK": "io_kiocb.work",
    "OFF_IO_KIOCB_OPCODE": "io_kiocb.opcode", "OFF_IO_KIOCB_CMD": "io_kiocb.cmd",
    "OFF_IO_RENAME_OLD_DFD": "io_rename.old_dfd", "OFF_IO_RENAME_NEW_DFD": "io_rename.new_dfd",
    "OFF_IO_RENAME_OLDPATH": "io_rename.oldpath", "OFF_IO_RENAME_NEWPATH": "io_rename.newpath",
    "OFF_IO_UNLINK_DFD": "io_unlink.dfd", "OFF_IO_UNLINK_FILENAME": "io_unlink.filename",
    "OFF_IO_UNLINK_FLAGS": "io_unlink.flags", "OFF_FILENAME_NAME": "filename.name",
    "OFF_IO_LINK_OLD_DFD": "io_link.old_dfd", "OFF_IO_LINK_NEW_DFD": "io_link.new_dfd",
    "OFF_IO_LINK_OLDPATH": "io_link.oldpath", "OFF_IO_LINK_NEWPATH": "io_link.newpath",
    "OFF_IO_MKDIR_DFD": "io_mkdir.dfd", "OFF_IO_MKDIR_FILENAME": "io_mkdir.filename",
    "OFF_IO_OPEN_HOW": "io_open.how", "OFF_IO_OPEN_FILE_SLOT": "io_open.file_slot",
    "OFF_OPEN_HOW_FLAGS": "open_how.flags", "OFF_IO_OPEN_DFD": "io_open.dfd",
    "OFF_IO_OPEN_FILENAME": "io_open.filename",
}

# Syscalls that can move or remove a directory, and those that make a filesystem
# reachable: after them the kernel's cache of directory verdicts is expired.
MOVING_SYSCALLS = {"rename": MOVES.MAYBE, "renameat": MOVES.MAYBE, "renameat2": MOVES.MAYBE,
                   "unlinkat": MOVES.MAYBE, "rmdir": MOVES.ALWAYS}
# syscalls that place, move or remove mounts (and so change where directories are and
# the paths through them): each success moves GEN_KERNEL
# (named as the syscall tables name them: umount2's tracefs event is "umount")
MOUNT_SYSCALLS = ("mount", "fsmount", "move_mount", "umount2", "umount", "pivot_root",
                  "open_tree", "open_tree_attr")

# Syscall argument roles, by the argument names in the tracefs format files.
DFD_NAMES = ("dfd", "olddfd")
PATH_NAMES = ("filename", "pathname", "path", "oldname")

# Where syscall arguments are in struct pt_regs, per architecture (the syscall ABI).
SYSCALL_ARG_REGS = {
    "x86_64": ("di", "si", "dx", "r10", "r8", "r9"),
    "aarch64": ("regs",) * 6,     # regs[0..5]
}
# Where the syscall number stays during the syscall (read at the raw sys_exit).
SYSCALL_NR_REG = {"x86_64": "pt_regs.orig_ax", "aarch64": "pt_regs.syscallno"}
TS_COMPAT = 0x0002        # x86 thread_info.status: a 32-bit syscall is running
# 32-bit syscalls of 64-bit kernels (ia32 emulation): their argument registers, their
# number table, and the 64-bit syscall each one is the same operation as (arguments in
# the same order as far as paths, fds and flags go).  Slots COMPAT_BASE + number.
COMPAT_ARG_REGS = {"x86_64": ("bx", "cx", "dx", "si", "di", "bp")}
COMPAT_UNISTD = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_32.h"}
COMPAT_NAMES = {"chown32": "chown", "lchown32": "lchown", "fchown32": "fchown",
                "truncate64": "truncate", "ftruncate64": "ftruncate",
                "utimensat_time64": "utimensat"}


# ---- tracefs ------------------------------------------------------------------------
def tracefs() -> str | None:
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def mount_tracefs() -> str:
    """Mount tracefs at /sys/kernel/tracing (a fresh host, a new mount namespace); returns
    why it could not, or "" once it is mounted.  mount(2) itself, never a shell."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_void_p)
    if libc.mount(b"nodev", TRACEFS_MOUNT.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        return f"tracefs is not mounted and mounting it failed: {os.strerror(err)}"
    log.info("mounted tracefs", path=TRACEFS_MOUNT,
             reason="it was not mounted; the eBPF backend needs its tracepoint formats")
    return ""


def ensure_tracefs() -> tuple[str | None, str]:
    """(tracefs directory, "") or (None, why not); mounts it when root and missing."""
    tfs = tracefs()
    if tfs is not None:
        return tfs, ""
    if os.geteuid() != 0:
        return None, "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)"
    why = mount_tracefs()
    tfs = tracefs()
    if tfs is None:
        return None, why or f"tracefs mounted at {TRACEFS_MOUNT} has no events directory"
    return tfs, ""


def probe() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root (CAP_BPF and CAP_PERFMON)"
    if importlib.util.find_spec("bcc") is None:   # found, not imported: it maps LLVM
        return False, "bcc is not importable (Debian package python3-bpfcc)"
    if not os.path.exists(VMLINUX_BTF):
        return False, f"no kernel BTF at {VMLINUX_BTF} (CONFIG_DEBUG_INFO_BTF)"
    tfs, why = ensure_tracefs()
    if tfs is None:
        return False, why
    missing = [t for t in CTIME_TRACEPOINTS
               if not os.path.isdir(f"{tfs}/events/timestamp/{t}")]
    if missing:
        return False, ("kernel lacks the timestamp:* tracepoints "
                       f"({', '.join(missing)}): Linux 6.13 or newer is needed")
    return True, "root, bcc, BTF and timestamp tracepoints present"


# ---- syscalls -----------------------------------------------------------------------
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


def syscall_specs(tfs: str) -> dict[str, SyscallSpec]:
    """Per followed syscall this kernel has: which arguments are what (syscall_spec)."""
    specs = {}
    for name, sc_ops in syscalls.SYSCALL_OPS.items():
        args = syscall_args(tfs, name)
        if args is None:
            continue

        def idx(*names: str, args: list[str] = args) -> int:
            return next((args.index(n) for n in names if n in args), -1)
        if ops.EXEC in sc_ops:
            # a success is reported at sched_process_exec (the program file decides);
            # a failure is judged by its name at sys_exit, as other syscalls' are
            specs[name] = SyscallSpec(dfd1=idx("fd"), path1=idx("filename"),
                                      flags=idx("flags"), kind=KIND.EXEC,
                                      perm=PERM_BITS["x"])
            continue
        dfd1, path1 = idx(*DFD_NAMES), idx(*PATH_NAMES)
        dfd2, path2 = idx("newdfd"), idx("newname")
        if name in ("symlink", "symlinkat"):   # oldname is the link's text, not a path
            dfd1, path1, dfd2, path2 = dfd2, path2, -1, -1
        perm = 0
        for op in sc_ops:
            for letter in syscalls.perms_for(op, "rw"):
                perm |= PERM_BITS[letter]
        specs[name] = SyscallSpec(
            dfd1=dfd1, path1=path1, dfd2=dfd2, path2=path2,
            fd=idx("fd") if path1 < 0 else -1,
            flags=idx("flags", "flag", "how"),
            kind=KIND.OPEN if sc_ops & {ops.OPEN, ops.CREATE} else KIND.PLAIN,
            perm=perm,
            flags_in_struct=1 if name == "openat2" else 0,
            fixed_flags=OFLAG.CREAT | OFLAG.WRONLY | OFLAG.TRUNC if name == "creat" else 0,
            moves=MOVING_SYSCALLS.get(name, MOVES.NEVER))
    for name in MOUNT_SYSCALLS:       # no arguments read: a name the tables lack is unused
        specs[name] = SyscallSpec(kind=KIND.MOUNT)
    return specs


def compat_syscalls() -> list[tuple[str, int]]:
    """(64-bit syscall name, 32-bit number) for the 32-bit syscalls of this machine."""
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
    out += [(name, nr) for name, nr in syscalls.NEWER_SYSCALLS.items() if name not in have]
    return [(name, nr) for name, nr in out if nr < abi.MAX_SYSCALL_NR]


def syscall_numbers() -> dict[str, int]:
    """Syscall name -> number (syscalls.syscall_numbers), or why the backend cannot run."""
    numbers = syscalls.syscall_numbers()
    if not numbers:
        raise BackendUnavailable("no syscall number table: install linux-libc-dev "
                                 f"(looked for {', '.join(syscalls.UNISTD_HEADERS)})")
    return numbers


def syscall_slots(specs: dict[str, SyscallSpec]) -> tuple[dict[int, str], bool]:
    """syscall_spec slot -> syscall name for the followed syscalls, and whether the
    32-bit syscalls have their own slots."""
    numbers = syscall_numbers()
    slots = {numbers[name]: name for name in specs
             if numbers.get(name, abi.MAX_SYSCALL_NR) < abi.MAX_SYSCALL_NR}
    have_compat = False
    if os.uname().machine in COMPAT_ARG_REGS:
        compat = {abi.COMPAT_BASE + nr: name for name, nr in compat_syscalls()
                  if name in specs}
        have_compat = bool(compat)
        slots.update(compat)
    return slots, have_compat


# ---- compiling ----------------------------------------------------------------------
def syscall_arg_offsets(btf: BTF) -> list[int]:
    machine = os.uname().machine
    regs = SYSCALL_ARG_REGS.get(machine)
    if regs is None:
        raise BackendUnavailable(f"syscall argument registers unknown for {machine}")
    if regs[0] == "regs":
        # read at the syscall's end (sys_exit), where x0 holds the return value: the
        # first argument is kept in orig_x0
        base = btf.offset("pt_regs.regs")
        return [btf.offset("pt_regs.orig_x0")] + [base + 8 * i for i in range(1, 6)]
    return [btf.offset(f"pt_regs.{r}") for r in regs]


def uring_fixed_flags(btf: BTF) -> list[str]:
    """Where an io_uring ring keeps the files of its fixed file slots (the table of
    6.13 on); none: opens into fixed slots are not seen."""
    try:
        return [f"-DOFF_IO_KIOCB_CTX={btf.offset('io_kiocb.ctx')}",
                f"-DOFF_IO_RING_CTX_FILE_TABLE={btf.offset('io_ring_ctx.file_table')}",
                f"-DOFF_IO_FILE_TABLE_DATA={btf.offset('io_file_table.data')}",
                f"-DOFF_IO_RSRC_DATA_NR={btf.offset('io_rsrc_data.nr')}",
                f"-DOFF_IO_RSRC_DATA_NODES={btf.offset('io_rsrc_data.nodes')}",
                f"-DOFF_IO_RSRC_NODE_FILE_PTR={btf.offset('io_rsrc_node.file_ptr')}"]
    except BTFError:
        return []


def sb_mount_flags(btf: BTF) -> list[str]:
    """How a filesystem's mounts are found from its super_block: a chain of struct
    mount (6.15 on) or a list_head (before); none: a walk stops at a filesystem's root
    when it does not know the mount it came through."""
    try:
        return [f"-DOFF_SB_S_MOUNTS={btf.offset('super_block.s_mounts')}",
                f"-DOFF_MOUNT_NEXT_FOR_SB={btf.offset('mount.mnt_next_for_sb')}"]
    except BTFError:
        pass
    try:
        return [f"-DOFF_SB_S_MOUNTS={btf.offset('super_block.s_mounts')}",
                f"-DOFF_MOUNT_MNT_INSTANCE={btf.offset('mount.mnt_instance')}"]
    except BTFError:
        return []


CRED_IDS = ("uid", "gid", "suid", "sgid", "euid", "egid", "fsuid", "fsgid")


def mount_id_flags(btf: BTF) -> list[str]:
    """A mount's id that is never reused (6.8 on): a base directory said to be "as
    before" must be reached through the same mount, not one made since at the same
    address.  None: the mount pointer alone, with the mount syscalls' generation."""
    try:
        return [f"-DOFF_MOUNT_MNT_ID_UNIQUE={btf.offset('mount.mnt_id_unique')}"]
    except BTFError:
        return []


def kernel_view_flags(btf: BTF) -> list[str]:
    """Plain loads of kernel memory instead of bpf_probe_read_kernel calls (about 30 ns
    each): the kfunc bpf_rdonly_cast (Linux 6.2+; the timestamp tracepoints the backend
    needs came in 6.13) makes an address a view of a struct that is one open-ended u64
    array, which the verifier lets a program read at any offset, each load guarded
    against faults as a probe read is."""
    cast = btf.func_id("bpf_rdonly_cast")
    if cast is None:
        raise BTFError("the kernel has no bpf_rdonly_cast (Linux 6.2 and later have it)")
    words = btf.open_words_id("bpf_raw_tracepoint_args")
    if words is None:
        raise BTFError("struct bpf_raw_tracepoint_args is not one open-ended array")
    return [f"-DKFUNC_RDONLY_CAST={cast}", f"-DBTF_OPEN_WORDS={words}"]


FLAGS_SUFFIX = ".flags"


def cflags(ringbuf_pages: int, have_compat: bool,
           cache_dir: str | None = objcache.CACHE_DIR) -> list[str]:
    """-D flags: the running kernel's struct offsets and this run's sizes.  The
    offsets are kept in the cache beside the compiled programs (reading BTF takes a
    tenth of a second), keyed by the kernel's BTF and the text of the code that reads
    them (this module and btf.py)."""
    here = resources.files(__package__)
    key = objcache.digest_of(b"flags", *objcache.kernel_identity(),
                             here.joinpath("loader.py").read_bytes(),
                             here.joinpath("btf.py").read_bytes())
    cached = objcache.read_cached(cache_dir, key, FLAGS_SUFFIX) if cache_dir else None
    if cached is not None and isinstance(cached.get("flags"), list):
        flags = [str(f) for f in cached["flags"]]
    else:
        flags = kernel_flags()
        if cache_dir:
            objcache.write_cached(cache_dir, key, {"flags": flags}, FLAGS_SUFFIX)
    return flags + [f"-DRINGBUF_PAGES={ringbuf_pages}",
                    f"-DHAVE_COMPAT_TABLE={1 if have_compat else 0}"]


def kernel_flags() -> list[str]:
    """-D flags of the running kernel's struct offsets, read from its BTF."""
    machine = os.uname().machine
    try:
        btf = BTF()
        flags = [f"-D{name}={btf.offset(member)}" for name, member in OFFSETS.items()]
        arg_offs = syscall_arg_offsets(btf)
        flags += [f"-DOFF_REGS_ARG{i}={off}" for i, off in enumerate(arg_offs)]
        flags.append(f"-DOFF_REGS_SYSCALL_NR={btf.offset(SYSCALL_NR_REG[machine])}")
        compat_regs = COMPAT_ARG_REGS.get(machine)
        if compat_regs:
            offs = [btf.offset(f"pt_regs.{r}") for r in compat_regs]
            flags += [f"-DOFF_TASK_TI_STATUS={btf.offset('task_struct.thread_info.status')}",
                      f"-DTS_COMPAT_BIT={TS_COMPAT}"]
            flags += [f"-DOFF_CREGS_ARG{i}={off}" for i, off in enumerate(offs)]
        flags.append(f"-DSIZEOF_UPID={btf.size('upid')}")
        flags += sb_mount_flags(btf)
        flags += uring_fixed_flags(btf)
        flags += kernel_view_flags(btf)
        flags += mount_id_flags(btf)
    except (OSError, BTFError) as exc:
        raise BackendUnavailable(f"cannot read kernel struct layouts from BTF: {exc}") from None
    return flags


def program_text() -> bytes:
    """probes.c with the C side of abi.py in front of it (line numbers kept)."""
    src = resources.files(__package__).joinpath("probes.c").read_bytes()
    return abi.c_header().encode() + b'#line 1 "probes.c"\n' + src


def load_programs(flags: list[str], tfs: str, cache_dir: str | None = objcache.CACHE_DIR):
    """The programs compiled (in a child process, or taken from the cache), their maps
    created and the programs loading (``attach()`` waits for them and attaches); this
    process never loads bcc or LLVM."""
    try:
        obj, cached = objcache.compiled_object(program_text(), flags, cache_dir)
        progs = objcache.Programs(obj, tfs)
        progs.cached = cached
        return progs
    except (objcache.ObjectError, OSError) as exc:
        raise not_loaded(exc) from None


def attach_programs(progs: objcache.Programs) -> None:
    try:
        progs.attach()
    except OSError as exc:
        raise not_loaded(exc) from None


def not_loaded(exc: Exception) -> BackendUnavailable:
    """Why the programs did not load, with the end of the verifier's log if any."""
    why = str(exc)
    log_text = getattr(exc, "log", "")
    if log_text:
        why += "\n" + "\n".join(log_text.strip().splitlines()[-20:])
    return BackendUnavailable(f"the BPF programs did not load: {why}")
