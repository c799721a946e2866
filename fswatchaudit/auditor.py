"""The consumer: one thread reads the backend and sends one record stream (events,
process states, lost counts, rule changes, markers) through the processor chain into
the sinks.  Rule changes are carried out on that same thread, between two reads, so
the backend and the sinks never see two callers at once."""
from __future__ import annotations

import gc
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import syscalls
from .backends.base import Backend
from .enrich import Pipeline, Processor, default_pipeline
from .events import Event, LostCounts, Record, RulesInForce
from .rules import Command, Rule, RuleSet
from .sinks.base import Fanout, Sink

DRAIN_READS = 256       # reads of what is queued before a rule change, at most
DRAIN_SECONDS = 30.0    # reading what the kernel holds at a stop, at most


class Auditor:
    def __init__(self, backend: Backend, rules: RuleSet, sinks: list[Sink],
                 pipeline: list[Processor] | None = None, read_timeout: float = 0.2,
                 on_sink_error: Callable[[Sink, Exception, int], None] | None = None) -> None:
        self.backend = backend
        self.rules = rules
        self.out = Fanout(sinks, on_sink_error)
        self.pipeline = Pipeline(pipeline if pipeline is not None else default_pipeline(rules))
        self.read_timeout = read_timeout
        self.per_alias: Counter[str] = Counter()
        self.events = 0
        self.last_lost: dict[str, int] = {}
        # lag: how far behind the operations the consumer is (what a SIGKILL would lose)
        self.backlog: dict[str, int] = {}
        self.behind = 0.0                   # seconds, newest event of the last batch
        self.max_behind = 0.0
        self._newest = 0
        self._stop = threading.Event()
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._loop_thread: threading.Thread | None = None
        self.running = threading.Event()     # set while run() consumes

    # -- control -------------------------------------------------------------
    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run fn on the consumer thread (or here, when no loop runs) and return its result."""
        if self._loop_thread is None or threading.current_thread() is self._loop_thread:
            return fn()
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut.result(timeout)

    def apply(self, cmds: list[Command], reason: str = "change") -> list[str]:
        """Apply rule commands atomically to the rules and the backend."""
        return self.call(lambda: self._apply(cmds, reason))

    def _apply(self, cmds: list[Command], reason: str) -> list[str]:
        # What the kernel recorded under the old rules is judged by the old rules
        # (read in batches: a read returns at most one batch).
        for _ in range(DRAIN_READS):
            items = self.backend.read(0)
            if not items:
                break
            self._dispatch(items)
        self.backend.refuse_unhonoured(c.rule for c in cmds
                                       if c.action == "add" and c.rule is not None)
        before = dict(self.rules.rules)
        listed = self.rules.apply(cmds)
        after = self.rules.rules
        removed = [(rid, r) for rid, r in before.items() if rid not in after]
        added = [(rid, r) for rid, r in after.items() if rid not in before]
        done: list[tuple[int, Rule]] = []
        try:
            for rid, rule in added:
                self.backend.add_rule(rid, rule)
                done.append((rid, rule))
        except Exception:
            for rid, rule in done:
                self.backend.remove_rule(rid, rule)
            self.rules.rules = before
            raise
        for rid, rule in removed:
            self.backend.remove_rule(rid, rule)
        if added or removed:
            self.emit(self.rules_in_force(reason))
            gc.freeze()             # the new rules and their index (see run)
        return listed

    def replace_rules(self, new: RuleSet, reason: str = "reload") -> None:
        """Swap in a whole new rule set (reload), adding before removing so that
        rules present in both are never unwatched."""
        def swap() -> None:
            old_ids = {r.identity() for r in self.rules}
            cmds = [Command("add", r) for r in new if r.identity() not in old_ids]
            keep = {r.identity() for r in new}
            cmds += [Command("delete", r) for r in self.rules if r.identity() not in keep]
            self._apply(cmds, reason)
        self.call(swap)

    def rules_in_force(self, reason: str) -> RulesInForce:
        return RulesInForce(self.rules.texts(), self.rules.digest(), reason)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- the stream ----------------------------------------------------------
    def emit(self, record: Record) -> None:
        """One record through the processor chain into every sink (consumer thread)."""
        out = self.pipeline(record)
        if out is None:
            return
        if type(out) is Event:
            self.events += 1
            self._newest = out.time
            for alias in out.aliases:
                self.per_alias[alias] += 1
        self.out.write(out)

    def _dispatch(self, items: list) -> None:
        """A batch through the chain, then into the sinks in one call each."""
        pipeline = self.pipeline
        per_alias = self.per_alias
        out = []
        events = 0
        newest = self._newest
        for item in items:
            rec = pipeline(item)
            if rec is None:
                continue
            if type(rec) is Event:
                events += 1
                newest = rec.time
                for alias in rec.aliases:
                    per_alias[alias] += 1
            out.append(rec)
        self.events += events
        self._newest = newest
        if out:
            self.out.write_many(out)
        if items:
            self.out.flush()
            if self._newest:
                self.behind = max(0.0, (time.time_ns() - self._newest) / 1e9)
                self.max_behind = max(self.max_behind, self.behind)
                self._newest = 0

    def _note_lost(self, final: bool = False) -> None:
        lost = self.backend.lost()
        if lost != self.last_lost or final:
            self.last_lost = dict(lost)
            self.emit(LostCounts(dict(lost)))

    def poll_once(self, timeout: float) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                break
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed back to the caller
                fut.set_exception(exc)
        self._dispatch(self.backend.read(timeout))
        self._note_lost()
        self.backlog = self.backend.backlog()

    def run(self, duration: float | None = None) -> None:
        """Consume until stop() or the duration ends; then drain what is already queued."""
        self._loop_thread = threading.current_thread()
        self.running.set()
        # What exists now (the rules, their index, the backend's tables) lives as long
        # as the audit: the collector's full passes need not walk it again and again
        # (with 10,000 rules they cost the consumer a quarter of its time).
        gc.freeze()
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while not self._stop.is_set():
                timeout = self.read_timeout
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    timeout = min(timeout, left)
                self.poll_once(timeout)
            self.poll_once(0)
            # what the kernel already holds: each read is bounded, so read on until it
            # is all taken (or DRAIN_SECONDS pass; what is left then shows in the
            # summary's and status's backlog)
            until = time.monotonic() + DRAIN_SECONDS
            while self.backlog.get("ring_bytes") and time.monotonic() < until:
                self.poll_once(0)
        finally:
            self.running.clear()
            self._loop_thread = None

    def finish(self) -> dict[str, int]:
        """After run(): the final lost counts, read while the backend is still open and
        recorded in the stream; summaries and status then tell the same numbers."""
        self._note_lost(final=True)
        self.out.flush()
        return dict(self.last_lost)

    def close(self) -> None:
        """Release the backend, then hand on and close every sink."""
        try:
            self.backend.close()
        finally:
            self.out.close()

    def summary(self) -> list[str]:
        """Counts per alias, events and losses, as of the last read of the counters."""
        lines = [f"{alias:<10} {self.per_alias.get(alias, 0)}" for alias in syscalls.ALIAS_ORDER]
        lost = self.last_lost
        detail = ", ".join(f"{k}={v}" for k, v in sorted(lost.items()))
        lines.append(f"events: {self.events}")
        lines.append(f"events lost: {sum(lost.values())}" + (f" ({detail})" if detail else ""))
        # What the backend cannot count: "0 lost" is not the whole story there.
        lines += [f"not counted: {note}" for note in self.backend.limits()]
        lag = f"consumer lag: at most {self.max_behind:.2f} s behind the operations"
        if "ring_bytes" in self.backlog:
            lag += f", {self.backlog['ring_bytes']} bytes left in the ring"
        lines.append(lag)
        for name, stats in self.out.stats().items():
            if "queued" in stats:           # a sink with a queue of its own
                line = (f"sink {name}: {stats['sent']} sent, {stats['queued']} queued, "
                        f"{stats['lost']} lost")
                if stats.get("last_error"):
                    line += f" (failing: {stats['last_error']})"
                lines.append(line)
        errors = sum(self.out.errors.values())
        if errors:
            lines.append(f"records not written: {errors} ("
                         + ", ".join(f"{k}={v}" for k, v in sorted(self.out.errors.items()))
                         + ")")
        return lines
