"""Enrichment as a processor chain (in the manner of structlog's processors).

Each processor takes a record and returns it (possibly with more fields) or None to
drop it; the chain sees every record of the stream, and the steps below that concern
events pass the other kinds through untouched.  The pipeline is a plain list, read top
to bottom.  Processors only fill what the backend left empty: what the kernel recorded
at the time of the operation is more trustworthy than what /proc says later.
"""
from __future__ import annotations

import operator
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from . import syscalls
from .events import Event, Record
from .procfs import is_kernel_thread, ns_inode, read_proc_facts
from .rules import RuleSet

Processor = Callable[[Record], "Record | None"]
EventStep = Callable[[Event], "Event | None"]


def on_events(step: EventStep) -> Processor:
    """A processor that applies ``step`` to events and passes other records through.
    ``run_pipeline`` calls the step directly for events (``events_only``)."""
    def process(record: Record) -> Record | None:
        return step(record) if type(record) is Event else record
    process.events_only = step  # type: ignore[attr-defined]
    return process


PROC_FIELDS = ("ppid", "uid", "euid", "gid", "loginuid", "comm", "exe")
_proc_values = operator.attrgetter(*PROC_FIELDS)


def attach_keys(rules: RuleSet) -> Processor:
    """Drop events no rule selects and attach keys (RuleSet.select decides)."""
    return on_events(rules.select)


def add_aliases(ev: Event) -> Event:
    """The aliases whose set contains the operation (rename is in two)."""
    if not ev.aliases:
        ev.aliases = syscalls.aliases_for_op(ev.op)
    return ev


class ProcessFacts:
    """Fill missing process fields from /proc, with a small cache per pid.

    Marks the event stale when the process is gone (its facts could not be read at all)
    or exiting (its program could not be read, and it is no kernel thread).
    A stale mark the backend set (the process had exited when it read the event) stays.
    Cached facts are reused for ``max_age`` seconds only: a burst of events from one
    process costs one read, and an exec, a setuid or a reused pid is seen soon after.
    A process found gone is remembered as gone for as long (a burst of its events
    read after it exited costs one look, not one per event), and its events get the
    facts last read while it lived, if any, marked stale.
    """

    def __init__(self, size: int = 4096, max_age: float = 0.1) -> None:
        # pid -> (when read, facts, stale)
        self.cache: OrderedDict[int, tuple[float, dict[str, object], bool]] = OrderedDict()
        self.size = size
        self.max_age = max_age

    def __call__(self, ev: Event) -> Event:
        if ev.pid is None or None not in _proc_values(ev):
            return ev
        now = time.monotonic()
        cached = self.cache.get(ev.pid)
        if cached is not None and now - cached[0] <= self.max_age:
            _, facts, stale = cached
        else:
            facts = read_proc_facts(ev.pid)
            # gone, or exiting (its program already released)
            stale = not facts or ("exe" not in facts and not is_kernel_thread(ev.pid))
            if stale and cached is not None and cached[1]:
                facts = cached[1]
            self.cache.pop(ev.pid, None)
            self.cache[ev.pid] = (now, facts, stale)
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        if stale:
            ev.stale = True
        for name, value in facts.items():
            if getattr(ev, name) is None:
                setattr(ev, name, value)
        return ev


class ContainerFacts:
    """Tag events from processes outside the host's mount namespace with the
    container's identity (mount and pid namespace inodes, cgroup)."""

    def __init__(self) -> None:
        self.host_mnt = ns_inode("self", "mnt")
        self.cache: OrderedDict[int, dict | None] = OrderedDict()

    def lookup(self, pid: int) -> dict | None:
        if pid in self.cache:
            return self.cache[pid]
        mnt = ns_inode(pid, "mnt")
        info = None
        if mnt is not None and mnt != self.host_mnt:
            info = {"id": f"mnt:{mnt}", "mntns": mnt, "pidns": ns_inode(pid, "pid")}
            try:
                with open(f"/proc/{pid}/cgroup") as fh:
                    info["cgroup"] = fh.read().strip().split("::", 1)[-1]
            except OSError:
                pass
        self.cache[pid] = info
        if len(self.cache) > 4096:
            self.cache.popitem(last=False)
        return info

    def __call__(self, ev: Event) -> Event:
        if ev.container is None and ev.pid is not None:
            ev.container = self.lookup(ev.pid)
        return ev


class Numbering:
    """The monotonic sequence number, given last so that dropped events leave no gap."""

    def __init__(self, start: int = 1) -> None:
        self.next = start

    def __call__(self, ev: Event) -> Event:
        ev.seq = self.next
        self.next += 1
        return ev


def default_pipeline(rules: RuleSet) -> list[Processor]:
    return [
        attach_keys(rules),
        on_events(add_aliases),
        on_events(ProcessFacts()),
        on_events(ContainerFacts()),
        on_events(Numbering()),
    ]


class Pipeline:
    """The processor chain, read top to bottom; for events it runs the event steps
    directly (the hot path: no per-step test of the record's kind)."""

    def __init__(self, processors: Iterable[Processor]) -> None:
        self.processors = list(processors)
        self.for_events = [getattr(p, "events_only", p) for p in self.processors]
        self.for_others = [p for p in self.processors if not hasattr(p, "events_only")]

    def __call__(self, record: Record) -> Record | None:
        steps = self.for_events if type(record) is Event else self.for_others
        out: Any = record
        for step in steps:
            out = step(out)
            if out is None:
                return None
        return out


def run_pipeline(pipeline: Iterable[Processor], record: Record) -> Record | None:
    return Pipeline(pipeline)(record)
