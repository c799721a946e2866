"""The records of the one stream that flows from backends through the processor chain
into sinks, and their one serialised form.

Every record serialises to a map whose first key ``"t"`` names its kind; the same map is
a msgpack log record and a JSON line (``trace --json``, ``log show --json``):

  ev     an audited operation (Event; SCHEMA_KEYS)
  state  a process entering a per-process audit (ProcessState; STATE_KEYS)
  lost   events lost so far, per source (LostCounts)
  rules  the rules now in force, after a start, reload or change (RulesInForce)
  mark   something that happened to the audit itself (Marker: stop, suspend, resume)
Files add two of their own: ``hdr`` (first in every file) and ``dropped`` (records the
file could not store).  Readers skip kinds they do not know.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The documented schema, in output order.  Later versions may add keys, never rename.
SCHEMA_KEYS = (
    "seq", "time", "aliases", "op", "syscall", "result", "path", "path2", "dev", "ino",
    "pid", "tid", "ppid", "uid", "euid", "gid", "loginuid", "comm", "exe", "keys",
    "backend",
    # additions after the first schema
    "access", "stale", "container", "merged", "inferred", "parent_ino", "parent2_ino",
    "ouid", "ogid", "cut",
)


_schema_values = operator.attrgetter(*SCHEMA_KEYS)


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
    # the directory holding path's name (and path2's), as auditd's PARENT items; on
    # the same device (dev)
    parent_ino: int | None = None
    parent2_ino: int | None = None
    ouid: int | None = None          # the object's owner and group (Linux audit's PATH
    ogid: int | None = None          # record's ouid, ogid), where the backend knows them
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
    #                                  or executed another program (they may be wrong)
    container: dict[str, Any] | None = None
    # The kernel merged several queued events into the one this came from (fanotify):
    # the operations of one such record are in a fixed order, not the real one, and
    # repeats of one operation were folded without trace.
    merged: bool | None = None
    # Fields worked out from what the file looked like when the event was read, not
    # from the event itself (e.g. ["op"]: create or link decided by the link count).
    inferred: list[str] | None = None
    # The fields the kernel could not give whole (no room in its record, too deep, an
    # unreadable name): a path shown as "..." and the part that is there, or absent.
    cut: list[str] | None = None
    # Not serialised: set by a backend on events of a per-process audit (the keys of
    # that audit, maybe none); such events are kept whatever the rules say.
    scope_keys: tuple[str, ...] | None = None
    # Not serialised: the flags of an open, for rules on them (-F a2&0100), and the
    # syscall table of a 32-bit syscall ("b32"; None: the machine's own), for -F arch.
    open_flags: int | None = None
    arch: str | None = None
    # Not serialised: set by a backend that matches objects in the kernel (eBPF): the
    # ids of the rules whose objects the kernel matched, whatever name reached them.
    # None: the backend cannot tell, and the rules match the event's paths.
    rule_ids: tuple[int, ...] | None = None

    kind: ClassVar[str] = "ev"

    def to_dict(self) -> dict[str, Any]:
        """Schema-ordered dict without the fields that are unknown."""
        out: dict[str, Any] = {"t": "ev"}
        for key, value in zip(SCHEMA_KEYS, _schema_values(self), strict=True):
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        values = {k: data[k] for k in SCHEMA_KEYS if k in data}
        values.setdefault("op", "?")
        values.setdefault("path", None)
        values.setdefault("backend", "?")
        return cls(**values)


# The type of every key a record read back may hold (a damaged log must not pass).
_STR_KEYS = ("op", "syscall", "path", "path2", "comm", "exe", "backend", "access", "cwd",
             "reason")
_INT_KEYS = ("seq", "time", "result", "dev", "ino", "parent_ino", "parent2_ino", "ouid",
             "ogid", "pid", "tid", "ppid", "uid", "euid", "gid", "loginuid", "start_time",
             "nspid")
KEY_TYPES: dict[str, type] = {**{k: str for k in _STR_KEYS}, **{k: int for k in _INT_KEYS},
                              "aliases": list, "keys": list, "stale": bool,
                              "container": dict, "cut": list}


def _check_types(values: dict[str, Any]) -> None:
    for key, value in values.items():
        want = KEY_TYPES[key]
        wrong = not isinstance(value, want) or (want is int and isinstance(value, bool))
        if not wrong and isinstance(value, list):
            wrong = not all(isinstance(v, str) for v in value)
        if wrong:
            raise ValueError(f"{key} holds {type(value).__name__}, not {want.__name__}")


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

    kind: ClassVar[str] = "state"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": "state"}
        out.update((k, getattr(self, k)) for k in STATE_KEYS if getattr(self, k) is not None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessState:
        return cls(**{k: data[k] for k in STATE_KEYS if k in data})



@dataclass(slots=True)
class LostCounts:
    """Events lost so far, per source (ring buffer full, queue overflow, ...): sent
    whenever a count changes and once more at the end."""
    counts: dict[str, int]
    time: int = field(default_factory=time.time_ns)
    kind: ClassVar[str] = "lost"

    def to_dict(self) -> dict[str, Any]:
        return {"t": "lost", "time": self.time, "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LostCounts:
        return cls(counts=dict(data.get("counts") or {}), time=data.get("time", 0))


@dataclass(slots=True)
class RulesInForce:
    """The rules in force from now on, and why they changed (start, reload, add, ...)."""
    rules: list[str]
    digest: str
    reason: str = ""
    time: int = field(default_factory=time.time_ns)
    kind: ClassVar[str] = "rules"

    def to_dict(self) -> dict[str, Any]:
        return {"t": "rules", "time": self.time, "reason": self.reason,
                "rules": list(self.rules), "digest": self.digest}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RulesInForce:
        return cls(rules=list(data.get("rules") or []), digest=data.get("digest", ""),
                   reason=data.get("reason", ""), time=data.get("time", 0))


@dataclass(slots=True)
class Marker:
    """Something that happened to the audit itself: ``what`` is stop, suspend or
    resume; ``detail`` says why and with which counts."""
    what: str
    detail: dict[str, Any] = field(default_factory=dict)
    time: int = field(default_factory=time.time_ns)
    kind: ClassVar[str] = "mark"

    def to_dict(self) -> dict[str, Any]:
        return {"t": "mark", "time": self.time, "what": self.what, **self.detail}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Marker:
        detail = {k: v for k, v in data.items() if k not in ("t", "time", "what")}
        return cls(what=data.get("what", ""), detail=detail, time=data.get("time", 0))


Record = Event | ProcessState | LostCounts | RulesInForce | Marker
RECORD_TYPES: dict[str, Any] = {cls.kind: cls for cls in
                                (Event, ProcessState, LostCounts, RulesInForce, Marker)}


def check_types(data: dict[str, Any]) -> None:
    """Raise ValueError where a serialised event or state holds a value of a type no
    writer makes (what a damaged log shows)."""
    kind = data.get("t")
    if kind == "ev" or kind == "state":
        _check_types({k: v for k, v in data.items() if k in KEY_TYPES})


def record_from_dict(data: dict[str, Any]) -> Record | None:
    """The record a serialised map stands for; None for kinds that are not records of
    the stream (file headers, drop notes) or not known."""
    cls = RECORD_TYPES.get(data.get("t", ""))
    return None if cls is None else cls.from_dict(data)
