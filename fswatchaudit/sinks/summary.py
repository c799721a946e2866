"""A sink that counts what a traced command did, per path and per program, for
`run --summary` and `trace --summary` (as `strace -c` counts syscalls)."""
from __future__ import annotations

from collections import Counter
from typing import Any

from .. import syscalls
from ..events import Event, Record
from .encode import escape

COLUMNS = syscalls.ALIAS_ORDER          # fs-create, fs-remove, fs-attr, open, exec
# Distinct paths (and programs) counted one by one; beyond, they share one row, so that
# a process making millions of names cannot grow the auditor without bound.
MAX_ROWS = 10_000
OTHER = "(other %ss, beyond the %d counted one by one)"


class SummarySink:
    name = "summary"

    def __init__(self, top: int = 20, max_rows: int = MAX_ROWS) -> None:
        self.top = top
        self.max_rows = max_rows
        self.events = 0
        self.per_path: dict[str, Counter[str]] = {}
        self.per_program: dict[str, Counter[str]] = {}

    def write(self, record: Record) -> None:
        if type(record) is not Event:
            return
        ev = record
        self.events += 1
        program = ev.exe or (f"[{ev.comm}]" if ev.comm else "(unknown)")
        failed = ev.result is not None and ev.result < 0
        for table, name, what in ((self.per_path, ev.path or "?", "path"),
                                  (self.per_program, program, "program")):
            c = self._row(table, name, what)
            c["total"] += 1
            for a in ev.aliases:
                c[a] += 1
            if failed:
                c["failed"] += 1
        if ev.path2 is not None:
            c = self._row(self.per_path, ev.path2, "path")
            c["total"] += 1
            for a in ev.aliases:
                c[a] += 1

    def _row(self, table: dict[str, Counter[str]], name: str, what: str) -> Counter[str]:
        c = table.get(name)
        if c is None:
            if len(table) >= self.max_rows:
                name = OTHER % (what, self.max_rows)
                c = table.get(name)
            if c is None:
                c = table[name] = Counter()
        return c

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"events": self.events}

    def _table(self, what: str, table: dict[str, Counter[str]]) -> list[str]:
        head = f"{'total':>7} " + " ".join(f"{c:>9}" for c in COLUMNS) + f" {'failed':>7}  {what}"
        rows = sorted(table.items(), key=lambda kv: (-kv[1]["total"], kv[0]))
        lines = [head, "-" * len(head)]
        for name, c in rows[:self.top]:
            lines.append(f"{c['total']:>7} " + " ".join(f"{c[a]:>9}" for a in COLUMNS)
                         + f" {c['failed']:>7}  {escape(name)}")
        if len(rows) > self.top:
            rest = sum(c["total"] for _, c in rows[self.top:])
            lines.append(f"{rest:>7}  ... {len(rows) - self.top} more {what}s")
        return lines

    def lines(self) -> list[str]:
        """The summary: one table per path, one per program, busiest first."""
        if not self.events:
            return ["summary: no events"]
        return ([f"summary: {self.events} events, {len(self.per_path)} paths, "
                 f"{len(self.per_program)} programs", ""]
                + self._table("path", self.per_path) + [""]
                + self._table("program", self.per_program))
