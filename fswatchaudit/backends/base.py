"""The small interface every backend implements (like watchdog's observers)."""
from __future__ import annotations

import abc
import os
import stat
from collections.abc import Iterable
from typing import ClassVar

from .. import ops
from ..events import Event, ProcessState
from ..rules import Rule, RuleError, RuleSet


def entry_op_of(st: os.stat_result) -> str:
    """The create-like operation that makes a new entry of this inode's type; "create"
    for a regular file (a link is told apart by what the backend knows of the inode)."""
    if stat.S_ISDIR(st.st_mode):
        return ops.MKDIR
    if stat.S_ISLNK(st.st_mode):
        return ops.SYMLINK
    if not stat.S_ISREG(st.st_mode):
        return ops.MKNOD
    return ops.CREATE


def entry_op(path: str, is_dir: bool) -> str:
    """Which create-like operation made a new directory entry, for backends that are
    only told "created" and a name: looked up when the event is read, so the answer is
    what the name shows then (the entry may be gone: then "create"; a file linked
    elsewhere since its creation: "link").  Events decided this way say so
    (``inferred``)."""
    if is_dir:
        return ops.MKDIR
    try:
        st = os.lstat(path)
    except OSError:
        return ops.CREATE
    op = entry_op_of(st)
    if op == ops.CREATE and st.st_nlink > 1:
        return ops.LINK   # a new name for an existing file
    return op


class BackendUnavailable(RuntimeError):
    """This backend cannot run on this host; the message says what is missing."""


class Backend(abc.ABC):
    """A source of Events for the paths selected by a RuleSet.

    Life cycle: ``probe()`` (class level, cheap) -> ``__init__(rules)`` -> ``start()``
    (after it returns, every rule is really watched) -> ``read()`` repeatedly from one
    consumer thread -> ``close()``.  ``add_rule``/``remove_rule`` may be called between
    reads, from the consumer thread, to change rules at run time.

    Events come back with op, path(s) and whatever the backend knows about the process;
    the consumer assigns seq, aliases and keys (RuleSet.select) and enriches the rest.
    A backend may over-report (the consumer drops events no rule matches) but must never
    under-report silently: whatever it could not deliver is counted in ``lost()``.
    """

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> tuple[bool, str]:
        """(usable, reason): can this backend run here, and if not, why."""

    def __init__(self, rules: RuleSet, queue_size: int | None = None) -> None:
        """``queue_size``: bytes of the kernel queue where the backend has one to size
        (the eBPF ring buffer); None for the backend's default.  Others ignore it."""
        self.rules = rules

    @abc.abstractmethod
    def start(self) -> None:
        """Install every rule.  Raises BackendUnavailable or RuleError with a clear message."""

    @abc.abstractmethod
    def read(self, timeout: float) -> list[Event | ProcessState]:
        """Events that arrived, waiting at most ``timeout`` seconds for the first one.
        Process state records (a process entering a per-process audit) come in the
        same stream, in order."""

    def refuse_unhonoured(self, rules: Iterable[Rule]) -> None:
        """Raise RuleError for the first rule this backend cannot honour exactly (a
        field it does not report, a path-less rule it cannot see): refused, never
        silently widened or narrowed."""
        from ..capabilities import CAPABILITIES, refusal
        if self.name not in CAPABILITIES:
            return                      # a backend outside the table vouches for itself
        for rule in rules:
            why = refusal(self.name, rule)
            if why is not None:
                raise RuleError(f"{rule.text()}: {why}")

    def add_rule(self, rid: int, rule: Rule) -> None:
        """Start watching for a rule already added to ``self.rules`` under ``rid``."""
        raise NotImplementedError(f"{self.name} cannot change rules at run time")

    def remove_rule(self, rid: int, rule: Rule) -> None:
        """Stop watching for a rule already removed from ``self.rules``."""
        raise NotImplementedError(f"{self.name} cannot change rules at run time")

    # -- scopes (per-process and container audits); only kernel backends can do them --
    def add_process(self, pid: int, children: bool = True, announce: bool = True,
                    exclusive: bool = True, key: str | None = None) -> None:
        """Audit this process (and, with children, every process it forks from now on).
        With audited processes and no path rule, everything they touch is reported.
        Each process entering the audit gets a state record (announce=False: not this
        one now, it is about to exec).  exclusive=False adds the process to an audit of
        rules instead of narrowing it; its events carry ``key``."""
        raise BackendUnavailable(f"the {self.name} backend cannot audit by process")

    def remove_process(self, pid: int) -> None:
        raise BackendUnavailable(f"the {self.name} backend cannot audit by process")

    def audited_pids(self) -> set[int]:
        """The processes in a per-process audit now."""
        return set()

    def set_container(self, container) -> None:
        """Resolve rule paths inside this container (a scope.Container) and report paths
        as seen inside it.  Called before start()."""
        raise BackendUnavailable(f"the {self.name} backend cannot audit containers")

    def restrict_to_mount_namespace(self, mntns: int | None) -> None:
        """Report only processes in this mount namespace (a container), or all (None)."""
        raise BackendUnavailable(f"the {self.name} backend cannot filter by container")

    def backlog(self) -> dict[str, int]:
        """What waits in the kernel's queue for the consumer (bytes, where known):
        the part of recent activity a SIGKILL would lose."""
        return {}

    def lost(self) -> dict[str, int]:
        """Events lost so far, per source (queue overflow, ring buffer full, ...)."""
        return {}

    def limits(self) -> list[str]:
        """What this backend cannot count: operations that can vanish without a lost
        count (a kernel that merges queued events, ...), one sentence each.  Summaries
        print them next to the lost counts, so "0 lost" is never the whole story."""
        return []

    def watched_count(self) -> int:
        """How many objects (inodes, marks, watches) are really being watched."""
        return len(self.rules)

    def close(self) -> None:  # noqa: B027 (optional: not every backend holds resources)
        """Release kernel resources."""
