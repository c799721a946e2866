"""The conformance workload: every kind of operation, once, with the events it must give.

Expected events are written for a backend that can see everything; ``expected_for``
derives what a given backend must report from fswatchaudit.capabilities, the same data
the README's comparison table is generated from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from fswatchaudit import ops
from fswatchaudit.capabilities import CAPABILITIES
from fswatchaudit.ops import ATTR_OPS

EACCES = 13
EEXIST = 17
ENOENT = 2
ENOTEMPTY = 39
# open_by_handle_at(2) of an existing file for write (the mount fd: any on its filesystem)
BY_HANDLE = ("import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
             "h = ctypes.create_string_buffer(136); ctypes.c_uint.from_buffer(h).value = 128; "
             "m = ctypes.c_int(); "
             "assert libc.name_to_handle_at(-100, b'byhandle', h, ctypes.byref(m), 0) == 0; "
             "fd = libc.open_by_handle_at(os.open('/', os.O_RDONLY), h, os.O_WRONLY); "
             "assert fd >= 0; os.write(fd, b'x')")
UNPRIVILEGED = 65534


@dataclass
class Step:
    name: str
    code: str                      # Python run in a fresh interpreter, cwd = watched dir
    events: list[dict]             # expected, "{W}"/"{O}" stand for the two directories
    user: int | None = None        # run as this uid
    shell: bool = False            # code is a shell line (several processes)
    needs: str = ""                # a Capability flag: backends without it report nothing


def E(op, path=None, path2=None, **kw) -> dict:
    return {"op": op, "path": path, "path2": path2, **kw}


STEPS = [
    Step("create", "open('f1', 'w').write('hello')", [E(ops.CREATE, "{W}/f1", syscall="openat")]),
    Step("open for write", "open('f1', 'a').write('more')",
         [E(ops.OPEN, "{W}/f1", access="w", syscall="openat")]),
    Step("open for read", "open('f1').read()",
         [E(ops.OPEN, "{W}/f1", access="r", syscall="openat")]),
    Step("chmod", "import os; os.chmod('f1', 0o600)", [E(ops.CHMOD, "{W}/f1", syscall="chmod")]),
    Step("chown", "import os; os.chown('f1', 65534, 65534)",
         [E(ops.CHOWN, "{W}/f1", syscall="chown")]),
    Step("utime", "import os; os.utime('f1', (1, 1))",
         [E(ops.UTIME, "{W}/f1", syscall="utimensat")]),
    Step("setxattr", "import os; os.setxattr('f1', 'user.k', b'v')",
         [E(ops.SETXATTR, "{W}/f1", syscall="setxattr")]),
    Step("removexattr", "import os; os.removexattr('f1', 'user.k')",
         [E(ops.REMOVEXATTR, "{W}/f1", syscall="removexattr")]),
    Step("truncate", "import os; os.truncate('f1', 1)",
         [E(ops.TRUNCATE, "{W}/f1", syscall="truncate")]),
    Step("rename", "import os; os.rename('f1', 'f2')",
         [E(ops.RENAME, "{W}/f1", "{W}/f2", syscall="rename")]),
    Step("mkdir", "import os; os.mkdir('sub')", [E(ops.MKDIR, "{W}/sub", syscall="mkdir")]),
    Step("rename into subdirectory", "import os; os.rename('f2', 'sub/f3')",
         [E(ops.RENAME, "{W}/f2", "{W}/sub/f3", syscall="rename")]),
    # failures for every errno, as Linux audit reports them (the failures capability)
    Step("failed: EEXIST, ENOENT, ENOTEMPTY",
         "import os\nfor f, *a in ((os.mkdir, 'sub'), (os.unlink, 'nothere'), "
         "(os.rmdir, 'sub')):\n    try:\n        f(*a)\n    except OSError:\n"
         "        pass\n    else:\n        raise SystemExit(f'{{f}}: no error')",
         [E(ops.MKDIR, "{W}/sub", result=-EEXIST, syscall="mkdir"),
          E(ops.UNLINK, "{W}/nothere", result=-ENOENT, syscall="unlink"),
          E(ops.RMDIR, "{W}/sub", result=-ENOTEMPTY, syscall="rmdir")]),
    # ways around a watch (issue 11): what reaches a watched object by another name
    Step("write and chmod through a hard link made outside",
         "import os; open('{O}/alias', 'a').write('x'); os.chmod('{O}/alias', 0o600)",
         [E(ops.OPEN, "{O}/alias", access="w", syscall="openat"),
          E(ops.CHMOD, "{O}/alias", syscall="chmod")], needs="hard_links"),
    Step("chmod through /proc/self/fd/N",
         "import os; fd = os.open('procfd', os.O_PATH); "
         "os.chmod('/proc/self/fd/%d' % fd, 0o600)",
         # the O_PATH open: fanotify and inotify see no open without file access
         [E(ops.OPEN, "{W}/procfd", access="r", syscall="openat", only=("ebpf",)),
          E(ops.CHMOD, "{W}/procfd", given="/proc/self/fd/3", syscall="chmod")],
         needs="proc_fd"),
    Step("open_by_handle_at for write", BY_HANDLE,
         [E(ops.OPEN, "{W}/byhandle", access="w", syscall="open_by_handle_at")],
         needs="open_by_handle"),
    Step("hard link", "import os; os.link('sub/f3', 'hard')",
         [E(ops.LINK, "{W}/sub/f3", "{W}/hard", syscall="link")]),
    Step("symlink", "import os; os.symlink('sub/f3', 'sym')",
         [E(ops.SYMLINK, "{W}/sym", syscall="symlink")]),
    Step("mknod", "import os; os.mkfifo('fifo')", [E(ops.MKNOD, "{W}/fifo", syscall="mknodat")]),
    Step("nested mkdir then create",
         "import os; os.makedirs('a/b/c'); open('a/b/c/f', 'w').write('x')",
         [E(ops.MKDIR, "{W}/a", syscall="mkdir"), E(ops.MKDIR, "{W}/a/b", syscall="mkdir"),
          E(ops.MKDIR, "{W}/a/b/c", syscall="mkdir"),
          E(ops.CREATE, "{W}/a/b/c/f", syscall="openat")]),
    Step("rename out of the tree", "import os; os.rename('hard', '{O}/hard')",
         [E(ops.RENAME, "{W}/hard", "{O}/hard", crossing="out", syscall="rename")]),
    Step("rename into the tree", "import os; os.rename('{O}/incoming', 'incoming')",
         [E(ops.RENAME, "{O}/incoming", "{W}/incoming", crossing="in",
           syscall="rename")]),
    Step("editor-style replace",
         "import os; open('sub/.f3.tmp', 'w').write('new'); "
         "os.rename('sub/.f3.tmp', 'sub/f3')",
         [E(ops.CREATE, "{W}/sub/.f3.tmp", syscall="openat"),
          E(ops.RENAME, "{W}/sub/.f3.tmp", "{W}/sub/f3", syscall="rename")]),
    Step("exec", "import subprocess; subprocess.run(['./prog'], check=True)",
         [E(ops.EXEC, "{W}/prog", child=True, syscall="execve")]),
    Step("EACCES by an unprivileged user",
         "import errno\ntry:\n    open('locked/f', 'w')\nexcept PermissionError:\n    pass\n"
         "else:\n    raise SystemExit('expected EACCES')",
         [E(ops.CREATE, "{W}/locked/f", result=-EACCES, syscall="openat")], user=UNPRIVILEGED),
    Step("unlink", "import os; os.unlink('sym'); os.unlink('fifo')",
         [E(ops.UNLINK, "{W}/sym", syscall="unlink"), E(ops.UNLINK, "{W}/fifo", syscall="unlink")]),
    Step("rmdir", "import os; os.unlink('a/b/c/f'); os.rmdir('a/b/c'); os.rmdir('a/b'); "
                  "os.rmdir('a')",
         [E(ops.UNLINK, "{W}/a/b/c/f", syscall="unlink"),
          E(ops.RMDIR, "{W}/a/b/c", syscall="rmdir"), E(ops.RMDIR, "{W}/a/b", syscall="rmdir"),
          E(ops.RMDIR, "{W}/a", syscall="rmdir")]),
    Step("outside the tree",
         "import os; open('{O}/x', 'w').close(); os.chmod('{O}/x', 0o600); "
         "os.unlink('{O}/x')", []),
]


def prepare(watched: str, outside: str) -> None:
    """Fixtures made before the trace starts (so they are not reported)."""
    with open("/bin/true", "rb") as src, open(os.path.join(watched, "prog"), "wb") as dst:
        dst.write(src.read())
    os.chmod(os.path.join(watched, "prog"), 0o755)
    os.mkdir(os.path.join(watched, "locked"), 0o755)
    with open(os.path.join(outside, "incoming"), "w") as fh:
        fh.write("x")
    for name in ("linked", "procfd", "byhandle"):
        with open(os.path.join(watched, name), "w") as fh:
            fh.write("x")
    os.link(os.path.join(watched, "linked"), os.path.join(outside, "alias"))


def expected_for(backend: str, event: dict, watched: str, outside: str) -> dict | None:
    """What `backend` must report for one expected event, or None where it cannot."""
    cap = CAPABILITIES[backend]
    if backend not in event.get("only", (backend,)):
        return None
    ev = {k: (v.format(W=watched, O=outside) if isinstance(v, str) else v)
          for k, v in event.items() if k != "only"}
    op = ev["op"]
    if op == ops.TRUNCATE and not cap.truncate:
        return None
    if op == ops.EXEC and not cap.exec:
        # the kernel opens the program for reading: that is what such a backend sees
        ev.update(op=ops.OPEN, access="r")
    if ev.get("result", 0) < 0 and not cap.failures:
        return None
    if op in ATTR_OPS and not cap.attr_kind:
        ev["op"] = ops.ATTR
    crossing = ev.pop("crossing", None)
    if crossing and not cap.rename_both_sides:
        ev["path" if crossing == "in" else "path2"] = None
    if op == ops.LINK and not cap.link_source:
        ev["path"] = None
    given = ev.pop("given", None)
    if given and "syscall" in cap.fields:
        ev["path"] = given      # a backend that sees the syscall: the name as given
    if "syscall" not in cap.fields:
        ev.pop("syscall", None)
    if "result" in cap.fields:
        ev.setdefault("result", 0)
    else:
        ev.pop("result", None)
    return ev
