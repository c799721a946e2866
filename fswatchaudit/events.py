"""The one event model every backend produces, and its stable JSON/msgpack form."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The documented schema, in output order.  Later versions may add keys, never rename.
SCHEMA_KEYS = (
    "seq", "time", "aliases", "op", "syscall", "result", "path", "path2", "dev", "ino",
    "pid", "tid", "ppid", "uid", "euid", "gid", "loginuid", "comm", "exe", "keys",
    "backend",
    # additions after the first schema
    "access", "stale", "container",
)


@dataclass(slots=True)
class Event:
    """One audited filesystem operation.

    Fields a backend cannot know stay None and are left out of every serialised form:
    nothing is invented (inotify, for instance, never knows the pid).
    """
    op: str
    path: str | None                 # absent only where the backend cannot know it
    backend: str
    time: int = 0                    # wall clock, ns since the epoch
    seq: int = 0                     # assigned by the consumer, monotonic per run
    aliases: list[str] = field(default_factory=list)
    syscall: str | None = None
    result: int | None = None        # 0 or -errno
    path2: str | None = None         # rename: the new path; link: the new name
    dev: int | None = None           # st_dev of the inode (Linux encoding)
    ino: int | None = None
    pid: int | None = None           # tgid
    tid: int | None = None
    ppid: int | None = None
    uid: int | None = None
    euid: int | None = None
    gid: int | None = None
    loginuid: int | None = None
    comm: str | None = None
    exe: str | None = None
    keys: list[str] = field(default_factory=list)
    access: str | None = None        # open: "r", "w" or "rw"
    stale: bool | None = None        # process facts read after the process had exited
    container: dict[str, Any] | None = None
    # Not serialised: set by a backend on events of a per-process audit (the keys of
    # that audit, maybe none); such events are kept whatever the rules say.
    scope_keys: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Schema-ordered dict without the fields that are unknown."""
        out: dict[str, Any] = {}
        for key in SCHEMA_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def format_human(ev: Event) -> str:
    """One readable line: alias column, operation, path(s), who."""
    alias = ",".join(ev.aliases) or "-"
    what = ev.path or "?"
    if ev.path2 is not None:
        what = f"{what} -> {ev.path2}"
    parts = [f"{alias:<18}", f"{ev.op:<11}", what]
    if ev.op == "open" and ev.access:
        parts.append(f"access={ev.access}")
    if ev.result not in (None, 0):
        parts.append(f"result={ev.result}")
    for name in ("pid", "ppid", "uid", "comm", "exe"):
        value = getattr(ev, name)
        if value is not None:
            parts.append(f"{name}={value}")
    if ev.syscall:
        parts.append(f"syscall={ev.syscall}")
    if ev.container:
        parts.append(f"container={ev.container.get('id', '?')}")
    if ev.keys:
        parts.append("key=" + ",".join(ev.keys))
    return " ".join(parts)


# Keys of a process state record, in output order.
STATE_KEYS = ("pid", "ppid", "uid", "euid", "gid", "loginuid", "comm", "exe", "cwd",
              "start_time", "reason", "nspid", "container")


@dataclass(slots=True)
class ProcessState:
    """A process entering a per-process audit: who it is, so that later events can be
    tied to a user and a lineage even after the process is gone."""
    pid: int
    ppid: int | None = None
    uid: int | None = None
    euid: int | None = None
    gid: int | None = None
    loginuid: int | None = None
    comm: str | None = None
    exe: str | None = None
    cwd: str | None = None
    start_time: int | None = None    # ns since boot, as /proc/PID/stat starttime says
    reason: str = "initial"          # initial, fork, exec, added
    nspid: int | None = None         # the pid as seen inside its own pid namespace
    container: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in STATE_KEYS if getattr(self, k) is not None}


def format_state(st: ProcessState) -> str:
    parts = [f"{'process':<18}", f"{st.reason:<11}", f"pid={st.pid}"]
    for name in ("ppid", "uid", "comm", "exe", "cwd"):
        value = getattr(st, name)
        if value is not None:
            parts.append(f"{name}={value}")
    return " ".join(parts)
