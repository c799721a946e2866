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

from .procfs import cgroup as _cgroup
from .procfs import ns_inode

CONTAINER_ID = re.compile(r"^[0-9a-f]{12,64}$")


class ScopeError(ValueError):
    """A scope that cannot be set up; the message says what was not found."""


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


def _names_a_pid(spec: str) -> bool:
    return spec.isdigit() and len(spec) < 12


def resolve_container(spec: str) -> Container:
    """A container from a pid or a Docker/containerd/Podman id (full or 12+ hex prefix;
    an id can be all digits, a pid has at most 7: pid_max <= 2^22)."""
    if _names_a_pid(spec):
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
    cid = f"mnt:{mntns}" if _names_a_pid(spec) else spec
    return Container(pid=pid, mntns=mntns, pidns=ns_inode(pid, "pid"), cgroup=cgroup,
                     id=cid)
