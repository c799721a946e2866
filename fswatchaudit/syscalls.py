"""Syscall tables and aliases: the one place that knows which syscalls make which operation.

The aliases come from the Linux audit filesystem-watch proposal (fs-create, fs-remove,
fs-attr, fs-all).  Each classic name expands to the variants the kernel really uses on
x86_64 and aarch64 (glibc calls the old ``rename``/``unlink``/``chmod`` on x86_64, the
``*at`` forms elsewhere), so rules written with the classic names keep working everywhere.
"""
from __future__ import annotations

import difflib
import os
import re

from . import ops
from .ops import ALL_OPS, ATTR_OPS, CREATE_OPS, EXEC_OPS, OPEN_OPS, REMOVE_OPS  # noqa: F401

# Alias name -> operations in it.  "open with O_CREAT" in fs-create is the op "create".
ALIAS_OPS: dict[str, frozenset[str]] = {
    "fs-create": CREATE_OPS,
    "fs-remove": REMOVE_OPS,
    "fs-attr": ATTR_OPS,
    "open": OPEN_OPS,
    "exec": EXEC_OPS,
}
# Order in which aliases are printed and summarised.
ALIAS_ORDER = ("fs-create", "fs-remove", "fs-attr", "open", "exec")

# Classic syscall name -> the names the kernel really has (x86_64 and aarch64 union).
SYSCALL_VARIANTS: dict[str, tuple[str, ...]] = {
    "creat": ("creat",),
    "open": ("open", "openat", "openat2"),
    "link": ("link", "linkat"),
    "mkdir": ("mkdir", "mkdirat"),
    "mknod": ("mknod", "mknodat"),
    "rename": ("rename", "renameat", "renameat2"),
    "symlink": ("symlink", "symlinkat"),
    "rmdir": ("rmdir", "unlinkat"),
    "unlink": ("unlink", "unlinkat"),
    "chmod": ("chmod", "fchmodat", "fchmodat2"),
    "fchmod": ("fchmod",),
    "chown": ("chown", "fchownat"),
    "fchown": ("fchown",),
    "lchown": ("lchown", "fchownat"),
    "setxattr": ("setxattr", "setxattrat"),
    "lsetxattr": ("lsetxattr", "setxattrat"),
    "fsetxattr": ("fsetxattr",),
    "removexattr": ("removexattr", "removexattrat"),
    "lremovexattr": ("lremovexattr", "removexattrat"),
    "fremovexattr": ("fremovexattr",),
    "truncate": ("truncate",),
    "ftruncate": ("ftruncate",),
    "utime": ("utime", "utimensat"),
    "utimes": ("utimes", "futimesat", "utimensat"),
    "utimensat": ("utimensat",),
    "execve": ("execve", "execveat"),
}

# Every real syscall name -> the operations it can produce.
SYSCALL_OPS: dict[str, frozenset[str]] = {
    "creat": frozenset({ops.CREATE}),
    "open": frozenset({ops.OPEN, ops.CREATE}),
    "openat": frozenset({ops.OPEN, ops.CREATE}),
    "openat2": frozenset({ops.OPEN, ops.CREATE}),
    "link": frozenset({ops.LINK}),
    "linkat": frozenset({ops.LINK}),
    "mkdir": frozenset({ops.MKDIR}),
    "mkdirat": frozenset({ops.MKDIR}),
    "mknod": frozenset({ops.MKNOD}),
    "mknodat": frozenset({ops.MKNOD}),
    "rename": frozenset({ops.RENAME}),
    "renameat": frozenset({ops.RENAME}),
    "renameat2": frozenset({ops.RENAME}),
    "symlink": frozenset({ops.SYMLINK}),
    "symlinkat": frozenset({ops.SYMLINK}),
    "rmdir": frozenset({ops.RMDIR}),
    "unlink": frozenset({ops.UNLINK}),
    "unlinkat": frozenset({ops.UNLINK, ops.RMDIR}),
    "chmod": frozenset({ops.CHMOD}),
    "fchmod": frozenset({ops.CHMOD}),
    "fchmodat": frozenset({ops.CHMOD}),
    "fchmodat2": frozenset({ops.CHMOD}),
    "chown": frozenset({ops.CHOWN}),
    "fchown": frozenset({ops.CHOWN}),
    "lchown": frozenset({ops.CHOWN}),
    "fchownat": frozenset({ops.CHOWN}),
    "setxattr": frozenset({ops.SETXATTR}),
    "lsetxattr": frozenset({ops.SETXATTR}),
    "fsetxattr": frozenset({ops.SETXATTR}),
    "setxattrat": frozenset({ops.SETXATTR}),
    "removexattr": frozenset({ops.REMOVEXATTR}),
    "lremovexattr": frozenset({ops.REMOVEXATTR}),
    "fremovexattr": frozenset({ops.REMOVEXATTR}),
    "removexattrat": frozenset({ops.REMOVEXATTR}),
    "truncate": frozenset({ops.TRUNCATE}),
    "ftruncate": frozenset({ops.TRUNCATE}),
    "utime": frozenset({ops.UTIME}),
    "utimes": frozenset({ops.UTIME}),
    "futimesat": frozenset({ops.UTIME}),
    "utimensat": frozenset({ops.UTIME}),
    "open_by_handle_at": frozenset({ops.OPEN}),
    "file_setattr": frozenset({ops.ATTR}),
    "execve": frozenset({ops.EXEC}),
    "execveat": frozenset({ops.EXEC}),
}

# Alias name -> classic syscall names, as written in the proposal.
ALIAS_SYSCALLS: dict[str, tuple[str, ...]] = {
    "fs-create": ("creat", "link", "mkdir", "mknod", "open", "rename", "symlink"),
    "fs-remove": ("rename", "rmdir", "unlink"),
    "fs-attr": ("chmod", "chown", "fchmod", "fchown", "lchown", "setxattr", "lsetxattr",
                "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "truncate",
                "ftruncate", "utime", "utimes", "utimensat"),
}
ALIAS_SYSCALLS["fs-all"] = tuple(dict.fromkeys(
    ALIAS_SYSCALLS["fs-create"] + ALIAS_SYSCALLS["fs-remove"] + ALIAS_SYSCALLS["fs-attr"]))

SYSCALL_ALIAS_NAMES = frozenset(ALIAS_SYSCALLS) | {"all"}

# Permission letters (auditctl -p / -F perm=) and the operations each one selects.
PERM_LETTERS = "rwxa"


def expand_syscall(name: str) -> tuple[frozenset[str], frozenset[str]]:
    """Expand a syscall name or alias to (real syscall names, operations it selects).

    Raises KeyError for an unknown name.  ``fs-create`` selects the op ``create``
    from open(), not ``open`` itself: only opens with O_CREAT belong to it.
    """
    if name == "all":
        return frozenset(SYSCALL_OPS), ALL_OPS
    if name in ALIAS_SYSCALLS:
        calls = frozenset(v for c in ALIAS_SYSCALLS[name] for v in SYSCALL_VARIANTS[c])
        selected = frozenset().union(*(ALIAS_OPS[a] for a in ALIAS_OPS if a.startswith("fs-")
                                  and (name == "fs-all" or a == name)))
        return calls, selected
    if name in SYSCALL_VARIANTS:
        calls = frozenset(SYSCALL_VARIANTS[name])
    elif name in SYSCALL_OPS:
        calls = frozenset({name})
    else:
        raise KeyError(name)
    selected = frozenset().union(*(SYSCALL_OPS[c] for c in calls))
    if name == "rmdir":
        selected = frozenset({ops.RMDIR})
    elif name == "unlink":
        selected = frozenset({ops.UNLINK})
    return calls, selected


UNISTD_HEADERS = ("/usr/include/{multiarch}/asm/unistd_64.h", "/usr/include/asm/unistd_64.h",
                  "/usr/include/asm-generic/unistd.h")
MULTIARCH = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
# Syscalls newer than the libc headers we may find.  Since Linux 5.1 new syscalls get
# the same number on every architecture.
NEWER_SYSCALLS = {"fchmodat2": 452, "statmount": 457, "listmount": 458,
                  "lsm_get_self_attr": 459, "lsm_set_self_attr": 460, "lsm_list_modules": 461,
                  "mseal": 462, "setxattrat": 463, "getxattrat": 464,
                  "listxattrat": 465, "removexattrat": 466, "open_tree_attr": 467,
                  "file_getattr": 468, "file_setattr": 469}
_numbers: dict[str, int] | None = None


def syscall_numbers() -> dict[str, int]:
    """Syscall name -> number of this machine's own table, from the kernel ABI headers
    (Debian's linux-libc-dev); empty when there are none."""
    global _numbers
    if _numbers is not None:
        return _numbers
    multiarch = MULTIARCH.get(os.uname().machine, "")
    define = re.compile(r"#define\s+__NR(?:3264)?_(\w+)\s+(\w+)")
    numbers: dict[str, int] = {}
    for pattern in UNISTD_HEADERS:
        try:
            with open(pattern.format(multiarch=multiarch)) as fh:
                raw = dict(define.findall(fh.read()))
        except OSError:
            continue
        for name, value in raw.items():
            while not value.isdigit() and value.startswith("__NR"):
                value = raw.get(value.split("_", 3)[-1] if value.startswith("__NR3264_")
                                else value[len("__NR_"):], "x")
            if value.isdigit():
                numbers[name] = int(value)
        for name, nr in NEWER_SYSCALLS.items():
            numbers.setdefault(name, nr)
        break
    _numbers = numbers
    return numbers


def kernel_syscall_names() -> frozenset[str]:
    """Every syscall name of the kernel ABI, to tell a syscall this product does not
    audit from a misspelt one."""
    return frozenset(syscall_numbers())


def unaudited_syscall_message(name: str) -> str:
    """Why -S NAME is refused: a syscall outside the file domain, or an unknown name
    (with a suggestion only when one is really close)."""
    if name in kernel_syscall_names():
        return (f"syscall {name!r} is not audited by this product: it audits the "
                "file-system syscalls (what creates, removes, changes, opens or runs "
                "files)")
    close = difflib.get_close_matches(name, known_syscall_names(), n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown syscall or alias {name!r}{hint}"


def known_syscall_names() -> list[str]:
    """Every name -S accepts, for 'did you mean' suggestions."""
    return sorted(set(SYSCALL_VARIANTS) | set(SYSCALL_OPS) | SYSCALL_ALIAS_NAMES)


_ALIASES_OF: dict[str, tuple[str, ...]] = {}


def aliases_for_op(op: str) -> list[str]:
    """The aliases whose set contains this operation (rename is in two)."""
    found = _ALIASES_OF.get(op)
    if found is None:
        found = _ALIASES_OF[op] = tuple(a for a in ALIAS_ORDER if op in ALIAS_OPS[a])
    return list(found)


_OPEN_PERMS = {access: frozenset(access) & frozenset("rw") for access in ("r", "w", "rw")}
_PERMS_X, _PERMS_WA, _PERMS_W = frozenset("x"), frozenset("wa"), frozenset("w")


def perms_for(op: str, access: str | None = None) -> frozenset[str]:
    """Permission letters an operation counts as: r/w for opens by access mode,
    w for every namespace or attribute change, a for attribute changes, x for exec."""
    if op == ops.OPEN:
        return _OPEN_PERMS.get(access or "r") or frozenset(access or "r") & frozenset("rw")
    if op == ops.EXEC:
        return _PERMS_X
    if op in ATTR_OPS:
        return _PERMS_WA
    return _PERMS_W
