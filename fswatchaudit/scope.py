"""Scopes that narrow an audit from the outside: a process tree, or a container.

A container is named by the pid of any process inside it, or by a Docker, containerd or
Podman id; ids are resolved through /proc/*/cgroup, without asking any container daemon.
Its files are reached from the host through /proc/PID/root, and its identity is the
mount namespace (plus pid namespace and cgroup) of that process.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .enrich import ns_inode, read_proc_facts
from .events import ProcessState

CONTAINER_ID = re.compile(r"^[0-9a-f]{12,64}$")


class ScopeError(ValueError):
    """A scope that cannot be set up; the message says what was not found."""


def boot_ticks_to_ns(ticks: int) -> int:
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def read_process_state(pid: int, reason: str = "initial") -> ProcessState | None:
    """What /proc says about a process, as a state record; None when it is gone."""
    facts = read_proc_facts(pid)
    if not facts:
        return None
    st = ProcessState(pid=pid, reason=reason, **facts)
    try:
        st.cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        st.start_time = boot_ticks_to_ns(int(fields[19]))   # field 22 of stat(5)
    except (OSError, IndexError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"NSpid:"):
                    st.nspid = int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return st


def process_tree(root: int) -> list[int]:
    """root and every living descendant, parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo += sorted(children.get(pid, []))
    return out


@dataclass
class Container:
    """A container seen from the host."""
    pid: int                       # a process inside it (the lowest pid found)
    mntns: int
    pidns: int | None
    cgroup: str | None
    id: str
    root: str = field(init=False)

    def __post_init__(self) -> None:
        self.root = f"/proc/{self.pid}/root"

    def identity(self) -> dict:
        out = {"id": self.id, "mntns": self.mntns, "pidns": self.pidns}
        if self.cgroup:
            out["cgroup"] = self.cgroup
        return out

    def host_path(self, path: str) -> str:
        """Where a path inside the container is reached from the host."""
        return os.path.join(self.root, path.lstrip("/"))


def _cgroup(pid: int | str) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            lines = fh.read().strip().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return lines[0].split(":", 2)[-1] if lines else None


def resolve_container(spec: str) -> Container:
    """A container from a pid or a Docker/containerd/Podman id (full or 12+ hex prefix)."""
    if spec.isdigit():
        pid = int(spec)
        if not os.path.exists(f"/proc/{pid}"):
            raise ScopeError(f"no process {pid}: name a container by a pid inside it "
                             "or by its id")
    elif CONTAINER_ID.match(spec):
        matches = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                cg = _cgroup(entry)
                if cg and spec in cg:
                    matches.append(int(entry))
        if not matches:
            raise ScopeError(f"no process is in a cgroup naming container id {spec}")
        pid = min(matches)
    else:
        raise ScopeError(f"bad container {spec!r}: expected a pid or a hex container id")
    mntns = ns_inode(pid, "mnt")
    if mntns is None:
        raise ScopeError(f"cannot read the mount namespace of process {pid}")
    cgroup = _cgroup(pid)
    cid = spec if not spec.isdigit() else f"mnt:{mntns}"
    return Container(pid=pid, mntns=mntns, pidns=ns_inode(pid, "pid"), cgroup=cgroup,
                     id=cid)
