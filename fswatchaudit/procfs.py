"""What /proc says about processes: the one place that reads it.

Every reader is a snapshot of now, and a process can be gone (or its pid reused) by
the time it is called: readers return what they could read, and None or an empty
result when the process is gone.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from .events import ProcessState

PROC = "/proc"
PF_KTHREAD = 0x00200000


def read_proc_facts(pid: int, proc: str = PROC) -> dict[str, Any]:
    """What /proc says about a process now: ppid, ids, loginuid, comm, exe."""
    facts: dict[str, Any] = {}
    base = f"{proc}/{pid}"
    try:
        with open(f"{base}/status", "rb") as fh:
            for line in fh:
                name, _, value = line.partition(b":")
                if name == b"PPid":
                    facts["ppid"] = int(value)
                elif name == b"Uid":
                    ids = value.split()
                    facts["uid"], facts["euid"] = int(ids[0]), int(ids[1])
                elif name == b"Gid":
                    facts["gid"] = int(value.split()[0])
                elif name == b"Name":
                    facts["comm"] = value.strip().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return facts
    try:
        with open(f"{base}/loginuid", "rb") as fh:
            facts["loginuid"] = int(fh.read())
    except (OSError, ValueError):
        pass
    try:
        facts["exe"] = os.readlink(f"{base}/exe")
    except OSError:
        pass
    return facts


def ns_inode(pid: int | str, ns: str) -> int | None:
    """The inode number of a process's namespace (what `ls -l /proc/PID/ns` shows)."""
    try:
        link = os.readlink(f"{PROC}/{pid}/ns/{ns}")
    except OSError:
        return None
    return int(link[link.index("[") + 1:-1])


def is_kernel_thread(pid: int) -> bool:
    """Whether a process is a kernel thread (it has no program: no exe link); False
    when it is gone."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as fh:
            flags = int(fh.read().rsplit(b")", 1)[1].split()[6])   # field 9 of stat(5)
    except (OSError, IndexError, ValueError):
        return False
    return bool(flags & PF_KTHREAD)


def boot_ticks_to_ns(ticks: int) -> int:
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def pids() -> Iterator[int]:
    """Every process now (thread group ids)."""
    for entry in os.listdir(PROC):
        if entry.isdigit():
            yield int(entry)


def cgroup(pid: int | str) -> str | None:
    """The process's cgroup: the unified (v2) one, else the first hierarchy listed."""
    try:
        with open(f"{PROC}/{pid}/cgroup") as fh:
            lines = fh.read().strip().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return lines[0].split(":", 2)[-1] if lines else None


def read_process_state(pid: int, reason: str = "initial") -> ProcessState | None:
    """What /proc says about a process, as a state record; None when it is gone."""
    facts = read_proc_facts(pid)
    if not facts:
        return None
    st = ProcessState(pid=pid, reason=reason, **facts)
    try:
        st.cwd = os.readlink(f"{PROC}/{pid}/cwd")
    except OSError:
        pass
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        st.start_time = boot_ticks_to_ns(int(fields[19]))   # field 22 of stat(5)
    except (OSError, IndexError, ValueError):
        pass
    try:
        with open(f"{PROC}/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"NSpid:"):
                    st.nspid = int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return st


def process_tree(root: int) -> list[int]:
    """root and every living descendant, parents before children."""
    children: dict[int, list[int]] = {}
    for pid in pids():
        try:
            with open(f"{PROC}/{pid}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo += sorted(children.get(pid, []))
    return out
