"""A sink that keeps records in a list: for embedding the auditor in a program, and
for tests that look at the stream itself."""
from __future__ import annotations

from typing import Any

from ..events import Event, Record


class ListSink:
    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.records: list[Record] = []

    @property
    def events(self) -> list[Event]:
        return [r for r in self.records if type(r) is Event]

    def write(self, record: Record) -> None:
        self.records.append(record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"records_written": len(self.records)}
